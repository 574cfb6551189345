"""Closed-form linear pharmacokinetics (1- and 2-compartment, IV and first-order oral) with superposition over
arbitrary dosing records: boluses, zero-order infusions (into the central compartment or the depot), steady-state
doses (NONMEM SS=1), resets (EVID 3/4) and an absorption lag time (ALAG1, depot doses only).

Models (``model_code``) and parameter vectors (natural scale, float64, one row per individual):

    ONE_CMT_IV   = 0   [CL, V, tlag]                  (tlag accepted and ignored, may be left out: no depot)
    ONE_CMT_ORAL = 1   [CL, V, ka, tlag]
    TWO_CMT_IV   = 2   [CL, V1, Q, V2, tlag]
    TWO_CMT_ORAL = 3   [CL, V1, Q, V2, ka, tlag]

Any consistent units (CL and Q in volume/time, ka in 1/time). Output: concentration in the central compartment,
amount / V (or V1). Compartments, indexed alike in every model: 0 depot, 1 central, 2 peripheral.

Dose records: float64 ``[m, 7]`` per individual, sorted by time, columns

    time, amount, route (0 depot, 1 central), duration (0 bolus, > 0 zero-order input of amount over duration),
    ss (1: steady-state dose with interval ii), ii, reset (1: empty the system at this record's time first).

Timing conventions:

* A depot dose starts at ``time + tlag``; a central dose at ``time`` (never lagged).
* A dose's own contribution counts for t strictly after its (lagged) start: an observation at exactly a bolus time
  sees the pre-dose level.
* A reset at time r (``reset = 1`` or ``ss = 1``) removes, for every t >= r, the contributions of all *earlier
  records* (smaller row index), including lagged doses not yet started and infusions still running. A dose in the
  resetting record itself is applied after the reset; a record may have amount 0 (pure reset).
* ``ss = 1`` (NONMEM SS=1): reset at the record's time, then the state is that of this dose repeated every ``ii``
  forever, the record's own (lagged) dose being the last of the infinite train: contribution(t) = sum_{n>=0}
  single(t - start + n ii), single(tau) = 0 for tau <= 0. So at t == time the SS dose contributes its pre-dose
  steady-state trough. No implicit doses follow it. SS infusions may last longer than ``ii`` (overlapping
  infusions at steady state; the cost grows like duration / ii, refused beyond 1000 ii); a lag longer than ``ii``
  is allowed (train members then start after the record's time).

Method (why it is stable): every quantity is written as a non-negative combination of convolutions of decaying
exponentials, E_m(x_0..x_m; t) = (e^{-x_0 s} * ... * e^{-x_m s})(t) = |divided difference of e^{-x t} over the
rates|, evaluated with only exponentials of non-positive arguments and expm1: a Taylor series when all scaled rates
x t lie within 1 of each other, otherwise the divided-difference recursion, which then subtracts numbers at least
~3 times apart (under one digit lost). Nothing subtracts nearly equal exponentials, so ka = k, ka equal to an
eigenvalue, Q -> 0 and nearly equal eigenvalues need no special cases. The 2-compartment eigenvalues and the gaps
alpha - (k10 + k12), alpha - k21 come from cancellation-free roots. Concentrations are sums of non-negative terms:
relative errors stay at the level of the rounding of the inputs (about 1e-14 against 60-digit arithmetic). The steady-state sum (I - exp(M ii))^{-1} x is
a Grassmann-Taksar-Heyman elimination on a column-diagonally-dominant M-matrix whose column slack is the fraction
eliminated over one interval (k10 times a cumulative exposure), so it involves no subtraction either.

Cost: :func:`conc_at` is plain superposition, O(m) closed forms per time. :func:`predict_batch` sweeps each
individual's sorted times once: records whose input is over are folded into one state vector carried forward by the
(non-negative) propagator, so an individual costs O(m + T) closed forms (unsorted times fall back to O(m T)).

Invalid input does not raise inside numba: the individual's concentrations are NaN (a non-finite time gives NaN at
that time only). :func:`check_batch` gives the
status code and offending record per individual, :func:`validate` raises a ``ValueError`` naming them.
"""

from __future__ import annotations

import numba as nb
import numpy as np

ONE_CMT_IV = 0
ONE_CMT_ORAL = 1
TWO_CMT_IV = 2
TWO_CMT_ORAL = 3

