"""Numba-jitted ODE/SDE solvers shared by the individual models (ours by design: no per-step Python, no allocation
per step, callable from inside a model's ``prange`` loop over individuals).

Conventions shared by every solver here:

* The right-hand side is a numba-jitted function ``rhs(t, y, p, out)`` that writes dy/dt into ``out``; ``p`` is the
  individual's parameter vector (float64, natural scale, whatever the model needs).
* Solvers are built by factories (``make_dopri5(rhs)``, ``make_rodas4(rhs, jac)``, ``make_euler_maruyama(drift,
  diffusion)``) that close over the jitted functions and return a jitted ``solve``. Calls to ``rhs`` are then direct
  calls (inlined by LLVM), and a model's ``prange`` function that calls ``solve`` stays cacheable: passing a dispatcher
  as a *value* to a jitted function makes numba embed its address, which silently disables ``cache=True``.
  Build the solver once at module level in the model; the model's cached function holds the compiled solver (numba
  does not track that dependency: after editing this file, clear the models' ``__pycache__/*.nbi|nbc``).
* An analytic Jacobian, when given, is ``jac(t, y, p, J)`` writing df/dy into ``J [d, d]``; ``None`` gives a
  forward-difference Jacobian.
* Output is at the requested times ``t_out`` (sorted); outputs at ``t <= t0`` are the initial state.
* Dose events ``(ev_times, ev_amounts, ev_cmt)``: a bolus ``amount`` is added to compartment ``cmt`` at ``time``;
  the solve is piecewise between events, and an output at exactly an event time reports the pre-dose state.
* Every solver returns ``(Y [len(t_out), d], status)``; ``status`` is ``SUCCESS`` or a failure code, and the rows
  not reached on failure are NaN, so that models turn failures into NaN simulations instead of raising.
"""

from __future__ import annotations

from typing import Callable

import numba as nb
import numpy as np

SUCCESS = 0
#: the step budget ``max_steps`` was used up
TOO_MANY_STEPS = 1
#: the step size underflowed (step size below 1e-14 of the time scale) or the state became non-finite
STEP_TOO_SMALL = 2
#: a state exceeded ``DIVERGENCE_BOUND`` in magnitude (the solution blows up; give up early instead of overflowing)
DIVERGED = 3
DIVERGENCE_BOUND = 1e300

_EMPTY_F = np.empty(0, dtype=np.float64)
_EMPTY_I = np.empty(0, dtype=np.int64)


def no_doses() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Empty dose-event arrays ``(times, amounts, compartments)`` for solves without doses."""
    return _EMPTY_F, _EMPTY_F, _EMPTY_I


# ---------------------------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------------------------


@nb.njit(cache=True, inline="always")
def _err_norm(err: np.ndarray, y0: np.ndarray, y1: np.ndarray, rtol: float, atol: float, n: int) -> float:
    """Hairer's RMS error norm with scale atol + rtol*max(|y0|, |y1|) over the first ``n`` components."""
    s = 0.0
    for i in range(n):
        sk = atol + rtol * max(abs(y0[i]), abs(y1[i]))
        e = err[i] / sk
        s += e * e
    return np.sqrt(s / n)


@nb.njit(cache=True)
def _fill_nan(Y: np.ndarray, j: int) -> None:
    """Mark the output rows from ``j`` on as failed."""
    for r in range(j, Y.shape[0]):
        for c in range(Y.shape[1]):
            Y[r, c] = np.nan


@nb.njit(cache=True)
def _all_finite(y: np.ndarray) -> bool:
    for i in range(y.size):
        if not np.isfinite(y[i]):
            return False
    return True


@nb.njit(cache=True, inline="always")
def _outputs_before(Y: np.ndarray, y: np.ndarray, t_out: np.ndarray, t0: float) -> int:
    """Write the initial state into the outputs at ``t <= t0``; returns the first output still to compute."""
    j = 0
    while j < t_out.size and t_out[j] <= t0:
        Y[j, :] = y
        j += 1
    return j


@nb.njit(cache=True, inline="always")
def _apply_due_doses(y: np.ndarray, t: float, ev_times: np.ndarray, ev_amounts: np.ndarray, ev_cmt: np.ndarray,
                     e: int) -> int:
    """The shared dose-event step of every ODE solver: add the boluses due at or before ``t`` (from event ``e``
    on) to their compartments; returns the next pending event."""
    while e < ev_times.size and ev_times[e] <= t:
        y[ev_cmt[e]] += ev_amounts[e]
        e += 1
    return e


@nb.njit(cache=True, inline="always")
def _segment_end(ev_times: np.ndarray, e: int, t_last: float) -> float:
    """End of the next integration segment: the next dose event before the last output, else the last output."""
    if e < ev_times.size and ev_times[e] < t_last:
        return ev_times[e]
    return t_last


@nb.njit(cache=True, inline="always")
def _finish(Y: np.ndarray, status: int) -> int:
    """A failed or non-finite solve marks every output NaN (models turn it into a failed simulation)."""
    if status != SUCCESS or not _all_finite(Y.ravel()):
        if status == SUCCESS:
            status = STEP_TOO_SMALL
        _fill_nan(Y, 0)
    return status


