"""The numba solvers against analytic solutions and scipy's reference integrators.

Right-hand sides and the jitted wrappers that call the solvers live at module level with ``cache=True`` so that only
the first run pays numba's compile time.
"""

from __future__ import annotations

import numba as nb
import numpy as np
import pytest
from scipy import stats
from scipy.integrate import solve_ivp
from scipy.linalg import expm

from simulators import solvers as S
from simulators.mrna_simple import TIME_GRID, _protein
from simulators.pk_oral_1cmt import oral_1cmt_concentration

# ---------------------------------------------------------------------------------------------------------------
# problems
# ---------------------------------------------------------------------------------------------------------------

_A_LIN = np.array([[-1.3, 0.7, 0.0], [0.0, -0.7, 0.0], [1.3, 0.0, -50.0]])


@nb.njit(cache=True)
def _lin(t, y, p, out):
    out[0] = -p[0] * y[0] + p[1] * y[1]
    out[1] = -p[1] * y[1]
    out[2] = p[0] * y[0] - p[2] * y[2]


@nb.njit(cache=True)
def _lin_jac(t, y, p, J):
    J[:, :] = 0.0
    J[0, 0] = -p[0]
    J[0, 1] = p[1]
    J[1, 1] = -p[1]
    J[2, 0] = p[0]
    J[2, 2] = -p[2]


@nb.njit(cache=True)
def _simple(t, y, p, out):
    """mrna_simple's ODE: dm = -delta m, dp = kms m - gamma p."""
    out[0] = -p[0] * y[0]
    out[1] = p[2] * y[0] - p[1] * y[1]


@nb.njit(cache=True)
def _forced(t, y, p, out):
    """Non-autonomous linear ODE y' = -y + sin(t) (exercises the df/dt term of Rodas)."""
    out[0] = -p[0] * y[0] + np.sin(t)


@nb.njit(cache=True)
def _robertson(t, y, p, out):
    out[0] = -0.04 * y[0] + 1e4 * y[1] * y[2]
    out[1] = 0.04 * y[0] - 1e4 * y[1] * y[2] - 3e7 * y[1] * y[1]
    out[2] = 3e7 * y[1] * y[1]


@nb.njit(cache=True)
def _oral(t, y, p, out):
    """Oral one-compartment model in amounts: gut, central; p = (ka, ke)."""
    out[0] = -p[0] * y[0]
    out[1] = p[0] * y[0] - p[1] * y[1]


@nb.njit(cache=True)
def _em_drift(t, y, p, out):
    """Ornstein-Uhlenbeck (component 0) and geometric Brownian motion (component 1)."""
    out[0] = p[0] * (p[1] - y[0])
    out[1] = p[3] * y[1]


@nb.njit(cache=True)
def _em_diff(t, y, p, out):
    out[0] = p[2]
    out[1] = p[4] * y[1]


_dopri_lin = S.make_dopri5(_lin)
_rodas_lin = S.make_rodas4(_lin, _lin_jac)
_rodas_lin_fd = S.make_rodas4(_lin)
_dopri_simple = S.make_dopri5(_simple)
_rodas_simple = S.make_rodas4(_simple)
_rodas_forced = S.make_rodas4(_forced)
_rodas_rob = S.make_rodas4(_robertson)
_dopri_rob = S.make_dopri5(_robertson)
_dopri_oral = S.make_dopri5(_oral)
_rodas_oral = S.make_rodas4(_oral)
_em = S.make_euler_maruyama(_em_drift, _em_diff)
_em_dim = S.make_euler_maruyama(_em_drift, _em_diff, dim=2)
_rodas_lin_dim = S.make_rodas4(_lin, _lin_jac, dim=3)


@nb.njit(cache=True)
def _growth(t, y, p, out):
    """y' = p[0] y, counting right-hand-side evaluations in p[1]."""
    p[1] += 1.0
    out[0] = p[0] * y[0]


@nb.njit(cache=True)
def _growth_jac(t, y, p, J):
    J[0, 0] = p[0]


@nb.njit(cache=True)
def _growth_diverges(t, y, p, t_final):
    """Exact proof of blow-up for y' = a y: y(t_final) = y(t) exp(a (t_final - t))."""
    return y[0] > 0.0 and np.log(y[0]) + p[0] * (t_final - t) > np.log(S.DIVERGENCE_BOUND) + 1.0


_rodas_growth = S.make_rodas4(_growth, _growth_jac, dim=1)
_rodas_growth_proof = S.make_rodas4(_growth, _growth_jac, dim=1, diverges=_growth_diverges)