#: dose-record columns
TIME, AMT, ROUTE, DUR, SS, II, RESET = 0, 1, 2, 3, 4, 5, 6
DEPOT, CENTRAL = 0, 1

#: status codes of :func:`check_batch` (0: valid)
OK = 0
BAD_MODEL = 1
BAD_PARAMS = 2
BAD_N_DOSES = 3
BAD_RECORD = 4
BAD_ROUTE = 5
UNSORTED = 6
BAD_II = 7

STATUS_MESSAGES = {
    OK: "ok",
    BAD_MODEL: "unknown model code (0-3)",
    BAD_PARAMS: "parameters must be finite with CL, V (V1, V2), ka > 0, Q >= 0, tlag >= 0, and params must have "
                "enough columns",
    BAD_N_DOSES: "n_doses must lie in [0, doses.shape[1]]",
    BAD_RECORD: "dose record: time/amount/duration must be finite, amount >= 0, duration >= 0, ss and reset 0 or 1",
    BAD_ROUTE: "dose record: route must be 1 (central), or 0 (depot) in an oral model",
    UNSORTED: "dose records must be sorted by time",
    BAD_II: "steady-state dose record: ii must be finite and > 0, and an SS infusion may last at most 1000 ii",
}

_PARAM_NAMES = {
    ONE_CMT_IV: ("CL", "V", "tlag"),
    ONE_CMT_ORAL: ("CL", "V", "ka", "tlag"),
    TWO_CMT_IV: ("CL", "V1", "Q", "V2", "tlag"),
    TWO_CMT_ORAL: ("CL", "V1", "Q", "V2", "ka", "tlag"),
}

#: below this spread of the scaled rates (rate * t) divided differences are summed as a Taylor series
_SERIES_SPREAD = 1.0
_N_CST = 10
#: an SS infusion may overlap at most this many later members of its train (each costs one closed form)
_MAX_SS_OVERLAP = 1000.0
_N_WORK = 10


def param_names(model_code: int) -> tuple[str, ...]:
    """Parameter names, in the order of the parameter vector, of model ``model_code``."""
    if model_code not in _PARAM_NAMES:
        raise ValueError(f"unknown model code {model_code!r}; expected one of {sorted(_PARAM_NAMES)}")
    return _PARAM_NAMES[model_code]


# ---------------------------------------------------------------------------------------------------------------
# divided differences of exp(-u): D_m(u_0..u_m) = (-1)^m e^{-u}[u_0..u_m] > 0 for u >= 0
# ---------------------------------------------------------------------------------------------------------------


@nb.njit(cache=True, inline="always")
def _phi1(s: float) -> float:
    """(1 - e^{-s}) / s for s >= 0 (1 at s = 0), exact to rounding via expm1."""
    if s == 0.0:
        return 1.0
    return -np.expm1(-s) / s


@nb.njit(cache=True, inline="always")
def _d1s(a: float, b: float) -> float:
    """D_1(a, b) = (e^{-a} - e^{-b}) / (b - a) for 0 <= a <= b."""
    return np.exp(-a) * _phi1(b - a)


@nb.njit(cache=True)
def _ser2(v1: float, v2: float) -> float:
    """D_2(0, v1, v2) for 0 <= v1 <= v2 < ~1: sum_k (-1)^k h_k(v1, v2) / (k + 2)! (complete symmetric h_k)."""
    h1 = 1.0
    h2 = 1.0
    fact = 2.0
    s = 0.5
    sign = 1.0
    for k in range(1, 30):
        h1 *= v1
        h2 = h1 + v2 * h2
        fact *= k + 2
        sign = -sign
        term = h2 / fact
        s += sign * term
        if term < 1e-17 * s:
            break
    return s


@nb.njit(cache=True)
def _ser3(v1: float, v2: float, v3: float) -> float:
    """D_3(0, v1, v2, v3) for 0 <= v1 <= v2 <= v3 < ~1, as :func:`_ser2`."""
    h1 = 1.0
    h2 = 1.0
    h3 = 1.0
    fact = 6.0
    s = 1.0 / 6.0
    sign = 1.0
    for k in range(1, 30):
        h1 *= v1
        h2 = h1 + v2 * h2
        h3 = h2 + v3 * h3
        fact *= k + 3
        sign = -sign
        term = h3 / fact
        s += sign * term
        if term < 1e-17 * s:
            break
    return s