def _make_initial_step(rhs: Callable) -> Callable:
    """Build the starting-step heuristic for ``rhs`` (Hairer, Norsett & Wanner, Sect. II.4)."""

    @nb.njit
    def initial_step(t: float, y: np.ndarray, p: np.ndarray, f0: np.ndarray, hmax: float, order: int,
                      rtol: float, atol: float, y1: np.ndarray, f1: np.ndarray) -> float:
        """Starting step size from the local derivative scale (Hairer, Norsett & Wanner, Sect. II.4)."""
        n = y.size
        dnf = 0.0
        dny = 0.0
        for i in range(n):
            sk = atol + rtol * abs(y[i])
            dnf += (f0[i] / sk) ** 2
            dny += (y[i] / sk) ** 2
        if dnf <= 1e-10 or dny <= 1e-10:
            h = 1e-6
        else:
            h = 0.01 * np.sqrt(dny / dnf)
        h = min(h, hmax)
        for i in range(n):
            y1[i] = y[i] + h * f0[i]
        rhs(t + h, y1, p, f1)
        der2 = 0.0
        for i in range(n):
            sk = atol + rtol * abs(y[i])
            der2 += ((f1[i] - f0[i]) / sk) ** 2
        der2 = np.sqrt(der2) / h
        der12 = max(abs(der2), np.sqrt(dnf))
        if der12 <= 1e-15:
            h1 = max(1e-6, h * 1e-3)
        else:
            h1 = (0.01 / der12) ** (1.0 / order)
        return min(100.0 * h, h1, hmax)


    return initial_step


# ---------------------------------------------------------------------------------------------------------------
# Dormand-Prince 5(4), PI step control, 4th-order dense output (Hairer's DOPRI5)
# ---------------------------------------------------------------------------------------------------------------

_A21 = 1.0 / 5.0
_A31, _A32 = 3.0 / 40.0, 9.0 / 40.0
_A41, _A42, _A43 = 44.0 / 45.0, -56.0 / 15.0, 32.0 / 9.0
_A51, _A52, _A53, _A54 = 19372.0 / 6561.0, -25360.0 / 2187.0, 64448.0 / 6561.0, -212.0 / 729.0
_A61, _A62, _A63, _A64, _A65 = 9017.0 / 3168.0, -355.0 / 33.0, 46732.0 / 5247.0, 49.0 / 176.0, -5103.0 / 18656.0
_A71, _A73, _A74, _A75, _A76 = 35.0 / 384.0, 500.0 / 1113.0, 125.0 / 192.0, -2187.0 / 6784.0, 11.0 / 84.0
_C2, _C3, _C4, _C5 = 0.2, 0.3, 0.8, 8.0 / 9.0
_E1, _E3, _E4, _E5, _E6, _E7 = (71.0 / 57600.0, -71.0 / 16695.0, 71.0 / 1920.0, -17253.0 / 339200.0,
                                22.0 / 525.0, -1.0 / 40.0)
_D1, _D3, _D4, _D5, _D6, _D7 = (-12715105075.0 / 11282082432.0, 87487479700.0 / 32700410799.0,
                                -10690763975.0 / 1880347072.0, 701980252875.0 / 199316789632.0,
                                -1453857185.0 / 822651844.0, 69997945.0 / 29380423.0)


