"""What the mRNA transfection models share (simple, detailed, SDE): the Fröhlich et al. 2018 time-lapse grid, the
Gaussian likelihood on log fluorescence, the encoders of log-fluorescence series, and laying real fluorescence data
out on the model grid."""

from __future__ import annotations

import numba as nb
import numpy as np

from amortized_nlme.errors import DataError
from amortized_nlme.model import Design

#: the time-lapse grid of the Fröhlich data: every 10 minutes from 1/6 h to 30 h
TIME_GRID = np.arange(1, 181, dtype=np.float64) / 6.0

# fixed affine scaling of log-fluorescence before the summary network (never running moments: see DESIGN notes)
OBS_CENTER = 4.0
OBS_SCALE = 4.0
TIME_SCALE = 30.0



@nb.njit(parallel=True, cache=True)
def _gaussian_loglik(y: np.ndarray, mean: np.ndarray, log_sigma: np.ndarray, mask: np.ndarray) -> np.ndarray:
    n, T, d = y.shape
    out = np.empty(n)
    half_log_2pi = 0.5 * np.log(2.0 * np.pi)
    for i in nb.prange(n):
        ls = log_sigma[i]
        inv = np.exp(-ls)
        acc = 0.0
        count = 0
        for t in range(T):
            if not mask[i, t]:
                continue
            for c in range(d):
                z = (y[i, t, c] - mean[i, t, c]) * inv
                acc -= 0.5 * z * z
                count += 1
        out[i] = acc - count * (ls + half_log_2pi)
    return out


def gaussian_log_likelihood(observations: np.ndarray, mean: np.ndarray, log_sigma: np.ndarray, mask: np.ndarray
                            ) -> np.ndarray:
    """Sum over observed points of log N(y; mean, sigma^2), one value per individual (additive error on the
    observation scale; shared by the mRNA models). Non-finite terms (overflow far in the tails) give -inf."""
    out = _gaussian_loglik(np.ascontiguousarray(observations, dtype=np.float64),
                           np.ascontiguousarray(mean, dtype=np.float64),
                           np.ascontiguousarray(log_sigma, dtype=np.float64),
                           np.ascontiguousarray(mask, dtype=np.bool_))
    return np.where(np.isnan(out), -np.inf, out)


def encode_log_fluorescence(observations: np.ndarray, design: Design) -> np.ndarray:
    """Channels: scaled log fluorescence, scaled time, observed flag (the version-1 encoder; still mrna_detailed's)."""
    mask = design["mask"].astype(np.float32)
    y = (observations[..., 0].astype(np.float32) - OBS_CENTER) / OBS_SCALE
    t = design["times"].astype(np.float32) / TIME_SCALE
    return np.stack([y * mask, t * mask, mask], axis=-1)


#: 1 / (Phi^-1(3/4) sqrt(6)): turns the median absolute second difference of white noise into its sd
_MAD2_TO_SD = 1.0 / (0.6744897501960817 * np.sqrt(6.0))
PER_CELL_CHANNELS = 7


@nb.njit(parallel=True, cache=True)
def _per_cell_channels(y: np.ndarray, t: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The ``PER_CELL_CHANNELS`` channels of :func:`encode_log_fluorescence_per_cell`, zero where masked."""
    n, T = y.shape
    out = np.zeros((n, T, PER_CELL_CHANNELS), dtype=np.float32)
    for i in nb.prange(n):
        idx = np.flatnonzero(mask[i])
        m = idx.size
        if m == 0:
            continue
        v = y[i, idx]
        mean = v.mean()
        sd = max(np.sqrt(np.mean((v - mean) ** 2)), 1e-3)
        noise = 1e-3
        if m >= 3:
            d2 = np.abs(v[2:] - 2.0 * v[1:-1] + v[:-2])
            noise = max(np.median(d2) * _MAD2_TO_SD, 1e-3)
        first = v[: min(m, 3)].mean()
        for k in range(m):
            j = idx[k]
            out[i, j, 0] = (v[k] - mean) / sd
            out[i, j, 1] = t[i, j] / TIME_SCALE
            out[i, j, 2] = 1.0
            out[i, j, 3] = (mean - OBS_CENTER) / OBS_SCALE
            out[i, j, 4] = np.log(sd) / 2.0
            out[i, j, 5] = (np.log(noise) + 2.0) / 2.0
            out[i, j, 6] = (first - OBS_CENTER) / OBS_SCALE
    return out


def encode_log_fluorescence_per_cell(observations: np.ndarray, design: Design) -> np.ndarray:
    """Channels: log fluorescence standardized per cell, scaled time, observed flag, and per-cell constants (mean,
    log sd, log of a robust noise sd from second differences, level of the first frames).

    Why: the cells' levels span ~8 log units while the noise is ~0.03; the fixed global scaling of the first
    encoder made the summary network learn the noise level and the level from the raw series, and its posteriors
    stayed far wider than the exact ones. These statistics hand it both directly."""
    y = np.ascontiguousarray(observations[..., 0], dtype=np.float64)
    t = np.ascontiguousarray(design["times"], dtype=np.float64)
    return _per_cell_channels(y, t, np.ascontiguousarray(design["mask"], dtype=np.bool_))


def log_fluorescence_from_dataset(model_name: str, data) -> tuple[np.ndarray, Design]:
    """Lay fluorescence data (DV > 0, raw intensity) out as log observations on the model's padded grid."""
    n = data.n_individuals
    T = max(len(t) for t in data.times)
    times = np.zeros((n, T))
    mask = np.zeros((n, T), dtype=bool)
    obs = np.zeros((n, T, 1))
    for i in range(n):
        dv = np.asarray(data.dv[i], dtype=np.float64)
        if np.any(dv <= 0):
            bad = int(np.flatnonzero(dv <= 0)[0])
            row = int(data.source_rows[i][bad]) if data.source_rows else -1
            raise DataError(f"{data.path}: row {row}, column DV: {model_name} observes log(DV), "
                            f"so DV must be > 0 (got {dv[bad]})")
        m = dv.size
        times[i, :m] = data.times[i]
        mask[i, :m] = True
        obs[i, :m, 0] = np.log(dv)
    return obs, {"times": times, "mask": mask}