@nb.njit(cache=True)
def _d2s(a: float, b: float, c: float) -> float:
    """D_2(a, b, c) for 0 <= a <= b <= c: series when the spread is small, else the (benign) recursion."""
    s = c - a
    if s < _SERIES_SPREAD:
        return np.exp(-a) * _ser2(b - a, s)
    return (_d1s(a, b) - _d1s(b, c)) / s


@nb.njit(cache=True)
def _d3s(a: float, b: float, c: float, d: float) -> float:
    """D_3(a, b, c, d) for 0 <= a <= b <= c <= d, as :func:`_d2s`."""
    s = d - a
    if s < _SERIES_SPREAD:
        return np.exp(-a) * _ser3(b - a, c - a, s)
    return (_d2s(a, b, c) - _d2s(b, c, d)) / s


@nb.njit(cache=True, inline="always")
def _sort3(a: float, b: float, c: float):
    if a > b:
        a, b = b, a
    if b > c:
        b, c = c, b
    if a > b:
        a, b = b, a
    return a, b, c


@nb.njit(cache=True, inline="always")
def _sort4(a: float, b: float, c: float, d: float):
    if a > b:
        a, b = b, a
    if c > d:
        c, d = d, c
    if a > c:
        a, c = c, a
    if b > d:
        b, d = d, b
    if b > c:
        b, c = c, b
    return a, b, c, d


@nb.njit(cache=True)
def _e1(x: float, y: float, t: float) -> float:
    """(e^{-x s} * e^{-y s})(t) = (e^{-x t} - e^{-y t}) / (y - x), rates >= 0, t >= 0."""
    u = x * t
    v = y * t
    if u > v:
        u, v = v, u
    return t * _d1s(u, v)


@nb.njit(cache=True)
def _e2(x: float, y: float, z: float, t: float) -> float:
    """Convolution of three decaying exponentials at t (second divided difference of e^{-x t}), >= 0."""
    a, b, c = _sort3(x * t, y * t, z * t)
    return t * t * _d2s(a, b, c)


@nb.njit(cache=True)
def _e3(w: float, x: float, y: float, z: float, t: float) -> float:
    """Convolution of four decaying exponentials at t (minus the third divided difference of e^{-x t}), >= 0."""
    a, b, c, d = _sort4(w * t, x * t, y * t, z * t)
    return t * t * t * _d3s(a, b, c, d)


# ---------------------------------------------------------------------------------------------------------------
# model constants, propagator rows, infusion columns, steady-state sums
# ---------------------------------------------------------------------------------------------------------------
# cst: 0 k10, 1 k12, 2 k21, 3 alpha, 4 beta, 5 g1 = alpha - k10 - k12 = k21 - beta, 6 g2 = alpha - k21, 7 ka,
#      8 V (central volume), 9 tlag (0 for IV models). 1-cmt: alpha = k10, beta = g1 = k12 = k21 = 0, g2 = k10.


@nb.njit(cache=True)
def _constants(model_code: int, p: np.ndarray, cst: np.ndarray) -> int:
    """Fill ``cst`` from the parameter vector ``p``; returns a status code (OK or BAD_MODEL/BAD_PARAMS)."""
    if model_code < 0 or model_code > 3:
        return BAD_MODEL
    two = model_code >= TWO_CMT_IV
    oral = model_code == ONE_CMT_ORAL or model_code == TWO_CMT_ORAL
    # IV models ignore tlag, so their last column is optional
    npar = 2 + (2 if two else 0) + (2 if oral else 0)
    if p.size < npar:
        return BAD_PARAMS
    CL = p[0]
    V = p[1]
    Q = 0.0
    V2 = 1.0
    j = 2
    if two:
        Q = p[2]
        V2 = p[3]
        j = 4
    ka = 0.0
    if oral:
        ka = p[j]
        j += 1
    tlag = p[j] if oral else 0.0
    for x in (CL, V, Q, V2, ka, tlag):
        if not np.isfinite(x):
            return BAD_PARAMS
    if not (CL > 0.0 and V > 0.0 and Q >= 0.0 and V2 > 0.0 and tlag >= 0.0) or (oral and not ka > 0.0):
        return BAD_PARAMS
    k10 = CL / V
    k12 = Q / V
    k21 = Q / V2
    # eigenvalues alpha >= beta of [[k10 + k12, -k21], [-k12, k21]]; g1 = alpha - (k10 + k12), g2 = alpha - k21
    # are the roots of g^2 - sqrt(disc) g + k12 k21 = 0, taken without cancellation
    e = k10 + k12 - k21
    sq = np.hypot(e, 2.0 * np.sqrt(k12) * np.sqrt(k21))
    big = 0.5 * (sq + abs(e))
    small = (k12 / big) * k21 if big > 0.0 else 0.0
    if e >= 0.0:
        g1 = small
        g2 = big
    else:
        g1 = big
        g2 = small
    alpha = k21 + g2
    beta = (k10 / alpha) * k21
    cst[0] = k10
    cst[1] = k12
    cst[2] = k21
    cst[3] = alpha
    cst[4] = beta
    cst[5] = g1
    cst[6] = g2
    cst[7] = ka
    cst[8] = V
    cst[9] = tlag
    return OK