def make_dopri5(rhs: Callable) -> Callable:
    """Build an adaptive Dormand-Prince 5(4) solver (PI step control, dense output) for the jitted ``rhs``.

    The returned jitted ``solve(p, y0, t0, t_out, ev_times, ev_amounts, ev_cmt, rtol, atol, max_steps)`` gives
    ``(Y [len(t_out), d], status)``; see the module docstring for the conventions.
    """
    initial_step = _make_initial_step(rhs)

    @nb.njit
    def segment(p: np.ndarray, y: np.ndarray, t: float, t_end: float, t_out: np.ndarray, Y: np.ndarray,
                j: int, rtol: float, atol: float, max_steps: int, steps: int, W: np.ndarray):
        """Integrate ``y`` in place from ``t`` to ``t_end``, writing outputs ``t < t_out[j] <= t_end``.

        Returns ``(j, steps, status)``; ``W`` is a ``[12, d]`` work array.
        """
        n = y.size
        k1, k2, k3, k4, k5, k6, k7 = W[0], W[1], W[2], W[3], W[4], W[5], W[6]
        ytmp, ynew, rc3, rc4, rc5 = W[7], W[8], W[9], W[10], W[11]
        T = t_out.size
        span = t_end - t
        if span <= 0.0:
            return j, steps, SUCCESS
        rhs(t, y, p, k1)
        h = initial_step(t, y, p, k1, span, 5, rtol, atol, ytmp, k2)
        facold = 1e-4
        beta = 0.04
        expo1 = 0.2 - beta * 0.75
        last_rejected = False
        while True:
            if steps >= max_steps:
                return j, steps, TOO_MANY_STEPS
            if h < 1e-14 * max(abs(t), span):
                return j, steps, STEP_TOO_SMALL
            final = t + 1.01 * h >= t_end
            if final:
                h = t_end - t
            steps += 1
            for i in range(n):
                ytmp[i] = y[i] + h * _A21 * k1[i]
            rhs(t + _C2 * h, ytmp, p, k2)
            for i in range(n):
                ytmp[i] = y[i] + h * (_A31 * k1[i] + _A32 * k2[i])
            rhs(t + _C3 * h, ytmp, p, k3)
            for i in range(n):
                ytmp[i] = y[i] + h * (_A41 * k1[i] + _A42 * k2[i] + _A43 * k3[i])
            rhs(t + _C4 * h, ytmp, p, k4)
            for i in range(n):
                ytmp[i] = y[i] + h * (_A51 * k1[i] + _A52 * k2[i] + _A53 * k3[i] + _A54 * k4[i])
            rhs(t + _C5 * h, ytmp, p, k5)
            for i in range(n):
                ytmp[i] = y[i] + h * (_A61 * k1[i] + _A62 * k2[i] + _A63 * k3[i] + _A64 * k4[i] + _A65 * k5[i])
            rhs(t + h, ytmp, p, k6)
            for i in range(n):
                ynew[i] = y[i] + h * (_A71 * k1[i] + _A73 * k3[i] + _A74 * k4[i] + _A75 * k5[i] + _A76 * k6[i])
            rhs(t + h, ynew, p, k7)
            for i in range(n):
                ytmp[i] = h * (_E1 * k1[i] + _E3 * k3[i] + _E4 * k4[i] + _E5 * k5[i] + _E6 * k6[i] + _E7 * k7[i])
            err = _err_norm(ytmp, y, ynew, rtol, atol, n)
            if not np.isfinite(err):
                err = 1e10  # treat overflow as a rejected step; repeated failure ends in STEP_TOO_SMALL
            fac11 = err ** expo1
            if err <= 1.0:
                fac = fac11 / facold ** beta
                fac = max(0.1, min(5.0, fac / 0.9))
                hnew = h / fac
                facold = max(err, 1e-4)
                # dense output on [t, t + h] for every requested time inside the step
                t_new = t_end if final else t + h
                if j < T and t_out[j] <= t_new:
                    for i in range(n):
                        d = ynew[i] - y[i]
                        rc3[i] = h * k1[i] - d
                        rc4[i] = d - h * k7[i] - rc3[i]
                        rc5[i] = h * (_D1 * k1[i] + _D3 * k3[i] + _D4 * k4[i] + _D5 * k5[i] + _D6 * k6[i]
                                      + _D7 * k7[i])
                    while j < T and t_out[j] <= t_new:
                        if t_out[j] == t_new:
                            for i in range(n):
                                Y[j, i] = ynew[i]
                        else:
                            th = (t_out[j] - t) / h
                            th1 = 1.0 - th
                            for i in range(n):
                                Y[j, i] = y[i] + th * ((ynew[i] - y[i]) + th1 * (rc3[i] + th * (rc4[i] + th1 * rc5[i])))
                        j += 1
                for i in range(n):
                    y[i] = ynew[i]
                    k1[i] = k7[i]
                    if abs(y[i]) > DIVERGENCE_BOUND:
                        return j, steps, DIVERGED
                t = t_new
                if final:
                    return j, steps, SUCCESS
                if last_rejected:
                    hnew = min(hnew, h)
                last_rejected = False
                h = min(hnew, t_end - t)
            else:
                h = h / min(5.0, fac11 / 0.9)
                last_rejected = True


    @nb.njit
    def solve(p: np.ndarray, y0: np.ndarray, t0: float, t_out: np.ndarray, ev_times: np.ndarray,
              ev_amounts: np.ndarray, ev_cmt: np.ndarray, rtol: float = 1e-6, atol: float = 1e-9,
              max_steps: int = 100_000):
        """Adaptive Dormand-Prince 5(4) solve of ``y' = rhs(t, y, p)`` from ``(t0, y0)`` with bolus dose events.

        Returns ``(Y [len(t_out), d], status)``; see the module docstring for the conventions.
        """
        n = y0.size
        T = t_out.size
        Y = np.empty((T, n))
        W = np.empty((12, n))
        y = y0.copy()
        j = _outputs_before(Y, y, t_out, t0)
        t, e, steps, status = t0, 0, 0, SUCCESS
        t_last = t_out[T - 1] if T > 0 else t0
        while True:
            e = _apply_due_doses(y, t, ev_times, ev_amounts, ev_cmt, e)
            if j >= T:
                break
            t_next = _segment_end(ev_times, e, t_last)
            j, steps, status = segment(p, y, t, t_next, t_out, Y, j, rtol, atol, max_steps, steps, W)
            if status != SUCCESS:
                break
            t = t_next
        return Y, _finish(Y, status)

    return solve


