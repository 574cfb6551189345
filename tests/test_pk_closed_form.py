"""The closed-form PK engine (simulators/pk_closed_form.py) against independent references.

* scipy's ``solve_ivp`` (LSODA, rtol 1e-11) on the compartment ODEs with explicit dose handling: integration is
  piecewise between dose, infusion start/stop, reset and observation times; a bolus is a jump, an infusion a
  constant input; each reset starts a fresh epoch from zero; a steady-state dose starts its epoch from the fixed
  point of the one-interval affine map (found with the ODE solver and a linear solve) a few intervals before the
  dose, then integrates the remaining train members explicitly.
* 60-digit mpmath (spectral formulas) for the propagator, infusion integrals and steady-state sums in
  numerically hard corners (ka = k, ka at an eigenvalue, Q -> 0, nearly equal eigenvalues, extreme time scales).
* exact equivariances (time/rate scaling, dose/volume/clearance scaling).

Run with ``-s`` to see the worst relative error of each comparison.
"""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
from scipy.integrate import solve_ivp

from simulators import pk_closed_form as pk

MODELS = (pk.ONE_CMT_IV, pk.ONE_CMT_ORAL, pk.TWO_CMT_IV, pk.TWO_CMT_ORAL)
MODEL_NAMES = {0: "1cmt_iv", 1: "1cmt_oral", 2: "2cmt_iv", 3: "2cmt_oral"}
RTOL = 1e-7
#: the absolute floor of the comparisons, relative to the individual's peak concentration
FLOOR = 1e-13


def _is_oral(model: int) -> bool:
    return model in (pk.ONE_CMT_ORAL, pk.TWO_CMT_ORAL)


def _is_two(model: int) -> bool:
    return model in (pk.TWO_CMT_IV, pk.TWO_CMT_ORAL)


def _unpack(model: int, p: np.ndarray) -> dict:
    names = pk.param_names(model)
    d = dict(zip(names, p))
    d.setdefault("V1", d.get("V"))
    d.setdefault("Q", 0.0)
    d.setdefault("V2", 1.0)
    d.setdefault("ka", 0.0)
    if not _is_oral(model):
        d["tlag"] = 0.0
    return d


def _matrix(model: int, p: np.ndarray) -> np.ndarray:
    """dA/dt = M A over (depot, central, peripheral); unused compartments have zero rows."""
    d = _unpack(model, p)
    k10, k12, k21, ka = d["CL"] / d["V1"], d["Q"] / d["V1"], d["Q"] / d["V2"], d["ka"]
    M = np.zeros((3, 3))
    M[0, 0] = -ka
    M[1, 0] = ka
    M[1, 1] = -(k10 + k12)
    M[1, 2] = k21
    M[2, 1] = k12
    M[2, 2] = -k21
    return M


def _active(model: int) -> list[int]:
    return [c for c in (0, 1, 2) if (c != 0 or _is_oral(model)) and (c != 2 or _is_two(model))]


# ---------------------------------------------------------------------------------------------------------------
# ODE reference
# ---------------------------------------------------------------------------------------------------------------


def _ode(M: np.ndarray, y: np.ndarray, t0: float, t1: float, u: np.ndarray, atol: float) -> np.ndarray:
    if t1 <= t0:
        return y
    if t1 - t0 < 1e-9 * max(1.0, abs(t1)):  # LSODA refuses spans at rounding level; one Euler step is exact enough
        return y + (t1 - t0) * (M @ y + u)
    sol = solve_ivp(lambda t, x: M @ x + u, (t0, t1), y, method="LSODA", rtol=1e-11, atol=atol,
                    jac=lambda t, x: M)
    assert sol.success, sol.message
    return sol.y[:, -1]


def _simulate(M, y0, t_start, boluses, infusions, obs, atol):
    """States at ``obs`` (>= t_start; pre-bolus at a bolus time) from ``y0`` at ``t_start``.

    boluses: (time, cmt, amount); infusions: (start, end, cmt, rate), possibly starting before t_start."""
    obs = np.asarray(obs, dtype=float)
    t_end = obs.max()
    bps = {t_start, *obs.tolist()}
    bps |= {b[0] for b in boluses}
    bps |= {x for inf in infusions for x in inf[:2]}
    bps = sorted(b for b in bps if t_start <= b <= t_end)
    y = np.array(y0, dtype=float)
    t = t_start
    states = {}
    for bp in bps:
        u = np.zeros(3)
        for s, e, c, rate in infusions:
            if s <= t < e:
                u[c] += rate
        y = _ode(M, y, t, bp, u, atol)
        t = bp
        states[t] = y.copy()
        for bt, c, amt in boluses:
            if bt == t:
                y[c] += amt
    return np.array([states[x] for x in obs.tolist()])


def _ss_epoch_start(model, M, rec, lag, atol):
    """(T0, z, boluses, infusions) reproducing an SS record's infinite train: z is the state just before the member
    starting at T0 (periodic fixed point), the members from T0 to the record's own dose are explicit."""
    amt, route, dur, ii = rec[1], int(rec[2]), rec[3], rec[5]
    start = rec[0] + lag
    n_back = math.ceil(lag / ii) + 1
    T0 = start - n_back * ii
    # one interval [0, ii) from zero: the member at 0 and the overhang of earlier members still infusing
    bol, inf = [], []
    if dur == 0.0:
        bol.append((0.0, route, amt))
    else:
        n = 0
        while n * ii < dur:
            inf.append((-n * ii, -n * ii + dur, route, amt / dur))
            n += 1
    act = _active(model)
    c = _simulate(M, np.zeros(3), 0.0, bol, inf, [ii], atol)[0]
    P = np.zeros((3, 3))
    for j in act:
        e = np.zeros(3)
        e[j] = 1.0
        P[:, j] = _ode(M, e, 0.0, ii, np.zeros(3), 1e-16)
    A = np.eye(len(act)) - P[np.ix_(act, act)]
    z = np.zeros(3)
    z[act] = np.linalg.solve(A, c[act])
    boluses, infusions = [], []
    for n in range(-200, n_back + 1):
        s = T0 + n * ii
        if dur == 0.0:
            if n >= 0:
                boluses.append((s, route, amt))
        elif s + dur > T0:
            infusions.append((s, s + dur, route, amt / dur))
    return T0, z, boluses, infusions