@nb.njit(cache=True)
def _prow(two: bool, oral: bool, cst: np.ndarray, t: float, depot: bool, cp: bool):
    """Central row (from depot, central, peripheral) of the free propagator exp(M t), t > 0; all entries >= 0.

    Only the entries asked for are computed (``depot``: from the depot; ``cp``: from central and peripheral), the
    others are 0: a depot bolus needs one entry, and skipping the rest halves the cost of the 2-cmt oral model.
    """
    al = cst[3]
    p0 = 0.0
    p1 = 0.0
    p2 = 0.0
    if two:
        g1 = cst[5]
        if cp:
            e1ab = _e1(al, cst[4], t)
            p1 = np.exp(-al * t) + g1 * e1ab
            p2 = cst[2] * e1ab
        if oral and depot:
            ka = cst[7]
            p0 = _e1(ka, al, t)
            if g1 > 0.0:
                p0 += g1 * _e2(cst[4], ka, al, t)
            p0 *= ka
    else:
        if cp:
            p1 = np.exp(-al * t)
        if oral and depot:
            p0 = cst[7] * _e1(cst[7], al, t)
    return p0, p1, p2


@nb.njit(cache=True)
def _grow(two: bool, oral: bool, cst: np.ndarray, t: float, depot: bool, cp: bool):
    """Central row of G(t) = int_0^t exp(M s) ds (central amount after a unit-rate input of duration t); flags as
    in :func:`_prow`."""
    al = cst[3]
    g0 = 0.0
    gc = 0.0
    g2 = 0.0
    if two:
        g1 = cst[5]
        if cp:
            e2ab = _e2(0.0, al, cst[4], t)
            gc = _e1(0.0, al, t) + g1 * e2ab
            g2 = cst[2] * e2ab
        if oral and depot:
            ka = cst[7]
            g0 = _e2(0.0, ka, al, t)
            if g1 > 0.0:
                g0 += g1 * _e3(0.0, cst[4], ka, al, t)
            g0 *= ka
    else:
        if cp:
            gc = _e1(0.0, al, t)
        if oral and depot:
            g0 = cst[7] * _e2(0.0, cst[7], al, t)
    return g0, gc, g2


@nb.njit(cache=True)
def _gcol(two: bool, oral: bool, cst: np.ndarray, route: int, t: float):
    """Column ``route`` of G(t): amounts (depot, central, peripheral) after a unit-rate input of duration t."""
    al = cst[3]
    if route == CENTRAL:
        if two:
            e2ab = _e2(0.0, al, cst[4], t)
            return 0.0, _e1(0.0, al, t) + cst[5] * e2ab, cst[1] * e2ab
        return 0.0, _e1(0.0, al, t), 0.0
    ka = cst[7]
    g0, _, _ = _grow(two, oral, cst, t, True, False)
    gp = 0.0
    if two:
        gp = cst[1] * ka * _e3(0.0, ka, al, cst[4], t)
    return _e1(0.0, ka, t), g0, gp