# ---------------------------------------------------------------------------------------------------------------
# Rodas4 (Hairer & Wanner, stiffly accurate Rosenbrock, order 4(3), 6 stages, 3rd-order dense output)
# ---------------------------------------------------------------------------------------------------------------

_RG = 0.25
_RC2, _RC3, _RC4 = 0.386, 0.21, 0.63
_RD1, _RD2, _RD3, _RD4 = 0.25, -0.1043, 0.1035, -0.3620000000000023e-01
_RA21 = 1.544
_RA31, _RA32 = 0.9466785280815826, 0.2557011698983284
_RA41, _RA42, _RA43 = 3.314825187068521, 2.896124015972201, 0.9986419139977817
_RA51, _RA52, _RA53, _RA54 = 1.221224509226641, 6.019134481288629, 12.53708332932087, -0.6878860361058950
_RC21 = -5.6688
_RC31, _RC32 = -2.430093356833875, -0.2063599157091915
_RC41, _RC42, _RC43 = -0.1073529058151375, -9.594562251023355, -20.47028614809616
_RC51, _RC52, _RC53, _RC54 = 7.496443313967647, -10.24680431464352, -33.99990352819905, 11.70890893206160
_RC61, _RC62, _RC63, _RC64, _RC65 = (8.083246795921522, -7.981132988064893, -31.52159432874371,
                                     16.31930543123136, -6.058818238834054)
# continuous extension: y(s) = (1 - s) y0 + s (y1 + (1 - s) (H2 + s H3)), H2 = sum_j h2j k_j, H3 = sum_j h3j k_j
_RH21, _RH22, _RH23, _RH24, _RH25 = (10.12623508344586, -7.487995877610167, -34.80091861555747,
                                     -7.992771707568823, 1.025137723295662)
_RH31, _RH32, _RH33, _RH34, _RH35 = (-0.6762803392801253, 6.087714651680015, 16.43084320892478,
                                     24.76722511418386, -6.594389125716872)


@nb.njit(cache=True, inline="always")
def _lu_factor(A: np.ndarray, piv: np.ndarray, dinv: np.ndarray, n: int) -> bool:
    """In-place LU with partial pivoting of a small dense matrix; ``dinv`` gets the reciprocals of U's diagonal
    (so that the solves multiply instead of divide); ``n`` is the dimension. False if singular."""
    for k in range(n):
        m = k
        big = abs(A[k, k])
        for i in range(k + 1, n):
            a = abs(A[i, k])
            if a > big:
                big = a
                m = i
        piv[k] = m
        if big == 0.0 or not big < np.inf:
            return False
        if m != k:
            for c in range(n):
                tmp = A[k, c]
                A[k, c] = A[m, c]
                A[m, c] = tmp
        inv = 1.0 / A[k, k]
        dinv[k] = inv
        for i in range(k + 1, n):
            f = A[i, k] * inv
            A[i, k] = f
            for c in range(k + 1, n):
                A[i, c] -= f * A[k, c]
    return True


@nb.njit(cache=True, inline="always")
def _lu_solve(LU: np.ndarray, piv: np.ndarray, dinv: np.ndarray, b: np.ndarray, n: int) -> None:
    """Solve ``LU x = b`` in place (``b`` becomes ``x``) with the factors of :func:`_lu_factor`."""
    for k in range(n):
        m = piv[k]
        tmp = b[k]
        b[k] = b[m]
        b[m] = tmp
    for i in range(1, n):
        s = b[i]
        for c in range(i):
            s -= LU[i, c] * b[c]
        b[i] = s
    for i in range(n - 1, -1, -1):
        s = b[i]
        for c in range(i + 1, n):
            s -= LU[i, c] * b[c]
        b[i] = s * dinv[i]


@nb.njit(cache=True)
def _never_diverges(t: float, y: np.ndarray, p: np.ndarray, t_final: float) -> bool:
    return False