@nb.njit(cache=True)
def _solve_growth(proof, p, t_out):
    e = np.empty(0)
    ei = np.empty(0, np.int64)
    y0 = np.array([1.0])
    if proof:
        return _rodas_growth_proof(p, y0, 0.0, t_out, e, e, ei, 1e-6, 1e-10, 100_000, True)
    return _rodas_growth(p, y0, 0.0, t_out, e, e, ei, 1e-6, 1e-10, 100_000, True)


@nb.njit(cache=True)
def _solve_lin(kind, p, y0, t_out, rtol, atol):
    e = np.empty(0)
    ei = np.empty(0, np.int64)
    if kind == 0:
        return _dopri_lin(p, y0, 0.0, t_out, e, e, ei, rtol, atol, 100_000)
    if kind == 1:
        return _rodas_lin(p, y0, 0.0, t_out, e, e, ei, rtol, atol, 100_000, True)
    if kind == 3:
        return _rodas_lin_dim(p, y0, 0.0, t_out, e, e, ei, rtol, atol, 100_000, True)
    return _rodas_lin_fd(p, y0, 0.0, t_out, e, e, ei, rtol, atol, 100_000, False)


@nb.njit(cache=True)
def _solve_simple(kind, p, y0, t0, t_out, rtol, atol):
    e = np.empty(0)
    ei = np.empty(0, np.int64)
    if kind == 0:
        return _dopri_simple(p, y0, t0, t_out, e, e, ei, rtol, atol, 100_000)
    return _rodas_simple(p, y0, t0, t_out, e, e, ei, rtol, atol, 100_000, True)


@nb.njit(cache=True)
def _solve_forced(p, y0, t_out, rtol, atol):
    e = np.empty(0)
    return _rodas_forced(p, y0, 0.0, t_out, e, e, np.empty(0, np.int64), rtol, atol, 100_000, False)


@nb.njit(cache=True)
def _solve_rob(kind, t_out, rtol, atol, max_steps):
    e = np.empty(0)
    ei = np.empty(0, np.int64)
    y0 = np.array([1.0, 0.0, 0.0])
    p = np.empty(0)
    if kind == 0:
        return _dopri_rob(p, y0, 0.0, t_out, e, e, ei, rtol, atol, max_steps)
    return _rodas_rob(p, y0, 0.0, t_out, e, e, ei, rtol, atol, max_steps, True)


@nb.njit(cache=True)
def _solve_oral(kind, p, t_out, ev_t, ev_a, ev_c, rtol, atol):
    y0 = np.zeros(2)
    if kind == 0:
        return _dopri_oral(p, y0, 0.0, t_out, ev_t, ev_a, ev_c, rtol, atol, 100_000)
    return _rodas_oral(p, y0, 0.0, t_out, ev_t, ev_a, ev_c, rtol, atol, 100_000, True)


@nb.njit(parallel=True, cache=True)
def _em_paths(p, y0, t_out, dt, seeds, clip, dim=False):
    n = seeds.size
    out = np.empty((n, t_out.size, y0.size))
    for i in nb.prange(n):
        if dim:
            Y, _ = _em_dim(p, y0, 0.0, t_out, dt, seeds[i], clip)
        else:
            Y, _ = _em(p, y0, 0.0, t_out, dt, seeds[i], clip)
        out[i] = Y
    return out


@nb.njit(cache=True)
def _normals(seed, n):
    s = S.rng_init(seed)
    out = np.empty(n)
    for i in range(n):
        out[i] = S.rng_normal(s)
    return out


# ---------------------------------------------------------------------------------------------------------------
# deterministic solvers
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [0, 1, 2, 3], ids=["dopri5", "rodas4-jac", "rodas4-fd", "rodas4-jac-dim"])
def test_linear_system_matches_matrix_exponential(kind: int) -> None:
    p = np.array([1.3, 0.7, 50.0])
    y0 = np.array([1.0, 2.0, 0.5])
    t_out = np.array([0.0, 0.013, 0.1, 0.37, 1.0, 2.5, 5.0])
    ref = np.array([expm(_A_LIN * t) @ y0 for t in t_out])
    errors = []
    for rtol in (1e-4, 1e-8):
        Y, status = _solve_lin(kind, p, y0, t_out, rtol, rtol * 1e-3)
        assert status == S.SUCCESS
        errors.append(np.abs(Y - ref).max())
    assert errors[1] < 1e-7
    assert errors[1] < errors[0] / 100  # tolerance proportionality: the error controller works
    np.testing.assert_array_equal(Y[0], y0)  # outputs at t0 are the initial state