@nb.njit(cache=True)
def _ss_sum(two: bool, oral: bool, cst: np.ndarray, ii: float, x0: float, x1: float, x2: float,
            O: np.ndarray, v: np.ndarray, r: np.ndarray):
    """y = sum_{k>=0} exp(M k ii) x = (I - exp(M ii))^{-1} x for x >= 0, by GTH elimination (no subtractions).

    I - P (P = exp(M ii)) has off-diagonals -P_ij and column sums v_j = k10 G_1j(ii) (the fraction of a unit in
    compartment j eliminated within ii); pivots are rebuilt as slack + off-diagonal mass, so every operation adds or
    multiplies non-negative numbers and y is accurate entry by entry however close P is to I.
    """
    lo = 1 if not oral else 0
    hi = 2 if two else 1
    for i in range(3):
        for j in range(3):
            O[i, j] = 0.0
    p0, _, p2 = _prow(two, oral, cst, ii, True, True)
    G0, G1, G2 = _grow(two, oral, cst, ii, True, True)
    k10 = cst[0]
    v[0] = k10 * G0
    v[1] = k10 * G1
    v[2] = k10 * G2
    O[1, 0] = p0
    O[1, 2] = p2
    if two:
        e1ab = _e1(cst[3], cst[4], ii)
        O[2, 1] = cst[1] * e1ab
        if oral:
            O[2, 0] = cst[1] * cst[7] * _e2(cst[7], cst[3], cst[4], ii)
    r[0] = x0
    r[1] = x1
    r[2] = x2
    for k in range(lo, hi):
        piv = v[k]
        for i in range(k + 1, hi + 1):
            piv += O[i, k]
        O[k, k] = piv
        if piv > 0.0:
            for i in range(k + 1, hi + 1):
                lik = O[i, k] / piv
                if lik != 0.0:
                    for j in range(k + 1, hi + 1):
                        if j != i:
                            O[i, j] += lik * O[k, j]
                    r[i] += lik * r[k]
            for j in range(k + 1, hi + 1):
                v[j] += O[k, j] * (v[k] / piv)
    O[hi, hi] = v[hi]
    for k in range(hi, lo - 1, -1):
        s = r[k]
        for j in range(k + 1, hi + 1):
            s += O[k, j] * r[j]
        # a zero pivot means the compartment is unreachable and has no outflow (Q = 0): nothing accumulates there
        r[k] = s / O[k, k] if O[k, k] > 0.0 else 0.0
    return r[0], r[1], r[2]


# ---------------------------------------------------------------------------------------------------------------
# per-individual preparation and evaluation
# ---------------------------------------------------------------------------------------------------------------
# work[i]: 0 start (lagged), 1 kill time (first later reset), 2:5 state at the end of the input (amount e_route for a
#          bolus, rate G(dur) e_route for an infusion), 5:8 steady-state sum (I - exp(M ii))^{-1} (that state);
#          8, 9: end of the input and "folded" flag, used by the sweep


@nb.njit(cache=True)
def _check_records(model_code: int, doses: np.ndarray, m: int):
    """(status, offending record) of the first ``m`` dose records."""
    if m < 0 or m > doses.shape[0]:
        return BAD_N_DOSES, -1
    oral = model_code == ONE_CMT_ORAL or model_code == TWO_CMT_ORAL
    prev = -np.inf
    for i in range(m):
        for c in range(7):
            if not np.isfinite(doses[i, c]) and not (c == II and doses[i, SS] == 0.0):
                return BAD_RECORD, i
        if doses[i, AMT] < 0.0 or doses[i, DUR] < 0.0:
            return BAD_RECORD, i
        if (doses[i, SS] != 0.0 and doses[i, SS] != 1.0) or (doses[i, RESET] != 0.0 and doses[i, RESET] != 1.0):
            return BAD_RECORD, i
        route = doses[i, ROUTE]
        if not (route == CENTRAL or (route == DEPOT and oral)):
            return BAD_ROUTE, i
        if doses[i, SS] == 1.0 and not (doses[i, II] > 0.0 and doses[i, DUR] <= _MAX_SS_OVERLAP * doses[i, II]):
            return BAD_II, i
        if doses[i, TIME] < prev:
            return UNSORTED, i
        prev = doses[i, TIME]
    return OK, -1