def make_rodas4(rhs: Callable, jac: Callable | None = None, dim: int | None = None,
                diverges: Callable | None = None) -> Callable:
    """Build an adaptive stiff Rodas4 solver for the jitted ``rhs``; ``jac(t, y, p, J)`` is the analytic
    Jacobian (``None``: forward differences).

    The returned jitted ``solve(p, y0, t0, t_out, ev_times, ev_amounts, ev_cmt, rtol, atol, max_steps,
    autonomous)`` gives ``(Y [len(t_out), d], status)``; ``autonomous=True`` skips df/dt. ``dim``, when given, is the
    number of states ``d`` as a compile-time constant: the loops over the states and the LU of the ``[d, d]`` iteration
    matrix are then fully unrolled (several times faster for small systems); the solver then requires ``y0.size ==
    dim``. ``None`` works for any ``d``.

    ``diverges(t, y, p, t_final) -> bool``, optional, is a model's proof of blow-up: it may return True only when the
    exact solution from ``(t, y)`` is certain to exceed ``DIVERGENCE_BOUND`` in magnitude before ``t_final`` (the last
    output time), with a margin that covers the integration error. The solver checks it every 8 accepted steps and
    then stops with ``DIVERGED``, the status it would otherwise reach thousands of steps later.
    """
    DIM = 0 if dim is None else int(dim)
    div_check = _never_diverges if diverges is None else diverges
    initial_step = _make_initial_step(rhs)

    if jac is None:

        @nb.njit
        def jacobian(t: float, y: np.ndarray, p: np.ndarray, f0: np.ndarray, J: np.ndarray,
                        ytmp: np.ndarray, ftmp: np.ndarray) -> None:
            """Forward-difference Jacobian df/dy at ``(t, y)`` given ``f0 = f(t, y)``."""
            n = y.size
            for i in range(n):
                ytmp[i] = y[i]
            for c in range(n):
                delta = 1.4901161193847656e-08 * max(1e-5, abs(y[c]))
                ytmp[c] = y[c] + delta
                rhs(t, ytmp, p, ftmp)
                ytmp[c] = y[c]
                for r in range(n):
                    J[r, c] = (ftmp[r] - f0[r]) / delta


    else:

        @nb.njit
        def jacobian(t: float, y: np.ndarray, p: np.ndarray, f0: np.ndarray, J: np.ndarray,
                     ytmp: np.ndarray, ftmp: np.ndarray) -> None:
            """Analytic Jacobian, called with the finite-difference signature."""
            jac(t, y, p, J)

    @nb.njit(fastmath={"contract"})
    def segment(p: np.ndarray, y: np.ndarray, t: float, t_end: float, t_out: np.ndarray,
                Y: np.ndarray, j: int, rtol: float, atol: float, max_steps: int, steps: int, autonomous: bool,
                W: np.ndarray, J: np.ndarray, M: np.ndarray, piv: np.ndarray, dinv: np.ndarray):
        """Integrate ``y`` in place from ``t`` to ``t_end`` with Rodas4, writing outputs ``t < t_out[j] <= t_end``
        from the 3rd-order continuous extension (Hairer's rodas.f).

        Returns ``(j, steps, status)``; ``W`` is a ``[13, d]`` work array, ``J``/``M`` are ``[d, d]``.
        """
        n = DIM if DIM > 0 else y.size
        f0, fx, k1, k2, k3, k4, k5, k6, ytmp, ynew, ftmp, h2, h3 = (W[0], W[1], W[2], W[3], W[4], W[5], W[6],
                                                                     W[7], W[8], W[9], W[10], W[11], W[12])
        T = t_out.size
        span = t_end - t
        if span <= 0.0:
            return j, steps, SUCCESS
        rhs(t, y, p, f0)
        h = initial_step(t, y, p, f0, span, 4, rtol, atol, ytmp, ftmp)
        accepted = 0
        need_jac = True
        last_rejected = False
        while True:
            if need_jac:
                jacobian(t, y, p, f0, J, ytmp, ftmp)
                if autonomous:
                    for i in range(n):
                        fx[i] = 0.0
                else:
                    dt = 1.4901161193847656e-08 * max(1e-5, abs(t))
                    rhs(t + dt, y, p, ftmp)
                    for i in range(n):
                        fx[i] = (ftmp[i] - f0[i]) / dt
                need_jac = False
            if steps >= max_steps:
                return j, steps, TOO_MANY_STEPS
            if h < 1e-14 * max(abs(t), span):
                return j, steps, STEP_TOO_SMALL
            final = t + 1.01 * h >= t_end
            if final:
                h = t_end - t
            steps += 1
            fac1 = 1.0 / (h * _RG)
            for r in range(n):
                for c in range(n):
                    M[r, c] = -J[r, c]
                M[r, r] += fac1
            if not _lu_factor(M, piv, dinv, n):
                h *= 0.25
                last_rejected = True
                continue
            hd1, hd2, hd3, hd4 = h * _RD1, h * _RD2, h * _RD3, h * _RD4
            ih = 1.0 / h
            for i in range(n):
                k1[i] = f0[i] + hd1 * fx[i]
            _lu_solve(M, piv, dinv, k1, n)
            for i in range(n):
                ytmp[i] = y[i] + _RA21 * k1[i]
            rhs(t + _RC2 * h, ytmp, p, ftmp)
            for i in range(n):
                k2[i] = ftmp[i] + hd2 * fx[i] + ih * _RC21 * k1[i]
            _lu_solve(M, piv, dinv, k2, n)
            for i in range(n):
                ytmp[i] = y[i] + _RA31 * k1[i] + _RA32 * k2[i]
            rhs(t + _RC3 * h, ytmp, p, ftmp)
            for i in range(n):
                k3[i] = ftmp[i] + hd3 * fx[i] + ih * (_RC31 * k1[i] + _RC32 * k2[i])
            _lu_solve(M, piv, dinv, k3, n)
            for i in range(n):
                ytmp[i] = y[i] + _RA41 * k1[i] + _RA42 * k2[i] + _RA43 * k3[i]
            rhs(t + _RC4 * h, ytmp, p, ftmp)
            for i in range(n):
                k4[i] = ftmp[i] + hd4 * fx[i] + ih * (_RC41 * k1[i] + _RC42 * k2[i] + _RC43 * k3[i])
            _lu_solve(M, piv, dinv, k4, n)
            for i in range(n):
                ytmp[i] = y[i] + _RA51 * k1[i] + _RA52 * k2[i] + _RA53 * k3[i] + _RA54 * k4[i]
            rhs(t + h, ytmp, p, ftmp)
            for i in range(n):
                k5[i] = ftmp[i] + ih * (_RC51 * k1[i] + _RC52 * k2[i] + _RC53 * k3[i] + _RC54 * k4[i])
            _lu_solve(M, piv, dinv, k5, n)
            for i in range(n):
                ytmp[i] += k5[i]  # embedded 3rd-order solution
            rhs(t + h, ytmp, p, ftmp)
            for i in range(n):
                k6[i] = ftmp[i] + ih * (_RC61 * k1[i] + _RC62 * k2[i] + _RC63 * k3[i] + _RC64 * k4[i] + _RC65 * k5[i])
            _lu_solve(M, piv, dinv, k6, n)
            for i in range(n):
                ynew[i] = ytmp[i] + k6[i]
            err = _err_norm(k6, y, ynew, rtol, atol, n)
            if not np.isfinite(err):
                err = 1e10
            fac = max(1.0 / 6.0, min(5.0, np.sqrt(np.sqrt(err)) / 0.9))
            hnew = h / fac
            if err <= 1.0:
                t_new = t_end if final else t + h
                if j < T and t_out[j] <= t_new:
                    for i in range(n):
                        h2[i] = _RH21 * k1[i] + _RH22 * k2[i] + _RH23 * k3[i] + _RH24 * k4[i] + _RH25 * k5[i]
                        h3[i] = _RH31 * k1[i] + _RH32 * k2[i] + _RH33 * k3[i] + _RH34 * k4[i] + _RH35 * k5[i]
                    while j < T and t_out[j] <= t_new:
                        if t_out[j] == t_new:
                            for i in range(n):
                                Y[j, i] = ynew[i]
                        else:
                            s = (t_out[j] - t) / h
                            s1 = 1.0 - s
                            for i in range(n):
                                Y[j, i] = y[i] * s1 + s * (ynew[i] + s1 * (h2[i] + s * h3[i]))
                        j += 1
                t = t_new
                for i in range(n):
                    y[i] = ynew[i]
                    if abs(y[i]) > DIVERGENCE_BOUND:
                        return j, steps, DIVERGED
                if final:
                    return j, steps, SUCCESS
                accepted += 1
                if (accepted & 7) == 0 and div_check(t, y, p, t_out[T - 1]):
                    return j, steps, DIVERGED
                rhs(t, y, p, f0)
                need_jac = True
                if last_rejected:
                    hnew = min(hnew, h)
                last_rejected = False
                h = min(hnew, t_end - t)
            else:
                h = hnew
                last_rejected = True


    @nb.njit
    def solve(p: np.ndarray, y0: np.ndarray, t0: float, t_out: np.ndarray, ev_times: np.ndarray,
              ev_amounts: np.ndarray, ev_cmt: np.ndarray, rtol: float = 1e-6, atol: float = 1e-9,
              max_steps: int = 100_000, autonomous: bool = False):
        """Adaptive stiff Rodas4 solve of ``y' = rhs(t, y, p)`` from ``(t0, y0)`` with bolus dose events.

        ``jac`` is an analytic Jacobian ``jac(t, y, p, J)`` or ``None`` (finite differences); ``autonomous=True``
        skips the time derivative df/dt. Returns ``(Y [len(t_out), d], status)``.
        """
        n = y0.size
        if DIM > 0 and n != DIM:
            raise ValueError("y0.size differs from the solver's dim")
        T = t_out.size
        Y = np.empty((T, n))
        W = np.empty((13, n))
        J = np.empty((n, n))
        M = np.empty((n, n))
        piv = np.empty(n, dtype=np.int64)
        dinv = np.empty(n)
        y = y0.copy()
        j = _outputs_before(Y, y, t_out, t0)
        t, e, steps, status = t0, 0, 0, SUCCESS
        t_last = t_out[T - 1] if T > 0 else t0
        while True:
            e = _apply_due_doses(y, t, ev_times, ev_amounts, ev_cmt, e)
            if j >= T:
                break
            t_next = _segment_end(ev_times, e, t_last)
            j, steps, status = segment(p, y, t, t_next, t_out, Y, j, rtol, atol, max_steps, steps,
                                       autonomous, W, J, M, piv, dinv)
            if status != SUCCESS:
                break
            t = t_next
        return Y, _finish(Y, status)

    return solve


