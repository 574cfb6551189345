"""mRNA transfection as a chemical-Langevin SDE (Arruda et al. 2024, 8 parameters): intrinsic noise of translation.

    d(m, p) = (-delta m, k m - gamma p) dt + diag(sqrt(delta m), sqrt(k m + gamma p)) dB,   m(t0) = m0, p(t0) = 0
    y(t)    = log(scale p(t) + offset) + N(0, sigma^2),                                     p(t) = 0 for t <= t0

Euler-Maruyama with step 0.01 h, states clipped at 0 after every step. Every simulation has its own noise path: a
64-bit seed per individual is drawn from the ``rng`` passed to :meth:`MrnaSDE.simulate` and seeds a per-path
xoshiro256+ stream, so results do not depend on the thread count and repeat for the same ``rng`` seed. The likelihood
is intractable (``log_likelihood`` is not provided).
"""

from __future__ import annotations

import numba as nb
import numpy as np

from amortized_nlme.model import Design, IndividualModel, NormalPrior, fixed_grid_design
from simulators.mrna_simple import TIME_GRID, encode_log_fluorescence, log_fluorescence_from_dataset
from simulators.solvers import SUCCESS, make_euler_maruyama, observed_times

#: Euler-Maruyama step (hours)
DT = 0.01


@nb.njit(cache=True, fastmath={"contract"})
def _drift(t: float, y: np.ndarray, p: np.ndarray, out: np.ndarray) -> None:
    """Drift of (m, p); ``p = (delta, gamma, k)``."""
    out[0] = -p[0] * y[0]
    out[1] = p[2] * y[0] - p[1] * y[1]


@nb.njit(cache=True, fastmath={"contract"})
def _diffusion(t: float, y: np.ndarray, p: np.ndarray, out: np.ndarray) -> None:
    """Diagonal noise amplitudes sqrt(propensities) of (m, p)."""
    out[0] = np.sqrt(max(p[0] * y[0], 0.0))
    out[1] = np.sqrt(max(p[2] * y[0] + p[1] * y[1], 0.0))


_solve = make_euler_maruyama(_drift, _diffusion, dim=2)


@nb.njit(parallel=True, cache=True)
def _latent(phi: np.ndarray, times: np.ndarray, mask: np.ndarray, seeds: np.ndarray, dt: float) -> np.ndarray:
    """log(scale p + offset) along one noise path per individual, 0 where masked; NaN row on failure."""
    n, T = times.shape
    out = np.zeros((n, T))
    for i in nb.prange(n):
        x = np.exp(phi[i])
        p = np.array([x[0], x[1], x[2]])
        y0 = np.array([x[3], 0.0])
        t_obs, idx = observed_times(times[i], mask[i])
        Y, status = _solve(p, y0, x[5], t_obs, dt, seeds[i], True)
        ok = status == SUCCESS
        for j in range(idx.size):
            v = np.log(x[4] * Y[j, 1] + x[6])
            if not np.isfinite(v):
                ok = False
            out[i, idx[j]] = v
        if not ok:
            out[i, :] = np.nan
    return out


class MrnaSDE(IndividualModel):
    """Stochastic two-state mRNA translation model (chemical Langevin equation) observed as log fluorescence."""

    name = "mrna_sde"
    version = "1"
    param_names = ("delta", "gamma", "k", "m0", "scale", "t0", "offset", "sigma")
    obs_names = ("log_fluorescence",)
    max_time_points = TIME_GRID.size
    time_unit = "h"

    # Normal(mean, VARIANCE) on the log scale
    _PRIOR = NormalPrior(param_names, np.array([-3.0, -3.0, -1.0, 5.0, 0.0, 0.0, 1.0, -1.0]),
                         np.array([5.0, 5.0, 5.0, 5.0, 5.0, 2.0, 5.0, 2.0]))

    @property
    def prior(self) -> NormalPrior:
        return self._PRIOR

    def sample_design(self, n: int, rng: np.random.Generator) -> Design:
        return fixed_grid_design(n, TIME_GRID)

    def simulate(self, phi: np.ndarray, design: Design, rng: np.random.Generator) -> np.ndarray:
        phi = self.check_phi(phi)
        n = phi.shape[0]
        seeds = rng.integers(0, np.iinfo(np.int64).max, size=n, dtype=np.int64)
        times = np.ascontiguousarray(design["times"], dtype=np.float64)
        mask = np.ascontiguousarray(design["mask"], dtype=np.bool_)
        latent = _latent(phi, times, mask, seeds, DT)[..., None]
        sigma = np.exp(phi[:, 7])[:, None, None]
        y = latent + sigma * rng.standard_normal(latent.shape)
        return np.where(mask[..., None], y, 0.0) + np.where(np.isnan(latent), np.nan, 0.0)

    def encode(self, observations: np.ndarray, design: Design) -> np.ndarray:
        return encode_log_fluorescence(observations, design)

    def from_dataset(self, data) -> tuple[np.ndarray, Design]:
        return log_fluorescence_from_dataset(self.name, data)