@nb.njit(cache=True)
def _prepare(model_code: int, p: np.ndarray, doses: np.ndarray, m: int, cst: np.ndarray, work: np.ndarray,
             O: np.ndarray, v: np.ndarray, r: np.ndarray) -> int:
    """Validate one individual and fill ``cst`` and ``work[:m]``; returns a status code."""
    st = _constants(model_code, p, cst)
    if st != OK:
        return st
    st, _ = _check_records(model_code, doses, m)
    if st != OK:
        return st
    two = model_code >= TWO_CMT_IV
    oral = model_code == ONE_CMT_ORAL or model_code == TWO_CMT_ORAL
    kill = np.inf
    for i in range(m - 1, -1, -1):
        work[i, 1] = kill
        if doses[i, RESET] != 0.0 or doses[i, SS] != 0.0:
            kill = doses[i, TIME]
    for i in range(m):
        route = int(doses[i, ROUTE])
        amt = doses[i, AMT]
        dur = doses[i, DUR]
        work[i, 0] = doses[i, TIME] + (cst[9] if route == DEPOT else 0.0)
        x0 = 0.0
        x1 = 0.0
        x2 = 0.0
        if dur > 0.0:
            x0, x1, x2 = _gcol(two, oral, cst, route, dur)
            rate = amt / dur
            x0 *= rate
            x1 *= rate
            x2 *= rate
        elif route == DEPOT:
            x0 = amt
        else:
            x1 = amt
        work[i, 2] = x0
        work[i, 3] = x1
        work[i, 4] = x2
        if doses[i, SS] != 0.0 and amt > 0.0:
            y0, y1, y2 = _ss_sum(two, oral, cst, doses[i, II], x0, x1, x2, O, v, r)
            work[i, 5] = y0
            work[i, 6] = y1
            work[i, 7] = y2
        else:
            work[i, 5] = 0.0
            work[i, 6] = 0.0
            work[i, 7] = 0.0
    return OK


@nb.njit(cache=True)
def _ss_response(two: bool, oral: bool, cst: np.ndarray, tau: float, dur: float, ii: float, rate: float,
                 route: int, y0: float, y1: float, y2: float) -> float:
    """Central amount of sum_{n>=0} single(tau + n ii) for a steady-state train (y: its steady-state sum)."""
    # n1: first member whose input has ended (tau + n ii > dur); members n < n1 are still infusing (or not started)
    if tau > dur:
        n1 = 0
    else:
        n1 = int(np.floor((dur - tau) / ii)) + 1
        while n1 > 0 and tau + (n1 - 1) * ii > dur:
            n1 -= 1
        while tau + n1 * ii <= dur:
            n1 += 1
    total = 0.0
    if dur > 0.0:
        if tau > 0.0:
            n0 = 0
        else:
            n0 = int(np.floor(-tau / ii)) + 1
            while n0 > 0 and tau + (n0 - 1) * ii > 0.0:
                n0 -= 1
            while tau + n0 * ii <= 0.0:
                n0 += 1
        for n in range(n0, n1):
            g0, gc, _ = _grow(two, oral, cst, tau + n * ii, route == DEPOT, route == CENTRAL)
            total += rate * (g0 if route == DEPOT else gc)
    p0, p1, p2 = _prow(two, oral, cst, tau + n1 * ii - dur, route == DEPOT, True)
    return total + p0 * y0 + p1 * y1 + p2 * y2


@nb.njit(cache=True)
def _record_amount(two: bool, oral: bool, cst: np.ndarray, doses: np.ndarray, work: np.ndarray, i: int,
                   t: float) -> float:
    """Central amount at t due to record i (not reset before t, time <= t), by its closed form."""
    amt = doses[i, AMT]
    if amt == 0.0:
        return 0.0
    tau = t - work[i, 0]
    dur = doses[i, DUR]
    route = int(doses[i, ROUTE])
    if doses[i, SS] != 0.0:
        return _ss_response(two, oral, cst, tau, dur, doses[i, II], amt / dur if dur > 0.0 else 0.0, route,
                            work[i, 5], work[i, 6], work[i, 7])
    if not tau > 0.0:
        return 0.0
    if dur == 0.0:
        p0, p1, p2 = _prow(two, oral, cst, tau, route == DEPOT, route == CENTRAL)
        return amt * (p0 if route == DEPOT else p1)
    if tau <= dur:
        g0, gc, _ = _grow(two, oral, cst, tau, route == DEPOT, route == CENTRAL)
        return (amt / dur) * (g0 if route == DEPOT else gc)
    p0, p1, p2 = _prow(two, oral, cst, tau - dur, route == DEPOT, True)
    return p0 * work[i, 2] + p1 * work[i, 3] + p2 * work[i, 4]