# ---------------------------------------------------------------------------------------------------------------
# Euler-Maruyama with diagonal noise and a per-path generator (xoshiro256+ seeded by splitmix64, ziggurat normals)
# ---------------------------------------------------------------------------------------------------------------

_U64 = np.uint64


@nb.njit(cache=True)
def _rotl(x: np.uint64, k: int) -> np.uint64:
    """64-bit left rotation."""
    return (x << _U64(k)) | (x >> _U64(64 - k))


@nb.njit(cache=True)
def rng_init(seed: int) -> np.ndarray:
    """xoshiro256+ state ``uint64[4]`` from a 64-bit seed through splitmix64 (distinct seeds, distinct streams)."""
    s = np.empty(4, dtype=np.uint64)
    z = _U64(seed)
    for i in range(4):
        z = z + _U64(0x9E3779B97F4A7C15)
        x = z
        x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
        s[i] = x ^ (x >> _U64(31))
    return s


@nb.njit(cache=True, inline="always")
def _xoshiro(s0: np.uint64, s1: np.uint64, s2: np.uint64, s3: np.uint64):
    """One xoshiro256+ step on a state held in scalars: ``(output, s0, s1, s2, s3)`` (the low 3 output bits are weak;
    callers use the upper bits). Keeping the state in registers instead of an array is what makes it cheap."""
    result = s0 + s3
    t = s1 << _U64(17)
    s2 ^= s0
    s3 ^= s1
    s1 ^= s2
    s0 ^= s3
    s2 ^= t
    s3 = (s3 << _U64(45)) | (s3 >> _U64(19))
    return result, s0, s1, s2, s3