@pytest.mark.parametrize("kind", [0, 1], ids=["dopri5", "rodas4"])
def test_mrna_simple_analytic_solution(kind: int) -> None:
    delta, gamma, kms, t0 = 0.3, 0.05, 40.0, 1.7
    p = np.array([delta, gamma, kms])
    Y, status = _solve_simple(kind, p, np.array([1.0, 0.0]), t0, TIME_GRID, 1e-9, 1e-12)
    assert status == S.SUCCESS
    ref = np.array([_protein(t, t0, delta, gamma, kms) for t in TIME_GRID])
    assert np.all(Y[TIME_GRID <= t0, 1] == 0.0)
    after = TIME_GRID > t0 + 0.05
    rel = np.abs(Y[after, 1] - ref[after]) / ref[after]
    assert rel.max() < 1e-6


def test_rodas_nonautonomous_time_derivative() -> None:
    # y' = -k y + sin t, y(0) = 1: y = (k sin t - cos t)/(1+k^2) + (1 + 1/(1+k^2)) e^{-kt}
    k = 2.0
    t_out = np.linspace(0.0, 10.0, 21)
    Y, status = _solve_forced(np.array([k]), np.array([1.0]), t_out, 1e-9, 1e-12)
    ref = (k * np.sin(t_out) - np.cos(t_out)) / (1 + k * k) + (1 + 1 / (1 + k * k)) * np.exp(-k * t_out)
    assert status == S.SUCCESS
    assert np.abs(Y[:, 0] - ref).max() < 1e-7


def test_robertson_stiff() -> None:
    t_out = np.array([1e-3, 1e-1, 1.0, 10.0, 1e2, 1e3, 1e4, 1e5])
    Y, status = _solve_rob(1, t_out, 1e-7, 1e-12, 5000)
    assert status == S.SUCCESS
    ref = solve_ivp(lambda t, y: [-0.04 * y[0] + 1e4 * y[1] * y[2],
                                  0.04 * y[0] - 1e4 * y[1] * y[2] - 3e7 * y[1] ** 2, 3e7 * y[1] ** 2],
                    (0.0, 1e5), [1.0, 0.0, 0.0], method="Radau", rtol=1e-11, atol=1e-16, t_eval=t_out,
                    jac=lambda t, y: [[-0.04, 1e4 * y[2], 1e4 * y[1]],
                                      [0.04, -1e4 * y[2] - 6e7 * y[1], -1e4 * y[1]],
                                      [0.0, 6e7 * y[1], 0.0]]).y.T
    rel = np.abs(Y - ref) / (np.abs(ref) + 1e-20)
    assert rel.max() < 1e-4
    np.testing.assert_allclose(Y.sum(axis=1), 1.0, atol=1e-8)  # mass conservation
    # the explicit method cannot do this within the same step budget: this problem is stiff
    _, status_explicit = _solve_rob(0, t_out, 1e-7, 1e-12, 5000)
    assert status_explicit == S.TOO_MANY_STEPS


@pytest.mark.parametrize("kind", [0, 1], ids=["dopri5", "rodas4"])
def test_dose_events_match_superposition(kind: int) -> None:
    ka, ke, V = 1.4, 0.11, 30.0
    ev_t = np.array([0.0, 12.0, 24.0])
    ev_a = np.array([300.0, 150.0, 300.0])
    ev_c = np.zeros(3, dtype=np.int64)
    t_out = np.array([0.0, 0.5, 1.0, 3.0, 11.9, 12.0, 12.5, 18.0, 24.0, 25.0, 36.0])
    Y, status = _solve_oral(kind, np.array([ka, ke]), t_out, ev_t, ev_a, ev_c, 1e-9, 1e-10)
    assert status == S.SUCCESS
    conc = Y[:, 1] / V
    ref = np.array([oral_1cmt_concentration(t, ev_t, ev_a, ka, ke, V) for t in t_out])
    np.testing.assert_allclose(conc, ref, rtol=1e-6, atol=1e-9)
    assert conc[0] == 0.0  # output at a dose time is the pre-dose state
    assert Y[5, 0] == pytest.approx(300.0 * np.exp(-ka * 12.0), abs=1e-8)  # gut just before 2nd dose


def test_rodas_fixed_dim_matches_generic() -> None:
    p = np.array([1.3, 0.7, 50.0])
    y0 = np.array([1.0, 2.0, 0.5])
    t_out = np.linspace(0.0, 5.0, 31)
    Y1, s1 = _solve_lin(1, p, y0, t_out, 1e-6, 1e-10)
    Y3, s3 = _solve_lin(3, p, y0, t_out, 1e-6, 1e-10)
    assert s1 == s3 == S.SUCCESS
    np.testing.assert_allclose(Y3, Y1, rtol=1e-12, atol=1e-15)  # same steps; only the rounding may differ
    with pytest.raises(ValueError):
        _solve_lin(3, p, np.ones(2), t_out, 1e-6, 1e-10)