@nb.njit(cache=True)
def _first_alive(work: np.ndarray, m: int, t: float) -> int:
    """First record not removed by a reset at or before t (kill times are non-decreasing, so the removed records
    form a prefix)."""
    lo = 0
    hi = m
    while lo < hi:
        mid = (lo + hi) // 2
        if work[mid, 1] <= t:
            lo = mid + 1
        else:
            hi = mid
    return lo


@nb.njit(cache=True)
def _conc(two: bool, oral: bool, cst: np.ndarray, doses: np.ndarray, m: int, work: np.ndarray, t: float) -> float:
    """Central concentration at t from prepared records: plain superposition, O(m) closed forms (NaN if t is not
    finite)."""
    if not np.isfinite(t):
        return np.nan
    a = 0.0
    for i in range(_first_alive(work, m, t), m):
        if doses[i, TIME] > t:
            break
        a += _record_amount(two, oral, cst, doses, work, i, t)
    return a / cst[8]


@nb.njit(cache=True)
def _propagate(two: bool, oral: bool, cst: np.ndarray, t: float, s0: float, s1: float, s2: float):
    """exp(M t) (s0, s1, s2) for t > 0: the full propagator applied to a state (entries >= 0, no subtraction)."""
    al = cst[3]
    n0 = 0.0
    n1 = 0.0
    n2 = 0.0
    if s1 != 0.0 or s2 != 0.0:
        if two:
            be = cst[4]
            e1ab = _e1(al, be, t)
            ea = np.exp(-al * t)
            n1 = (ea + cst[5] * e1ab) * s1 + cst[2] * e1ab * s2
            n2 = cst[1] * e1ab * s1 + (ea + cst[6] * e1ab) * s2
        else:
            n1 = np.exp(-al * t) * s1
    if oral and s0 != 0.0:
        ka = cst[7]
        n0 = np.exp(-ka * t) * s0
        if two:
            e2 = _e2(cst[4], ka, al, t)
            n1 += ka * (_e1(ka, al, t) + cst[5] * e2) * s0
            n2 += cst[1] * ka * e2 * s0
        else:
            n1 += ka * _e1(ka, al, t) * s0
    return n0, n1, n2


@nb.njit(cache=True)
def _sweep(two: bool, oral: bool, cst: np.ndarray, doses: np.ndarray, m: int, work: np.ndarray, times: np.ndarray,
           mask: np.ndarray, out: np.ndarray) -> None:
    """Concentrations at sorted (masked) times in one pass: records whose input is over (t > start + duration) are
    folded into one state vector carried from observation to observation, so each observation costs one
    propagation plus the records still infusing or not yet folded (O(m + T) closed forms instead of O(m T)).
    Unsorted (or non-finite) masked times fall back to :func:`_conc` per time."""
    prev = -np.inf
    for j in range(times.size):
        if mask[j]:
            if not times[j] >= prev:
                for jj in range(times.size):
                    if mask[jj]:
                        out[jj] = _conc(two, oral, cst, doses, m, work, times[jj])
                return
            prev = times[j]
    for i in range(m):
        work[i, 8] = work[i, 0] + doses[i, DUR]  # end of the record's input (of the train's last member if SS)
        work[i, 9] = 0.0  # folded into the state
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    t_s = -np.inf  # time of the folded state
    alive = 0
    for j in range(times.size):
        if not mask[j]:
            continue
        t = times[j]
        first = _first_alive(work, m, t)
        if first > alive:  # a reset since the last observation: everything folded so far was removed
            s0 = 0.0
            s1 = 0.0
            s2 = 0.0
            alive = first
        if t > t_s and (s0 != 0.0 or s1 != 0.0 or s2 != 0.0):
            s0, s1, s2 = _propagate(two, oral, cst, t - t_s, s0, s1, s2)
        t_s = t
        a = 0.0
        for i in range(first, m):
            if doses[i, TIME] > t:
                break
            if work[i, 9] != 0.0 or doses[i, AMT] == 0.0:
                continue
            if work[i, 8] < t:
                # input over: from now on a free decay of its end state (the steady-state sum for an SS train)
                c = 5 if doses[i, SS] != 0.0 else 2
                n0, n1, n2 = _propagate(two, oral, cst, t - work[i, 8], work[i, c], work[i, c + 1], work[i, c + 2])
                s0 += n0
                s1 += n1
                s2 += n2
                work[i, 9] = 1.0
            else:
                a += _record_amount(two, oral, cst, doses, work, i, t)
        out[j] = (a + s1) / cst[8]


