"""mRNA transfection, detailed model (Fröhlich et al. 2018; Arruda et al. 2024): stiff 4-state ODE, 11 parameters.

    dm/dt = -d1m0 m e - k1m0 m r + k2 (r0m0 - r),      m(t0) = 1
    de/dt =  d1m0 m e - delta2 (e0m0 - e),             e(t0) = e0m0
    dr/dt =  k2 (r0m0 - r) - k1m0 m r,                  r(t0) = r0m0
    dp/dt =  k2m0scale (r0m0 - r) - gamma p,           p(t) = 0 for t <= t0
    y(t)  =  log(p(t) + offset) + N(0, sigma^2)

The sign of the ``d1m0 m e`` term in de/dt is as printed in the seed paper and kept on purpose (it makes ``e`` grow
for large delta2; draws whose solution overflows come back as NaN rows). Internally ``q = p / k2m0scale`` is
integrated (same dynamics, O(1) states, one tolerance fits all), and ``p = k2m0scale q``. Solved with Rodas4 and the
analytic Jacobian. Parameters are log-scale, in ``param_names`` order.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from amortized_nlme.model import Design, IndividualModel, NormalPrior, fixed_grid_design
from simulators.mrna_common import (
    TIME_GRID,
    encode_log_fluorescence,
    gaussian_log_likelihood,
    log_fluorescence_from_dataset,
)
from simulators.solvers import DIVERGENCE_BOUND, SUCCESS, make_rodas4, observed_times

#: solver settings used for simulations and predictions
RTOL = 1e-6
ATOL = 1e-10
MAX_STEPS = 20_000


@nb.njit(cache=True)
def _rhs(t: float, y: np.ndarray, p: np.ndarray, out: np.ndarray) -> None:
    """Right-hand side in (m, e, r, q); ``p = (d1m0, delta2, e0m0, k2, k1m0, r0m0, gamma)``."""
    d1m0, delta2, e0m0, k2, k1m0, r0m0, gamma = p[0], p[1], p[2], p[3], p[4], p[5], p[6]
    m, e, r, q = y[0], y[1], y[2], y[3]
    release = k2 * (r0m0 - r)
    bind = k1m0 * m * r
    out[0] = -d1m0 * m * e - bind + release
    out[1] = d1m0 * m * e - delta2 * (e0m0 - e)
    out[2] = release - bind
    out[3] = (r0m0 - r) - gamma * q


@nb.njit(cache=True)
def _jac(t: float, y: np.ndarray, p: np.ndarray, J: np.ndarray) -> None:
    """Analytic Jacobian of :func:`_rhs`."""
    d1m0, delta2, k2, k1m0, gamma = p[0], p[1], p[3], p[4], p[6]
    m, e, r = y[0], y[1], y[2]
    J[0, 0] = -d1m0 * e - k1m0 * r
    J[0, 1] = -d1m0 * m
    J[0, 2] = -k1m0 * m - k2
    J[0, 3] = 0.0
    J[1, 0] = d1m0 * e
    J[1, 1] = d1m0 * m + delta2
    J[1, 2] = 0.0
    J[1, 3] = 0.0
    J[2, 0] = -k1m0 * r
    J[2, 1] = 0.0
    J[2, 2] = -k2 - k1m0 * m
    J[2, 3] = 0.0
    J[3, 0] = 0.0
    J[3, 1] = 0.0
    J[3, 2] = -1.0
    J[3, 3] = -gamma


#: log of the solver's divergence bound plus a margin (factor e^5) that covers the integration error
_LOG_DIVERGED = float(np.log(DIVERGENCE_BOUND)) + 5.0


@nb.njit(cache=True)
def _diverges(t: float, y: np.ndarray, p: np.ndarray, t_final: float) -> bool:
    """True if ``e`` will certainly exceed the solver's divergence bound before ``t_final``.

    With m >= 0 (an invariant of the model: m' >= 0 at m = 0, and 0 <= r <= r0m0), de/dt = (d1m0 m + delta2) e -
    delta2 e0m0 >= delta2 (e - e0m0), so e(t_final) - e0m0 >= (e(t) - e0m0) exp(delta2 (t_final - t)). Such draws
    fail with ``DIVERGED`` anyway; proving it early saves the ~5,000 Rodas steps of following e up to 1e300.
    """
    x = y[1] - p[2]
    if x <= 0.0:
        return False
    return np.log(x) + p[1] * (t_final - t) > _LOG_DIVERGED


_solve = make_rodas4(_rhs, _jac, dim=4, diverges=_diverges)


@nb.njit(cache=True)
def _natural(phi_row: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float, float]:
    """(rhs parameters, initial state, t0, k2m0scale, offset) of one individual from its log parameters."""
    x = np.exp(phi_row)
    p = np.array([x[0], x[1], x[2], x[4], x[5], x[6], x[7]])
    y0 = np.array([1.0, x[2], x[6], 0.0])
    return p, y0, x[8], x[3], x[9]


@nb.njit(cache=True)
def solve_protein(phi_row: np.ndarray, t_out: np.ndarray, rtol: float, atol: float) -> np.ndarray:
    """Noise-free protein p(t) at sorted ``t_out`` for one individual (NaN everywhere if the solve failed)."""
    p, y0, t0, k2m0scale, _ = _natural(phi_row)
    e = np.empty(0)
    Y, status = _solve(p, y0, t0, t_out, e, e, np.empty(0, np.int64), rtol, atol, MAX_STEPS, True)
    out = np.empty(t_out.size)
    for j in range(t_out.size):
        out[j] = k2m0scale * Y[j, 3] if status == SUCCESS else np.nan
    return out


@nb.njit(parallel=True, cache=True)
def _predict(phi: np.ndarray, times: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """log(p + offset) at the observed times, 0 where masked; a failed solve gives an all-NaN row."""
    n, T = times.shape
    out = np.zeros((n, T))
    for i in nb.prange(n):
        t_obs, idx = observed_times(times[i], mask[i])
        prot = solve_protein(phi[i], t_obs, RTOL, ATOL)
        offset = np.exp(phi[i, 9])
        ok = True
        for j in range(idx.size):
            v = np.log(prot[j] + offset)
            if not np.isfinite(v):
                ok = False
            out[i, idx[j]] = v
        if not ok:
            out[i, :] = np.nan
    return out


class MrnaDetailed(IndividualModel):
    """Four-state mRNA transfection model with enzyme-mediated degradation, observed as log fluorescence."""

    name = "mrna_detailed"
    version = "1"
    param_names = ("delta1_m0", "delta2", "e0_m0", "k2_m0_scale", "k2", "k1_m0", "r0_m0", "gamma", "t0",
                   "offset", "sigma")
    obs_names = ("log_fluorescence",)
    max_time_points = TIME_GRID.size
    time_unit = "h"
    error_params = ("sigma",)
    error_kind = "additive"

    # Normal(mean, VARIANCE) on the log scale (Arruda et al. 2024, detailed model)
    _PRIOR = NormalPrior(param_names,
                         np.array([0.0, -1.0, 0.0, 12.0, 0.0, 1.0, -3.0, -6.0, 0.0, 2.0, -1.0]),
                         np.array([5.0, 5.0, 2.0, 1.0, 2.0, 2.0, 2.0, 5.0, 2.0, 6.0, 2.0]))

    @property
    def prior(self) -> NormalPrior:
        return self._PRIOR

    def sample_design(self, n: int, rng: np.random.Generator) -> Design:
        return fixed_grid_design(n, TIME_GRID)

    def predict(self, phi: np.ndarray, design: Design) -> np.ndarray:
        times = np.ascontiguousarray(design["times"], dtype=np.float64)
        mask = np.ascontiguousarray(design["mask"], dtype=np.bool_)
        return _predict(self.check_phi(phi), times, mask)[..., None]

    def simulate(self, phi: np.ndarray, design: Design, rng: np.random.Generator) -> np.ndarray:
        phi = self.check_phi(phi)
        mean = self.predict(phi, design)
        sigma = np.exp(phi[:, 10])[:, None, None]
        y = mean + sigma * rng.standard_normal(mean.shape)
        return np.where(design["mask"][..., None], y, 0.0) + np.where(np.isnan(mean), np.nan, 0.0)

    def log_likelihood(self, phi: np.ndarray, observations: np.ndarray, design: Design) -> np.ndarray:
        phi = self.check_phi(phi)
        return gaussian_log_likelihood(observations, self.predict(phi, design), phi[:, 10], design["mask"])

    def encode(self, observations: np.ndarray, design: Design) -> np.ndarray:
        return encode_log_fluorescence(observations, design)

    def from_dataset(self, data) -> tuple[np.ndarray, Design]:
        return log_fluorescence_from_dataset(self.name, data)