@nb.njit(cache=True)
def _rng_next(s: np.ndarray) -> np.uint64:
    """Next raw 64-bit xoshiro256+ output of the array state ``s`` (advanced in place)."""
    r, s[0], s[1], s[2], s[3] = _xoshiro(s[0], s[1], s[2], s[3])
    return r


@nb.njit(cache=True, inline="always")
def _unit53(bits: np.uint64) -> float:
    """Uniform double in [0, 1) from the top 53 bits (converted through int64: exact, and cheaper than from uint64)."""
    return float(np.int64(bits >> _U64(11))) * (1.0 / 9007199254740992.0)


@nb.njit(cache=True)
def rng_uniform(s: np.ndarray) -> float:
    """Uniform double in [0, 1) from the top 53 bits of one xoshiro256+ output."""
    return _unit53(_rng_next(s))


def _ziggurat_tables(c: int = 128, r: float = 3.442619855899, v: float = 9.91256303526217e-3):
    """Layer edges x_i and inner ratios x_{i+1}/x_i of the 128-layer normal ziggurat (Marsaglia & Tsang; Doornik)."""
    x = np.zeros(c + 1)
    f = np.exp(-0.5 * r * r)
    x[0] = v / f
    x[1] = r
    for i in range(2, c):
        x[i] = np.sqrt(-2.0 * np.log(v / x[i - 1] + f))
        f = np.exp(-0.5 * x[i] * x[i])
    x[c] = 0.0
    return x, x[1:] / x[:-1]


_ZIG_X, _ZIG_RATIO = _ziggurat_tables()
_ZIG_R = 3.442619855899


@nb.njit(cache=True)
def _ziggurat_slow(u: float, i: int, s0: np.uint64, s1: np.uint64, s2: np.uint64, s3: np.uint64):
    """The ziggurat's rare branch (~1 % of draws): base-layer tail or wedge test for the draw ``(u, i)`` that failed
    the fast test. Returns ``(accepted, z, s0, s1, s2, s3)``; not accepted means draw again."""
    if i == 0:  # base layer: sample the tail beyond R (Marsaglia 1964)
        while True:
            b, s0, s1, s2, s3 = _xoshiro(s0, s1, s2, s3)
            x = np.log(1.0 - _unit53(b)) / _ZIG_R
            b, s0, s1, s2, s3 = _xoshiro(s0, s1, s2, s3)
            y = np.log(1.0 - _unit53(b))
            if -2.0 * y >= x * x:
                return True, (x - _ZIG_R if u < 0.0 else _ZIG_R - x), s0, s1, s2, s3
    x = u * _ZIG_X[i]
    f0 = np.exp(-0.5 * (_ZIG_X[i] * _ZIG_X[i] - x * x))
    f1 = np.exp(-0.5 * (_ZIG_X[i + 1] * _ZIG_X[i + 1] - x * x))
    b, s0, s1, s2, s3 = _xoshiro(s0, s1, s2, s3)
    return f1 + _unit53(b) * (f0 - f1) < 1.0, x, s0, s1, s2, s3


@nb.njit(cache=True, inline="always")
def _normal(s0: np.uint64, s1: np.uint64, s2: np.uint64, s3: np.uint64):
    """Standard normal by the ziggurat method from a scalar xoshiro256+ state: ``(z, s0, s1, s2, s3)``. One 64-bit
    draw (53 bits for u, 7 for the layer) ~99 % of the time; the rare branch is out of line."""
    while True:
        bits, s0, s1, s2, s3 = _xoshiro(s0, s1, s2, s3)
        u = 2.0 * _unit53(bits) - 1.0
        i = np.int64((bits >> _U64(3)) & _U64(127))
        if abs(u) < _ZIG_RATIO[i]:
            return u * _ZIG_X[i], s0, s1, s2, s3
        ok, z, s0, s1, s2, s3 = _ziggurat_slow(u, i, s0, s1, s2, s3)
        if ok:
            return z, s0, s1, s2, s3