# ---------------------------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------------------------


@nb.njit(cache=True)
def conc_at(model_code: int, params: np.ndarray, doses: np.ndarray, n_doses: int, t: float) -> float:
    """Central concentration at time ``t`` for one individual (``doses[:n_doses]`` used); NaN on invalid input."""
    cst = np.empty(_N_CST)
    work = np.empty((max(n_doses, 1), _N_WORK))
    O = np.empty((3, 3))
    v = np.empty(3)
    r = np.empty(3)
    if _prepare(model_code, params, doses, n_doses, cst, work, O, v, r) != OK:
        return np.nan
    two = model_code >= TWO_CMT_IV
    oral = model_code == ONE_CMT_ORAL or model_code == TWO_CMT_ORAL
    return _conc(two, oral, cst, doses, n_doses, work, t)


@nb.njit(parallel=True, cache=True)
def predict_batch(model_code: int, params: np.ndarray, doses: np.ndarray, n_doses: np.ndarray, times: np.ndarray,
                  mask: np.ndarray) -> np.ndarray:
    """Concentrations ``[n, T]`` at ``times`` (0 where ``mask`` is False, NaN for invalid individuals).

    params ``[n, p]``, doses ``[n, D, 7]`` (``n_doses[i]`` records used), times/mask ``[n, T]``. Individuals are
    split into up to 256 chunks (load balance for any thread count); each chunk allocates its work arrays once.
    Each individual is one sweep over its times when they are sorted (any order works, unsorted costs O(m T)).
    """
    n, T = times.shape
    D = doses.shape[1]
    out = np.zeros((n, T))
    two = model_code >= TWO_CMT_IV
    oral = model_code == ONE_CMT_ORAL or model_code == TWO_CMT_ORAL
    n_chunks = min(n, 256)
    for c in nb.prange(n_chunks):
        cst = np.empty(_N_CST)
        work = np.empty((max(D, 1), _N_WORK))
        O = np.empty((3, 3))
        v = np.empty(3)
        r = np.empty(3)
        for i in range(c * n // n_chunks, (c + 1) * n // n_chunks):
            m = n_doses[i]
            st = _prepare(model_code, params[i], doses[i], m, cst, work, O, v, r)
            if st != OK:
                for j in range(T):
                    if mask[i, j]:
                        out[i, j] = np.nan
            else:
                _sweep(two, oral, cst, doses[i], m, work, times[i], mask[i], out[i])
    return out


@nb.njit(cache=True)
def _check_batch(model_code: int, params: np.ndarray, doses: np.ndarray, n_doses: np.ndarray,
                 out: np.ndarray) -> None:
    cst = np.empty(_N_CST)
    for i in range(params.shape[0]):
        st = _constants(model_code, params[i], cst)
        rec = -1
        if st == OK:
            st, rec = _check_records(model_code, doses[i], n_doses[i])
        out[i, 0] = st
        out[i, 1] = rec


def check_batch(model_code: int, params: np.ndarray, doses: np.ndarray, n_doses: np.ndarray) -> np.ndarray:
    """``[n, 2]`` int64: status code (see ``STATUS_MESSAGES``) and offending dose record (-1 if none) per individual."""
    params = np.ascontiguousarray(params, dtype=np.float64)
    doses = np.ascontiguousarray(doses, dtype=np.float64)
    n_doses = np.ascontiguousarray(n_doses, dtype=np.int64)
    out = np.zeros((params.shape[0], 2), dtype=np.int64)
    _check_batch(int(model_code), params, doses, n_doses, out)
    return out


def validate(model_code: int, params: np.ndarray, doses: np.ndarray, n_doses: np.ndarray) -> None:
    """Raise ``ValueError`` naming the first invalid individual (and dose record) and why; silent if all valid."""
    status = check_batch(model_code, params, doses, n_doses)
    bad = np.flatnonzero(status[:, 0] != OK)
    if bad.size:
        i = int(bad[0])
        code, rec = int(status[i, 0]), int(status[i, 1])
        where = f"individual {i}" + (f", dose record {rec}" if rec >= 0 else "")
        raise ValueError(f"{where}: {STATUS_MESSAGES[code]} ({bad.size} invalid individual(s) in all)")
