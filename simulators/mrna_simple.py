"""mRNA transfection, simple model (Fröhlich et al. 2018; Arruda et al. 2024, 6 parameters, analytic solution).

    dm/dt = -delta m,                 m(t0) = 1
    dp/dt = kms m - gamma p,          p(t) = 0 for t <= t0
    y(t)  = log(p(t) + offset) + N(0, sigma^2)

Parameters are log-scale: log delta, log gamma, log(k m0 scale), t0 (log hours), log offset, log sigma.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from amortized_nlme.model import Design, IndividualModel, NormalPrior, fixed_grid_design
from simulators.mrna_common import (
    TIME_GRID, encode_log_fluorescence_per_cell, log_fluorescence_from_dataset)

@nb.njit(cache=True, fastmath=False)
def _protein(t: float, t0: float, delta: float, gamma: float, kms: float) -> float:
    """Analytic p(t); written with expm1 on the non-negative rate gap so that delta ~ gamma stays exact."""
    tau = t - t0
    if tau <= 0.0:
        return 0.0
    a = min(delta, gamma)
    gap = abs(delta - gamma)
    if gap * tau < 1e-10:
        return kms * tau * np.exp(-a * tau)
    return kms * np.exp(-a * tau) * (-np.expm1(-gap * tau)) / gap


@nb.njit(cache=True)
def _natural(row: np.ndarray) -> tuple[float, float, float, float, float]:
    """delta, gamma, kms, t0, offset of one log-parameter row (shared by the prediction and the fused likelihood)."""
    return np.exp(row[0]), np.exp(row[1]), np.exp(row[2]), np.exp(row[3]), np.exp(row[4])


@nb.njit(parallel=True, cache=True)
def _predict(phi: np.ndarray, times: np.ndarray) -> np.ndarray:
    n, T = times.shape
    out = np.empty((n, T))
    for i in nb.prange(n):
        delta, gamma, kms, t0, offset = _natural(phi[i])
        for j in range(T):
            out[i, j] = np.log(_protein(times[i, j], t0, delta, gamma, kms) + offset)
    return out


@nb.njit(parallel=True, cache=True)
def _loglik(phi: np.ndarray, times: np.ndarray, y: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """log p(y_i | phi_i), predictions and Gaussian terms fused (no [n, T] temporaries): the exact weights and the
    proposal refinement evaluate it millions of times."""
    n, T = times.shape
    out = np.empty(n)
    half_log_2pi = 0.5 * np.log(2.0 * np.pi)
    for i in nb.prange(n):
        delta, gamma, kms, t0, offset = _natural(phi[i])
        ls = phi[i, 5]
        inv = np.exp(-ls)
        acc = 0.0
        count = 0
        for j in range(T):
            if not mask[i, j]:
                continue
            z = (y[i, j] - np.log(_protein(times[i, j], t0, delta, gamma, kms) + offset)) * inv
            acc -= 0.5 * z * z
            count += 1
        out[i] = acc - count * (ls + half_log_2pi)
    return out


class MrnaSimple(IndividualModel):
    """Two-state linear mRNA translation model observed as log fluorescence on a 180-frame grid."""

    name = "mrna_simple"
    version = "2"   # 2: per-cell normalised encoder (encode_log_fluorescence_per_cell)
    param_names = ("delta", "gamma", "kms", "t0", "offset", "sigma")
    obs_names = ("log_fluorescence",)
    max_time_points = TIME_GRID.size
    time_unit = "h"
    error_params = ("sigma",)
    error_kind = "additive"

    _PRIOR = NormalPrior(param_names, np.array([-3.0, -3.0, 5.0, 0.0, 1.0, -1.0]),
                         np.array([5.0, 5.0, 11.0, 2.0, 6.0, 2.0]))

    @property
    def prior(self) -> NormalPrior:
        return self._PRIOR

    def sample_design(self, n: int, rng: np.random.Generator) -> Design:
        return fixed_grid_design(n, TIME_GRID)

    def predict(self, phi: np.ndarray, design: Design) -> np.ndarray:
        return _predict(self.check_phi(phi), np.ascontiguousarray(design["times"], dtype=np.float64))[..., None]

    def simulate(self, phi: np.ndarray, design: Design, rng: np.random.Generator) -> np.ndarray:
        phi = self.check_phi(phi)
        mean = self.predict(phi, design)
        sigma = np.exp(phi[:, 5])[:, None, None]
        y = mean + sigma * rng.standard_normal(mean.shape)
        return np.where(design["mask"][..., None], y, 0.0)

    def log_likelihood(self, phi: np.ndarray, observations: np.ndarray, design: Design) -> np.ndarray:
        out = _loglik(self.check_phi(phi), np.ascontiguousarray(design["times"], dtype=np.float64),
                      np.ascontiguousarray(observations[..., 0], dtype=np.float64),
                      np.ascontiguousarray(design["mask"], dtype=np.bool_))
        return np.where(np.isnan(out), -np.inf, out)

    def encode(self, observations: np.ndarray, design: Design) -> np.ndarray:
        return encode_log_fluorescence_per_cell(observations, design)

    def from_dataset(self, data) -> tuple[np.ndarray, Design]:
        return log_fluorescence_from_dataset(self.name, data)