@nb.njit(cache=True)
def rng_normal(s: np.ndarray) -> float:
    """Standard normal by the ziggurat method from the array state ``s`` (the same stream as the solvers' draws)."""
    z, s[0], s[1], s[2], s[3] = _normal(s[0], s[1], s[2], s[3])
    return z


@nb.njit(cache=True, inline="always")
def em_step_size(t: float, t_stop: float, dt: float, sqdt: float) -> tuple[float, float]:
    """The next Euler-Maruyama step ``(h, sqrt(h))`` from ``t`` towards the output time ``t_stop``: ``dt``, or the
    shorter remainder that lands on ``t_stop`` (callers step while ``t_stop - t > 1e-9``). Shared by every EM loop so
    that they all take the same step sequence."""
    h = t_stop - t
    if h > dt * (1.0 + 1e-9):
        h = dt
    return h, (sqdt if h == dt else np.sqrt(h))


def make_euler_maruyama(drift: Callable, diffusion: Callable, dim: int | None = None) -> Callable:
    """Build a fixed-step Euler-Maruyama solver for ``dy = drift dt + diag(diffusion) dB``.

    The returned jitted ``solve(p, y0, t0, t_out, dt, seed, clip_nonneg)`` gives ``(Y [len(t_out), d], status)``.
    ``dim``, when given, is ``d`` as a compile-time constant (unrolled loops over the states; ``y0.size`` must equal
    it); ``None`` works for any ``d``.
    """
    DIM = 0 if dim is None else int(dim)

    @nb.njit(fastmath={"contract"})
    def solve(p: np.ndarray, y0: np.ndarray, t0: float, t_out: np.ndarray, dt: float,
              seed: int, clip_nonneg: bool = False):
        """Euler-Maruyama with fixed step ``dt`` (the last step before an output is shortened to land on it).

        ``drift(t, y, p, out)`` and ``diffusion(t, y, p, out)`` (the diagonal of the noise matrix) write into ``out``;
        the noise path is fixed by ``seed``; ``clip_nonneg`` sets negative states to 0 after every step (copy-number
        models). Returns ``(Y [len(t_out), d], status)``; a non-finite state gives NaN rows and a failure status.
        """
        n = y0.size
        if DIM > 0 and n != DIM:
            raise ValueError("y0.size differs from the solver's dim")
        if DIM > 0:
            n = DIM
        T = t_out.size
        Y = np.empty((T, n))
        y = y0.copy()
        f = np.empty(n)
        g = np.empty(n)
        st = rng_init(seed)
        s0, s1, s2, s3 = st[0], st[1], st[2], st[3]
        sqdt = np.sqrt(dt)
        j = 0
        while j < T and t_out[j] <= t0:
            Y[j, :] = y
            j += 1
        t = t0
        while j < T:
            t_stop = t_out[j]
            # a remainder below 1e-9 h is merged into the previous step (rounding of t accumulates)
            while t_stop - t > 1e-9:
                h, sh = em_step_size(t, t_stop, dt, sqdt)
                drift(t, y, p, f)
                diffusion(t, y, p, g)
                for i in range(n):
                    z, s0, s1, s2, s3 = _normal(s0, s1, s2, s3)
                    # (y + h f) + g (sqrt(h) z): the same Euler-Maruyama increment, grouped so that only one
                    # multiply-add follows the (state-dependent, slow) square root of the diffusion
                    v = (y[i] + f[i] * h) + g[i] * (sh * z)
                    if clip_nonneg and v < 0.0:
                        v = 0.0
                    y[i] = v
                t += h
            t = t_stop
            if not _all_finite(y):
                _fill_nan(Y, 0)
                return Y, STEP_TOO_SMALL
            for i in range(n):
                Y[j, i] = y[i]
            j += 1
        return Y, SUCCESS


    return solve


# ---------------------------------------------------------------------------------------------------------------
# padded designs
# ---------------------------------------------------------------------------------------------------------------


@nb.njit(cache=True)
def observed_times(times: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted observed times of one padded design row and their column indices (solvers need sorted outputs).

    Rows already in order (the usual case) skip the sort; the result is the same as a stable sort's.
    """
    count = 0
    in_order = True
    last = -np.inf
    for k in range(times.size):
        if mask[k]:
            if not times[k] >= last:  # also catches NaN
                in_order = False
            last = times[k]
            count += 1
    idx = np.empty(count, dtype=np.int64)
    t = np.empty(count)
    c = 0
    for k in range(times.size):
        if mask[k]:
            idx[c] = k
            t[c] = times[k]
            c += 1
    if in_order:
        return t, idx
    order = np.argsort(t, kind="mergesort")
    return t[order], idx[order]