def test_rodas_divergence_proof_stops_early_with_the_same_result() -> None:
    t_out = np.linspace(0.0, 1000.0, 11)  # y = e^t passes 1e300 at t = 690.8
    counts = []
    for proof in (False, True):
        p = np.array([1.0, 0.0])
        Y, status = _solve_growth(proof, p, t_out)
        assert status == S.DIVERGED
        assert np.isnan(Y).all()
        counts.append(p[1])
    assert counts[1] < counts[0] / 10  # the proof fires long before the bound is reached
    # a decaying solution never triggers it: identical output, and the closed form
    ys = []
    for proof in (False, True):
        Y, status = _solve_growth(proof, np.array([-0.5, 0.0]), t_out[:4])
        assert status == S.SUCCESS
        ys.append(Y[:, 0])
    np.testing.assert_array_equal(ys[0], ys[1])
    np.testing.assert_allclose(ys[1], np.exp(-0.5 * t_out[:4]), rtol=1e-5, atol=1e-10)


def test_failure_gives_nan_rows_not_exceptions() -> None:
    Y, status = _solve_rob(0, np.array([1.0, 1e5]), 1e-7, 1e-12, 50)
    assert status == S.TOO_MANY_STEPS
    assert np.isnan(Y).all()


# ---------------------------------------------------------------------------------------------------------------
# Euler-Maruyama
# ---------------------------------------------------------------------------------------------------------------


def test_normal_generator_distribution() -> None:
    z = _normals(12345, 400_000)
    assert abs(z.mean()) < 0.01
    assert abs(z.var() - 1.0) < 0.01
    assert abs(np.mean(z**4) - 3.0) < 0.05
    assert abs(np.corrcoef(z[:-1], z[1:])[0, 1]) < 0.01
    assert stats.kstest(z, "norm").pvalue > 1e-3
    # the tails beyond the ziggurat's base layer (R = 3.44) have the right mass
    assert abs(np.mean(np.abs(z) > 3.442619855899) / (2 * stats.norm.sf(3.442619855899)) - 1) < 0.15
    assert not np.array_equal(_normals(1, 100), _normals(2, 100))


def test_euler_maruyama_weak_moments_ou_and_gbm() -> None:
    theta, mu, s, a, b = 1.5, 2.0, 0.8, 0.3, 0.4
    p = np.array([theta, mu, s, a, b])
    y0 = np.array([0.0, 1.0])
    t_out = np.array([0.5, 1.0])
    n = 40_000
    paths = _em_paths(p, y0, t_out, 0.005, np.arange(n, dtype=np.int64) + 7, False)
    x = paths[:, 1, :]  # t = 1
    t = 1.0
    ou_mean = mu + (y0[0] - mu) * np.exp(-theta * t)
    ou_var = s * s / (2 * theta) * (1 - np.exp(-2 * theta * t))
    gbm_mean = np.exp(a * t)
    gbm_var = np.exp(2 * a * t) * (np.exp(b * b * t) - 1)
    # Monte Carlo standard errors; the O(dt) bias at dt=0.005 is far below them
    assert abs(x[:, 0].mean() - ou_mean) < 4 * np.sqrt(ou_var / n) + 0.005
    assert abs(x[:, 0].var() - ou_var) < 4 * ou_var * np.sqrt(2 / n) + 0.005
    assert abs(x[:, 1].mean() - gbm_mean) < 4 * np.sqrt(gbm_var / n) + 0.005
    assert abs(x[:, 1].var() - gbm_var) < 0.05 * gbm_var
    # independence between the two noise components
    assert abs(np.corrcoef(x[:, 0], x[:, 1])[0, 1]) < 0.03


def test_euler_maruyama_clipping_and_reproducibility() -> None:
    p = np.array([0.0, 0.0, 3.0, 0.0, 0.0])  # driftless OU: plain Brownian motion with sd 3
    y0 = np.array([0.5, 1.0])
    t_out = np.linspace(0.1, 2.0, 20)
    seeds = np.arange(200, dtype=np.int64)
    free = _em_paths(p, y0, t_out, 0.01, seeds, False)
    clipped = _em_paths(p, y0, t_out, 0.01, seeds, True)
    assert (free[..., 0] < 0).any()
    assert (clipped >= 0).all()
    again = _em_paths(p, y0, t_out, 0.01, seeds, True)
    np.testing.assert_array_equal(clipped, again)  # same seeds, same paths
    # the fixed-dimension build is the same solver: same normals, same paths
    np.testing.assert_allclose(_em_paths(p, y0, t_out, 0.01, seeds, True, True), clipped, rtol=1e-13, atol=1e-13)
    assert np.unique(clipped[:, -1, 0]).size > 150  # different seeds, different paths