def reference(model: int, p: np.ndarray, doses: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Central concentrations at ``times`` by piecewise ODE integration, one epoch per reset."""
    M = _matrix(model, p)
    d = _unpack(model, p)
    m = doses.shape[0]
    atol = 1e-15 * max(1.0, doses[:, 1].sum())
    starts = [0] + [i for i in range(m) if doses[i, 6] or doses[i, 4]]
    starts = sorted(set(starts))
    out = np.zeros(times.size)
    for e, k in enumerate(starts):
        k_next = starts[e + 1] if e + 1 < len(starts) else m
        resets = bool(m) and (doses[k, 6] or doses[k, 4])
        r = doses[k, 0] if resets else -np.inf
        r_next = doses[k_next, 0] if k_next < m else np.inf
        sel = (times >= r) & (times < r_next)
        if not sel.any():
            continue
        boluses, infusions = [], []
        y0 = np.zeros(3)
        first = k
        if resets and doses[k, 4] and doses[k, 1] > 0:
            lag = d["tlag"] if doses[k, 2] == 0 else 0.0
            T0, y0, boluses, infusions = _ss_epoch_start(model, M, doses[k], lag, atol)
            first = k + 1
        for i in range(first, k_next):
            t, amt, route, dur = doses[i, :4]
            route = int(route)
            s = t + (d["tlag"] if route == 0 else 0.0)
            if dur == 0.0:
                boluses.append((s, route, amt))
            else:
                infusions.append((s, s + dur, route, amt / dur))
        t_start = min([times[sel].min()] + [b[0] for b in boluses] + [x[0] for x in infusions])
        if resets and doses[k, 4] and doses[k, 1] > 0:
            t_start = T0
        out[sel] = _simulate(M, y0, t_start, boluses, infusions, times[sel], atol)[:, 1] / d["V1"]
    return out


# ---------------------------------------------------------------------------------------------------------------
# seeded random designs
# ---------------------------------------------------------------------------------------------------------------


def _logu(rng, lo, hi):
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _params(model: int, rng: np.random.Generator, **fix) -> np.ndarray:
    v1 = _logu(rng, 5, 100)
    d = {"CL": _logu(rng, 0.5, 20), "V": v1, "V1": v1, "Q": _logu(rng, 0.5, 20), "V2": _logu(rng, 5, 200),
         "ka": _logu(rng, 0.2, 5), "tlag": rng.uniform(0.2, 2.0)}
    d.update(fix)
    return np.array([d[n] for n in pk.param_names(model)], dtype=float)


def _eigen(p: np.ndarray) -> tuple[float, float]:
    """(alpha, beta) of a 2-cmt parameter vector, in long double for the near-degenerate designs."""
    CL, V1, Q, V2 = (np.longdouble(x) for x in p[:4])
    k10, k12, k21 = CL / V1, Q / V1, Q / V2
    s, prod = k10 + k12 + k21, k10 * k21
    disc = np.sqrt(s * s - 4 * prod)
    alpha = (s + disc) / 2
    return float(alpha), float(prod / alpha)


def _rec(time, amt, route=1, dur=0.0, ss=0, ii=0.0, reset=0):
    return [time, amt, route, dur, ss, ii, reset]


def _route(model, rng):
    return int(rng.integers(0, 2)) if _is_oral(model) else 1


def _amt(rng):
    return _logu(rng, 20, 500)


def _gaps(rng, n, lo, hi):
    return np.cumsum(rng.uniform(lo, hi, n))


def _sc_oral_multiple(model, rng):
    return [_rec(t, _amt(rng), 0) for t in _gaps(rng, int(rng.integers(4, 7)), 1, 12) - 1]


def _sc_iv_bolus(model, rng):
    return [_rec(t, _amt(rng), 1) for t in _gaps(rng, int(rng.integers(3, 6)), 1, 12) - 1]


def _sc_overlapping_infusions(model, rng):
    return [_rec(t, _amt(rng), _route(model, rng), rng.uniform(2, 8)) for t in _gaps(rng, 4, 0.5, 3)]


def _sc_infusions_then_boluses(model, rng):
    t = _gaps(rng, 5, 1, 6)
    return ([_rec(x, _amt(rng), _route(model, rng), rng.uniform(0.5, 4)) for x in t[:2]]
            + [_rec(x, _amt(rng), _route(model, rng)) for x in t[2:]])


def _sc_ss_bolus(model, rng):
    t = _gaps(rng, 5, 1, 8)
    ii = rng.uniform(6, 24)
    return ([_rec(t[0], _amt(rng), _route(model, rng)), _rec(t[1], _amt(rng), _route(model, rng), ss=1, ii=ii)]
            + [_rec(x + ii, _amt(rng), _route(model, rng), rng.choice([0.0, 1.5])) for x in t[2:]])


def _sc_ss_infusion(model, rng):
    t = _gaps(rng, 4, 1, 8)
    ii = rng.uniform(6, 24)
    dur = rng.uniform(0.5, 0.9) * ii
    return ([_rec(t[0], _amt(rng), 1, 2.0), _rec(t[1], _amt(rng), _route(model, rng), dur, ss=1, ii=ii)]
            + [_rec(x + dur, _amt(rng), _route(model, rng)) for x in t[2:]])


def _sc_ss_infusion_long(model, rng):
    """SS infusions lasting longer than the interval (overlapping at steady state), then an SS bolus."""
    ii = rng.uniform(4, 12)
    dur = rng.uniform(1.2, 2.7) * ii
    return [_rec(0.0, _amt(rng), _route(model, rng), dur, ss=1, ii=ii),
            _rec(dur + 5.0, _amt(rng), _route(model, rng), ss=1, ii=ii),
            _rec(dur + 6.0, _amt(rng), _route(model, rng), 0.5)]


def _sc_resets(model, rng):
    t = _gaps(rng, 7, 1, 6)
    return [_rec(t[0], _amt(rng), _route(model, rng)),
            _rec(t[1], _amt(rng), _route(model, rng), 3.0),
            _rec(t[2], 0.0, 1, reset=1),                       # pure reset, the infusion may still be running
            _rec(t[3], _amt(rng), _route(model, rng)),
            _rec(t[4], _amt(rng), _route(model, rng)),       # killed at once by the next record
            _rec(t[4], _amt(rng), _route(model, rng), reset=1),
            _rec(t[4], _amt(rng), _route(model, rng), 1.0),
            _rec(t[5], _amt(rng), _route(model, rng))]


def _sc_lag(model, rng):
    """Lagged depot and unlagged central doses, a reset before a pending lagged dose starts, an SS depot train."""
    t = _gaps(rng, 6, 2, 6)
    return [_rec(t[0], _amt(rng), 0), _rec(t[0], _amt(rng), 1), _rec(t[1], _amt(rng), 0, 1.0),
            _rec(t[2], _amt(rng), 0), _rec(t[2] + 0.1, 0.0, 1, reset=1),
            _rec(t[3], _amt(rng), 0, ss=1, ii=rng.uniform(4, 12)), _rec(t[4], _amt(rng), 1, 1.0),
            _rec(t[5], _amt(rng), 0)]


def _sc_lag_longer_than_ii(model, rng):
    """An SS depot train whose lag exceeds the interval (members start after the record's own time)."""
    return [_rec(0.0, _amt(rng), 0), _rec(3.0, _amt(rng), 0, ss=1, ii=1.0), _rec(4.0, _amt(rng), 0, 0.5)]


def _sc_mixed(model, rng):
    """Everything at once: infusions, boluses, SS doses, resets, both routes."""
    out = []
    t = 0.0
    for _ in range(8):
        t += rng.uniform(0.3, 5)
        kind = rng.integers(0, 5)
        if kind == 0:
            out.append(_rec(t, _amt(rng), _route(model, rng)))
        elif kind == 1:
            out.append(_rec(t, _amt(rng), _route(model, rng), rng.uniform(0.5, 6)))
        elif kind == 2:
            ii = rng.uniform(3, 12)
            out.append(_rec(t, _amt(rng), _route(model, rng), rng.choice([0.0, rng.uniform(0.2, 2) * ii]), 1, ii))
        elif kind == 3:
            out.append(_rec(t, rng.choice([0.0, _amt(rng)]), _route(model, rng), reset=1))
        else:
            out.append(_rec(t, _amt(rng), _route(model, rng), 0.0))
    return out


def _sc_long_regimen(model, rng):
    """Twice-daily dosing for 3 weeks with an SS restart and a washout (reset): the sweep carries its folded state
    across ~40 records."""
    out = []
    for day in range(21):
        for h in (8.0, 20.0):
            t = 24.0 * day + h + rng.uniform(-1, 1)
            if day == 7 and h == 8.0:
                out.append(_rec(t, _amt(rng), _route(model, rng), 0.0, 1, 12.0))
            elif day == 14 and h == 8.0:
                out.append(_rec(t, 0.0, 1, reset=1))
            else:
                out.append(_rec(t, _amt(rng), _route(model, rng), rng.choice([0.0, 0.0, 1.0])))
    return out


SCENARIOS = {
    "oral_multiple": (_sc_oral_multiple, (1, 3)),
    "iv_bolus": (_sc_iv_bolus, MODELS),
    "overlapping_infusions": (_sc_overlapping_infusions, MODELS),
    "infusions_then_boluses": (_sc_infusions_then_boluses, MODELS),
    "ss_bolus": (_sc_ss_bolus, MODELS),
    "ss_infusion": (_sc_ss_infusion, MODELS),
    "ss_infusion_longer_than_ii": (_sc_ss_infusion_long, MODELS),
    "resets": (_sc_resets, MODELS),
    "lag": (_sc_lag, (1, 3)),
    "lag_longer_than_ii": (_sc_lag_longer_than_ii, (1, 3)),
    "mixed": (_sc_mixed, MODELS),
    "long_regimen": (_sc_long_regimen, MODELS),
}

#: parameter corners, each with the models it applies to
CORNERS = ("generic", "ka_near_k", "ka_at_alpha", "ka_at_beta", "q_tiny", "close_eigenvalues")


def _corner_params(model: int, corner: str, rng: np.random.Generator) -> np.ndarray | None:
    p = _params(model, rng)
    names = pk.param_names(model)
    if corner == "generic":
        return p
    if corner == "ka_near_k":
        if model != pk.ONE_CMT_ORAL:
            return None
        p[names.index("ka")] = p[0] / p[1] * (1.0 + 1e-9 * rng.uniform(-1, 1))
        return p
    if corner in ("ka_at_alpha", "ka_at_beta"):
        if model != pk.TWO_CMT_ORAL:
            return None
        alpha, beta = _eigen(p)
        p[names.index("ka")] = (alpha if corner == "ka_at_alpha" else beta) * (1.0 + 1e-10 * rng.uniform(-1, 1))
        return p
    if corner == "q_tiny":
        if not _is_two(model):
            return None
        p[2] = 1e-9 * p[0]
        return p
    if corner == "close_eigenvalues":
        # k10 = k21 and a small Q: alpha - beta = 2 sqrt(k12 k21) ~ 1e-6 alpha
        if not _is_two(model):
            return None
        p[2] = 1e-12 * p[0]
        p[3] = p[2] * p[1] / p[0] * (1.0 + 1e-12)
        return p
    raise ValueError(corner)


def _design(model: int, scenario: str, corner: str, seed: int):
    rng = np.random.default_rng(seed)
    p = _corner_params(model, corner, rng)
    if p is None:
        return None
    doses = np.array(SCENARIOS[scenario][0](model, rng), dtype=float).reshape(-1, 7)
    lag = _unpack(model, p)["tlag"]
    key = [doses[:, 0], doses[:, 0] + np.where(doses[:, 2] == 0, lag, 0.0)]
    key.append(key[1] + doses[:, 3])
    key = np.concatenate(key)
    t_last = key.max()
    rand = rng.uniform(-1.0, t_last + 30.0, 14)
    times = np.unique(np.concatenate([key, rand, [t_last + 0.001, t_last + 100.0]]))
    return p, doses, times


CASES = [(s, m, c) for s, (_, models) in SCENARIOS.items() for m in models for c in CORNERS
         if c == "generic" or s in ("mixed", "ss_bolus", "ss_infusion", "overlapping_infusions")]
CASES = [x for x in CASES if _design(x[1], x[0], x[2], 0) is not None]

#: worst relative error per (model, reference), printed by the last test
WORST: dict[tuple[str, str], float] = {}


def _check(got: np.ndarray, ref: np.ndarray, rtol: float, floor: float) -> tuple[float, float, int]:
    """(worst error relative to |ref| + floor * peak, worst relative error where |ref| > 1e-6 peak, worst index)."""
    peak = np.abs(ref).max() if ref.size else 0.0
    diff = np.abs(got - ref)
    err = diff / (np.abs(ref) + floor * peak / rtol + 1e-300)
    big = np.abs(ref) > 1e-6 * peak
    rel = float((diff[big] / np.abs(ref[big])).max()) if big.any() else 0.0
    return float(err.max()), rel, int(np.argmax(err))


def _note(model: int, what: str, err: float) -> None:
    key = (MODEL_NAMES[model], what)
    WORST[key] = max(WORST.get(key, 0.0), float(err))


def _predict(model, designs):
    """predict_batch on a padded batch of (params, doses, times)."""
    n = len(designs)
    D = max(d[1].shape[0] for d in designs)
    T = max(d[2].size for d in designs)
    params = np.stack([d[0] for d in designs])
    doses = np.zeros((n, D, 7))
    times = np.zeros((n, T))
    mask = np.zeros((n, T), dtype=bool)
    nd = np.zeros(n, dtype=np.int64)
    for i, (_, dd, tt) in enumerate(designs):
        doses[i, : dd.shape[0]] = dd
        nd[i] = dd.shape[0]
        times[i, : tt.size] = tt
        mask[i, : tt.size] = True
    out = pk.predict_batch(model, params, doses, nd, times, mask)
    return [out[i, : d[2].size] for i, d in enumerate(designs)], out, mask


# ---------------------------------------------------------------------------------------------------------------
# tests: ODE reference
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario,model,corner", CASES, ids=[f"{s}-{MODEL_NAMES[m]}-{c}" for s, m, c in CASES])
def test_against_ode(scenario, model, corner):
    designs = [_design(model, scenario, corner, seed) for seed in range(3)]
    got, _, _ = _predict(model, designs)
    worst = 0.0
    for (p, doses, times), g in zip(designs, got):
        ref = reference(model, p, doses, times)
        assert np.all(np.isfinite(g)) and np.all(g >= 0.0)
        err, rel, bad = _check(g, ref, RTOL, FLOOR)
        worst = max(worst, rel)
        assert err <= RTOL, (f"t={times[bad]}: got {g[bad]!r}, ODE {ref[bad]!r}\nparams {p}\ndoses\n{doses}")
        # the scalar API (plain superposition) agrees with predict_batch's sweep to rounding, and equals it bit
        # for bit where predict_batch has to fall back to superposition (unsorted times)
        one = np.array([pk.conc_at(model, p, doses, doses.shape[0], t) for t in times])
        np.testing.assert_allclose(one, g, rtol=1e-13, atol=1e-15 * g.max())
        perm = np.random.default_rng(0).permutation(times.size)
        unsorted = pk.predict_batch(model, p[None], doses[None], np.array([doses.shape[0]]), times[perm][None],
                                    np.ones((1, times.size), dtype=bool))[0]
        np.testing.assert_array_equal(unsorted, one[perm])
    _note(model, "ODE", worst)
    print(f"\n{scenario}/{MODEL_NAMES[model]}/{corner}: worst rel err vs ODE {worst:.2e}")


# ---------------------------------------------------------------------------------------------------------------
# tests: mpmath (50 digits) in the numerically hard corners, one dose record at a time
# ---------------------------------------------------------------------------------------------------------------

#: (model, params, elimination time scale): ka = k, ka at an eigenvalue, Q -> 0, nearly equal eigenvalues, fast
#: distribution, extreme volumes and units (CL 1e-4..1e4, V 1e-3..1e5)
HARD = [
    (0, [2.0, 10.0, 0.0]),
    (0, [1e-4, 1e5, 0.0]),
    (0, [1e4, 1e-3, 0.0]),
    (1, [2.0, 10.0, 0.2, 0.0]),
    (1, [2.0, 10.0, 0.2 * (1 + 1e-9), 0.5]),
    (1, [2.0, 10.0, 0.2 * (1 + 1e-6), 0.0]),
    (1, [2.0, 10.0, 2e3, 0.0]),
    (1, [2.0, 10.0, 2e-5, 0.0]),
    (1, [1e-4, 1e5, 1e-9 * (1 + 1e-12), 3e5]),
    (1, [1e4, 1e-3, 1e7 * (1 - 1e-10), 1e-8]),
    (2, [2.0, 10.0, 3.0, 20.0, 0.0]),
    (2, [2.0, 10.0, 2e-12, 20.0, 0.0]),
    (2, [2.0, 10.0, 1e-10, 1e-9 * (1 + 1e-12), 0.0]),  # k10 = k21, Q tiny: alpha - beta ~ 1e-5 alpha
    (2, [2.0, 10.0, 2e4, 20.0, 0.0]),
    (2, [2.0, 10.0, 3.0, 1e-3, 0.0]),
    (2, [2.0, 10.0, 3.0, 1e5, 0.0]),
    (2, [1e-4, 1e5, 1e-3, 1e3, 0.0]),
    (2, [1e4, 1e-3, 1e3, 1e-2, 0.0]),
    (3, [2.0, 10.0, 3.0, 20.0, 1.0, 0.0]),
    (3, [2.0, 10.0, 3.0, 20.0, "alpha", 0.0]),
    (3, [2.0, 10.0, 3.0, 20.0, "beta", 0.25]),
    (3, [2.0, 10.0, 2e-12, 20.0, 0.2, 0.0]),            # Q -> 0 and ka = k10
    (3, [2.0, 10.0, 1e-10, 1e-9, 0.2, 0.0]),            # ka = k10 = k21, Q tiny: three nearly equal rates
    (3, [2.0, 10.0, 2e4, 20.0, 5e3, 0.0]),
    (3, [1e-4, 1e5, 1e-3, 1e3, "beta", 0.0]),
    (3, [1e4, 1e-3, 1e3, 1e-2, "alpha", 0.0]),
]


def _hard_params(model, spec):
    p = list(spec)
    if model == 3 and isinstance(p[4], str):
        alpha, beta = _eigen(np.array(p[:4], dtype=float))
        p[4] = alpha if p[4] == "alpha" else beta
    return np.array(p, dtype=float)


class _MpModel:
    """exp(M t), int_0^t exp(M s) ds and steady-state sums of one model in 60-digit arithmetic, by the spectral
    (Lagrange-Sylvester) formula f(M) = sum_i f(lambda_i) Z_i over the active compartments. ka is nudged by 1e-20
    (relative) so that no two eigenvalues coincide exactly (ka = k); at 60 digits the near-cancellation that leaves
    costs at most ~20 digits and the nudge moves the result by ~1e-20 relative."""

    def __init__(self, model, p):
        mpmath.mp.dps = 60
        d = {k: mpmath.mpf(float(v)) for k, v in _unpack(model, p).items()}
        k10, k12, k21, ka = d["CL"] / d["V1"], d["Q"] / d["V1"], d["Q"] / d["V2"], d["ka"] * (1 + mpmath.mpf(1e-20))
        self.act = _active(model)
        self.V = d["V1"]
        M = mpmath.zeros(3, 3)
        M[0, 0], M[1, 0] = -ka, ka
        M[1, 1], M[1, 2], M[2, 1], M[2, 2] = -(k10 + k12), k21, k12, -k21
        lam = []
        if _is_oral(model):
            lam.append(-ka)
        if _is_two(model):
            s, disc = k10 + k12 + k21, mpmath.sqrt((k10 + k12 - k21) ** 2 + 4 * k12 * k21)
            alpha = (s + disc) / 2
            lam += [-alpha, -(k10 * k21) / alpha]
        else:
            lam.append(-k10)
        n = len(self.act)
        Ma = mpmath.matrix([[M[a, b] for b in self.act] for a in self.act])
        self.lam = lam
        self.Z = []
        for i, li in enumerate(lam):
            Z = mpmath.eye(n)
            for j, lj in enumerate(lam):
                if j != i:
                    Z = Z * (Ma - lj * mpmath.eye(n)) / (li - lj)
            self.Z.append(Z)

    def _f(self, values):
        n = len(self.act)
        F = mpmath.zeros(n, n)
        for v, Z in zip(values, self.Z):
            F += v * Z
        out = mpmath.zeros(3, 3)
        for i, a in enumerate(self.act):
            for j, b in enumerate(self.act):
                out[a, b] = F[i, j]
        return out

    def P(self, t):
        return self._f([mpmath.exp(lam * t) for lam in self.lam])

    def G(self, t):
        return self._f([mpmath.expm1(lam * t) / lam for lam in self.lam])

    def ss_sum(self, ii, x):
        """(I - exp(M ii))^{-1} x = sum_k exp(M k ii) x."""
        return self._f([1 / -mpmath.expm1(lam * ii) for lam in self.lam]) * x

    def single(self, amt, route, dur, tau):
        """State at tau after a dose starting at 0."""
        e = mpmath.matrix(3, 1)
        e[route] = 1
        if tau <= 0:
            return mpmath.matrix(3, 1)
        if dur == 0:
            return self.P(tau) * e * amt
        if tau <= dur:
            return self.G(tau) * e * (mpmath.mpf(amt) / dur)
        return self.P(tau - dur) * (self.G(dur) * e * (mpmath.mpf(amt) / dur))

    def ss(self, amt, route, dur, ii, tau):
        """sum_{n>=0} single(tau + n ii): members still infusing one by one, the rest as a geometric tail."""
        n = 0
        acc = mpmath.matrix(3, 1)
        while tau + n * ii <= dur:
            acc += self.single(amt, route, dur, tau + n * ii)
            n += 1
        if dur > 0:
            x_end = self.single(amt, route, dur, dur)  # state when a member's input ends
        else:
            x_end = mpmath.matrix(3, 1)
            x_end[route] = amt
        return acc + self.P(tau + n * ii - dur) * self.ss_sum(ii, x_end)


def _hard_cases():
    out = []
    for k, (model, spec) in enumerate(HARD):
        for route in ([0, 1] if _is_oral(model) else [1]):
            for kind in ("bolus", "infusion", "ss_bolus", "ss_infusion", "ss_infusion_long"):
                out.append((k, model, route, kind))
    return out


HARD_CASES = _hard_cases()


@pytest.mark.parametrize("model", MODELS, ids=[MODEL_NAMES[m] for m in MODELS])
def test_hard_corners_against_mpmath(model):
    worst = 0.0
    for k, mdl, route, kind in HARD_CASES:
        if mdl != model:
            continue
        p = _hard_params(model, HARD[k][1])
        d = _unpack(model, p)
        ref_model = _MpModel(model, p)
        ts = d["V1"] / d["CL"]  # elimination time scale
        lag = d["tlag"] if route == 0 else 0.0
        dur = {"bolus": 0.0, "infusion": 0.3 * ts, "ss_bolus": 0.0, "ss_infusion": 0.2 * ts,
               "ss_infusion_long": 0.85 * ts}[kind]
        ss = kind.startswith("ss")
        ii = 0.5 * ts if ss else 0.0
        doses = np.array([_rec(0.0, 100.0, route, dur, int(ss), ii)], dtype=float)
        taus = ts * np.array([1e-7, 1e-3, 0.05, 0.2, 0.3, 0.45, 0.5, 1.0, 3.0, 12.0, 30.0])
        if dur > 0:
            taus = np.concatenate([taus, [dur, dur * (1 + 1e-12)]])
        for tau in taus:
            t = float(tau + lag)
            got = pk.conc_at(model, p, doses, 1, t)
            if ss:
                ref = ref_model.ss(100.0, route, dur, ii, mpmath.mpf(t) - lag)[1] / ref_model.V
            else:
                ref = ref_model.single(100.0, route, dur, mpmath.mpf(t) - lag)[1] / ref_model.V
            err = float(abs(mpmath.mpf(got) - ref) / abs(ref)) if ref != 0 else abs(got)
            assert err < 1e-11 or (ref < 1e-300 and got < 1e-290), (
                f"{kind} route {route} params {p} t={t}: got {got!r}, mpmath {mpmath.nstr(ref, 20)}, rel {err:.3g}")
            worst = max(worst, err)
    _note(model, "mpmath (hard corners)", worst)
    print(f"\n{MODEL_NAMES[model]}: worst rel err vs mpmath in the hard corners {worst:.2e}")


def _mp_design_reference(model, p, doses, times):
    """Superposition of the records in 60 digits with the module's conventions (lag on depot doses, a record is
    removed from the first later reset on, SS = infinite train ending with the record's dose)."""
    ref = _MpModel(model, p)
    lag = _unpack(model, p)["tlag"]
    m = doses.shape[0]
    kill = np.full(m, np.inf)
    for i in range(m - 2, -1, -1):
        kill[i] = doses[i + 1, 0] if (doses[i + 1, 6] or doses[i + 1, 4]) else kill[i + 1]
    out = []
    for t in times:
        c = mpmath.mpf(0)
        for i in range(m):
            tm, amt, route, dur, ss, ii = doses[i, :6]
            if tm > t or kill[i] <= t or amt == 0:
                continue
            tau = mpmath.mpf(t) - (tm + (lag if route == 0 else 0.0))
            x = ref.ss(amt, int(route), dur, ii, tau) if ss else ref.single(amt, int(route), dur, tau)
            c += x[1]
        out.append(c / ref.V)
    return out


@pytest.mark.parametrize("model", MODELS, ids=[MODEL_NAMES[m] for m in MODELS])
def test_random_designs_against_mpmath(model):
    """The ODE designs with the richest dosing, against 60-digit superposition: what is left of the ODE comparison's
    error is the ODE solver's."""
    worst = 0.0
    for scenario in ("mixed", "resets", "ss_infusion_longer_than_ii", "lag_longer_than_ii", "lag"):
        if model not in SCENARIOS[scenario][1]:
            continue
        for corner in ("generic", "ka_near_k", "ka_at_alpha", "close_eigenvalues"):
            design = _design(model, scenario, corner, 1)
            if design is None or (corner != "generic" and scenario != "mixed"):
                continue
            p, doses, times = design
            got = _predict(model, [design])[0][0]
            ref = _mp_design_reference(model, p, doses, times)
            for t, g, r in zip(times, got, ref):
                err = float(abs(mpmath.mpf(g) - r) / abs(r)) if r != 0 else abs(g)
                assert err < 1e-12, (scenario, corner, t, g, r)
                worst = max(worst, err)
    _note(model, "mpmath (random designs)", worst)


def _mp_conv(rates, t):
    """Convolution of exp(-r s) over ``rates`` at t: entry (0, m) of expm(t B), B bidiagonal (Opitz)."""
    m = len(rates)
    B = mpmath.zeros(m, m)
    for i, r in enumerate(rates):
        B[i, i] = -mpmath.mpf(r)
        if i + 1 < m:
            B[i, i + 1] = 1
    return mpmath.expm(B * t)[0, m - 1]


def test_exponential_convolutions_against_mpmath():
    """The kernels E_1..E_3 (divided differences of exp) at clustered, coincident, spread and zero rates."""
    rng = np.random.default_rng(7)
    worst = 0.0
    for trial in range(150):
        m = 2 + trial % 3
        centre = _logu(rng, 1e-3, 1e3)
        spread = 10.0 ** rng.uniform(-16, 1)
        rates = centre * (1 + spread * rng.uniform(-1, 1, m))
        if trial % 5 == 0:
            rates[0] = 0.0
        if trial % 7 == 0:
            rates[1] = rates[0]
        rates = np.abs(rates)
        t = _logu(rng, 1e-4, 40.0) / centre
        fn = {2: pk._e1, 3: pk._e2, 4: pk._e3}[m]
        got = fn(*rates, t)
        ref = _mp_conv(rates, t)
        err = float(abs(mpmath.mpf(got) - ref) / ref)
        assert err < 1e-13, (rates, t, got, ref)
        worst = max(worst, err)
    print(f"\nE_1..E_3 worst rel err vs mpmath {worst:.2e}")


def test_long_times_and_tiny_intervals():
    """Months after a dose, in minutes, everything finite and >= 0 (0 once below the double range); a dosing interval
    1e-12 of the half-life keeps full relative accuracy in the steady-state sum (1 / (1 - e^{-k ii}) ~ 1e12)."""
    for model in MODELS:
        p = _params(model, np.random.default_rng(model))
        doses = np.array([_rec(0.0, 100.0, 0 if _is_oral(model) else 1), _rec(1.0, 50.0, 1, 2.0),
                          _rec(5.0, 70.0, 1, 1.0, 1, 12.0)], dtype=float)
        times = np.array([1e3, 1e5, 1e7, 1e9, 1e12, 1e15])
        c = np.array([pk.conc_at(model, p, doses, 3, t) for t in times])
        assert np.all(np.isfinite(c)) and np.all(c >= 0.0)
        assert c[-1] == 0.0
    k = 0.3
    for ii in (1e-12 / k, 1e-6 / k):
        doses = np.array([_rec(0.0, 1.0, 1, 0.0, 1, ii)])
        got = pk.conc_at(0, np.array([k, 1.0, 0.0]), doses, 1, 0.0)
        ref = mpmath.exp(-k * mpmath.mpf(ii)) / -mpmath.expm1(-k * mpmath.mpf(ii))
        assert abs(got / float(ref) - 1) < 1e-14


def test_continuous_steady_state_infusion():
    """An SS infusion lasting exactly ii is a constant infusion at steady state: C = rate / CL for every model."""
    for model in MODELS:
        p = _params(model, np.random.default_rng(10 + model))
        for route in ([0, 1] if _is_oral(model) else [1]):
            doses = np.array([_rec(2.0, 120.0, route, 12.0, 1, 12.0)], dtype=float)
            lag = _unpack(model, p)["tlag"] if route == 0 else 0.0
            for t in (2.0, 2.0 + lag, 3.0 + lag, 13.9999 + lag):
                np.testing.assert_allclose(pk.conc_at(model, p, doses, 1, t), 10.0 / p[0], rtol=1e-13)


def test_q_to_zero_reduces_to_one_compartment():
    """Q = 1e-13 CL is the 1-cmt model to ~1e-11; Q = 0 exactly (an unreachable peripheral, a zero pivot in the
    steady-state elimination) is the 1-cmt model bit for bit."""
    for one, two in ((0, 2), (1, 3)):
        for seed in range(4):
            p1, doses, times = _design(one, "mixed", "generic", seed)
            c1 = _predict(one, [(p1, doses, times)])[0][0]
            c2 = _predict(two, [(np.insert(p1, 2, [1e-13 * p1[0], 7.0]), doses, times)])[0][0]
            np.testing.assert_allclose(c2, c1, rtol=1e-11, atol=1e-11 * c1.max())
            c0 = _predict(two, [(np.insert(p1, 2, [0.0, 7.0]), doses, times)])[0][0]
            np.testing.assert_array_equal(c0, c1)


# ---------------------------------------------------------------------------------------------------------------
# tests: equivariances
# ---------------------------------------------------------------------------------------------------------------


def _batch_designs(model):
    designs = []
    for s, (_, models) in SCENARIOS.items():
        if model in models:
            designs += [_design(model, s, "generic", seed) for seed in range(2)]
    return designs


def _scale_time(model, designs, a):
    names = pk.param_names(model)
    out = []
    for p, doses, times in designs:
        p = p.copy()
        for j, nm in enumerate(names):
            if nm in ("CL", "Q", "ka"):
                p[j] /= a
            elif nm == "tlag":
                p[j] *= a
        doses = doses.copy()
        doses[:, [0, 3, 5]] *= a
        out.append((p, doses, times * a))
    return out


def _scale_mass(model, designs, c):
    names = pk.param_names(model)
    out = []
    for p, doses, times in designs:
        p = p.copy()
        for j, nm in enumerate(names):
            if nm in ("CL", "Q", "V", "V1", "V2"):
                p[j] *= c
        doses = doses.copy()
        doses[:, 1] *= c
        out.append((p, doses, times))
    return out


@pytest.mark.parametrize("model", MODELS, ids=[MODEL_NAMES[m] for m in MODELS])
def test_equivariance(model):
    """Times x a with rates / a, and doses, volumes and clearances x c, leave every concentration unchanged:
    bit for bit for powers of two (every operation then scales exactly), to rounding for other factors."""
    designs = _batch_designs(model)
    _, base, _ = _predict(model, designs)
    assert np.all(np.isfinite(base))
    for a in (4.0, 1.0 / 1024.0, 2.0**20):
        _, out, _ = _predict(model, _scale_time(model, designs, a))
        np.testing.assert_array_equal(out, base)
    for c in (8.0, 2.0**-30):
        _, out, _ = _predict(model, _scale_mass(model, designs, c))
        np.testing.assert_array_equal(out, base)
    worst = 0.0
    floor = 1e-14 * np.abs(base).max()
    for a, c in ((3.7, 1.0), (1e-3 / 7, 1.0), (1e4 / 3, 1.0), (1.0, 0.37), (1.0, 1e5 / 3), (1e-2 / 3, 1e-3 / 7)):
        _, out, _ = _predict(model, _scale_mass(model, _scale_time(model, designs, a), c))
        np.testing.assert_allclose(out, base, rtol=1e-12, atol=floor)
        big = np.abs(base) > 1e-6 * np.abs(base).max()
        worst = max(worst, float((np.abs(out - base)[big] / np.abs(base[big])).max()))
    _note(model, "equivariance (non-power-of-2 factors)", worst)


# ---------------------------------------------------------------------------------------------------------------
# tests: API, masking, invalid input
# ---------------------------------------------------------------------------------------------------------------


def test_param_names():
    assert pk.param_names(pk.ONE_CMT_IV) == ("CL", "V", "tlag")
    assert pk.param_names(pk.ONE_CMT_ORAL) == ("CL", "V", "ka", "tlag")
    assert pk.param_names(pk.TWO_CMT_IV) == ("CL", "V1", "Q", "V2", "tlag")
    assert pk.param_names(pk.TWO_CMT_ORAL) == ("CL", "V1", "Q", "V2", "ka", "tlag")
    with pytest.raises(ValueError):
        pk.param_names(4)


def test_conventions_at_event_times():
    """Pre-dose level at a bolus time; a reset empties from its own time on; an SS dose shows its trough at its
    time; IV doses ignore tlag; an IV model accepts its tlag column or not."""
    p = np.array([2.0, 10.0, 1.0, 0.7])
    doses = np.array([_rec(0.0, 100.0, 0), _rec(5.0, 100.0, 1), _rec(8.0, 0.0, 1, reset=1),
                      _rec(9.0, 100.0, 1, 0.0, 1, 12.0)], dtype=float)
    def c(t):
        return pk.conc_at(1, p, doses, 4, t)

    assert c(0.7) == 0.0 and c(0.7 + 1e-9) > 0.0
    assert c(5.0) < c(5.0 + 1e-12)
    assert c(8.0 - 1e-9) > 0.0 and c(8.0) == 0.0 and c(8.5) == 0.0
    k = 0.2
    np.testing.assert_allclose(c(9.0), 10.0 * np.exp(-12 * k) / -np.expm1(-12 * k), rtol=1e-14)
    np.testing.assert_allclose(c(9.0 + 1e-12), 10.0 / -np.expm1(-12 * k), rtol=1e-11)
    iv = np.array([_rec(1.0, 100.0, 1)])
    assert pk.conc_at(0, np.array([2.0, 10.0, 5.0]), iv, 1, 3.0) == pk.conc_at(0, np.array([2.0, 10.0]), iv, 1, 3.0)
    np.testing.assert_allclose(pk.conc_at(0, np.array([2.0, 10.0, 5.0]), iv, 1, 3.0), 10 * np.exp(-0.4), rtol=1e-15)


def test_mask_and_padding():
    designs = _batch_designs(pk.TWO_CMT_ORAL)[:5]
    got, out, mask = _predict(pk.TWO_CMT_ORAL, designs)
    assert np.all(out[~mask] == 0.0)
    # padded dose rows beyond n_doses are ignored whatever they hold
    p, doses, times = designs[0]
    padded = np.vstack([doses, np.full((3, 7), np.nan)])
    c = pk.predict_batch(3, p[None], padded[None], np.array([doses.shape[0]]), times[None],
                         np.ones((1, times.size), dtype=bool))
    np.testing.assert_array_equal(c[0], got[0])


@pytest.mark.parametrize("what,model,params,record,code", [
    ("depot dose in an IV model", 0, [2.0, 10.0, 0.0], _rec(0.0, 100.0, 0), pk.BAD_ROUTE),
    ("route 2", 1, [2.0, 10.0, 1.0, 0.0], _rec(0.0, 100.0, 2), pk.BAD_ROUTE),
    ("SS without interval", 1, [2.0, 10.0, 1.0, 0.0], _rec(0.0, 100.0, 0, 0.0, 1, 0.0), pk.BAD_II),
    ("SS infusion over 1000 ii", 1, [2.0, 10.0, 1.0, 0.0], _rec(0.0, 100.0, 0, 1001.0, 1, 1.0), pk.BAD_II),
    ("negative amount", 2, [2.0, 10.0, 1.0, 5.0, 0.0], _rec(0.0, -1.0, 1), pk.BAD_RECORD),
    ("negative duration", 2, [2.0, 10.0, 1.0, 5.0, 0.0], _rec(0.0, 1.0, 1, -1.0), pk.BAD_RECORD),
    ("NaN time", 3, [2.0, 10.0, 1.0, 5.0, 1.0, 0.0], _rec(np.nan, 1.0, 1), pk.BAD_RECORD),
    ("zero clearance", 0, [0.0, 10.0, 0.0], _rec(0.0, 100.0, 1), pk.BAD_PARAMS),
    ("negative Q", 2, [2.0, 10.0, -1.0, 5.0, 0.0], _rec(0.0, 100.0, 1), pk.BAD_PARAMS),
    ("negative lag", 1, [2.0, 10.0, 1.0, -0.1], _rec(0.0, 100.0, 0), pk.BAD_PARAMS),
    ("missing ka", 3, [2.0, 10.0, 1.0, 5.0], _rec(0.0, 100.0, 0), pk.BAD_PARAMS),
])
def test_invalid_input_gives_nan_and_a_message(what, model, params, record, code):
    p = np.array(params, dtype=float)
    doses = np.array([_rec(-1.0, 10.0, 1), record], dtype=float)
    assert np.isnan(pk.conc_at(model, p, doses, 2, 5.0))
    out = pk.predict_batch(model, p[None], doses[None], np.array([2]), np.array([[1.0, 5.0]]),
                           np.array([[True, False]]))
    assert np.isnan(out[0, 0]) and out[0, 1] == 0.0
    status = pk.check_batch(model, p[None], doses[None], np.array([2]))
    assert status[0, 0] == code
    with pytest.raises(ValueError, match="individual 0"):
        pk.validate(model, p[None], doses[None], np.array([2]))


def test_non_finite_times():
    p, doses, times = _design(pk.TWO_CMT_ORAL, "mixed", "generic", 0)
    good = _predict(pk.TWO_CMT_ORAL, [(p, doses, times)])[0][0]
    bad = times.copy()
    bad[[3, 7]] = [np.nan, np.inf]
    got = _predict(pk.TWO_CMT_ORAL, [(p, doses, bad)])[0][0]
    assert np.isnan(got[3]) and np.isnan(got[7])
    keep = np.isfinite(bad)
    np.testing.assert_allclose(got[keep], good[keep], rtol=1e-13, atol=1e-15 * good.max())


def test_unsorted_records_and_bad_counts():
    p = np.array([2.0, 10.0, 0.0])
    doses = np.array([_rec(5.0, 10.0), _rec(1.0, 10.0)], dtype=float)
    assert pk.check_batch(0, p[None], doses[None], np.array([2]))[0].tolist() == [pk.UNSORTED, 1]
    assert pk.check_batch(0, p[None], doses[None], np.array([3]))[0, 0] == pk.BAD_N_DOSES
    assert pk.check_batch(0, p[None], doses[None], np.array([1]))[0, 0] == pk.OK
    pk.validate(0, p[None], doses[None], np.array([1]))
    assert pk.conc_at(0, p, doses, 0, 3.0) == 0.0


def test_zz_report():
    """Print the worst relative errors collected above (pytest -s)."""
    print()
    for (model, what), err in sorted(WORST.items()):
        print(f"worst relative error {model:>10} vs {what}: {err:.2e}")
