"""Residual-error parameters as population parameters, estimated through the exact likelihood.

The individual likelihood of observations y_it with predictions f_ijt(psi_ij) at draw j is Gaussian with sd

    additive:      s = a
    proportional:  s = b f
    combined:      s = sqrt(a^2 + b^2 f^2)

and, for a censored observation (below its limit L, Beal's M3), P(y < L) = Phi((L - f) / s). The residual sds are
population parameters (``log_sigma_add``, ``log_sigma_prop`` in theta, log scale), not individual ones: they enter
the exact importance weights of every draw, so they are estimated (and profiled) exactly, with no kernel.

What the objective needs per draw is held in :class:`ErrorStatistics`:

* ``sufficient`` (additive or proportional, nothing censored): per individual the number of observations n_i and per
  draw the sum of squared (relative) residuals and, for the proportional model, sum_t log f_ijt. Then
      log p(y_i | psi_ij, a) = -n_i log a - SSR_ij / (2 a^2) - n_i log(2 pi) / 2   (additive)
  and the objective costs O(1) per draw whatever the number of observations;
* ``pointwise`` (combined error, or censored observations): the predictions f_ijt themselves (float32), evaluated per
  point at each objective evaluation (O(T) per draw).

The derivative of each draw's log-likelihood with respect to log a and log b is computed alongside, so the population
objective keeps its analytic gradient.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numba as nb
import numpy as np

from amortized_nlme.model import RESIDUAL_KINDS, ResidualError

__all__ = ["ErrorStatistics", "ResidualError", "draw_loglik", "draw_logliks", "error_statistics", "residual_start"]

_LOG_2PI = math.log(2.0 * math.pi)
_SQRT2 = math.sqrt(2.0)


class ErrorStatistics:
    """Per-draw quantities from which the objective evaluates log p(y_i | psi_ij, residual sds) (see module doc).

    ``mode`` "sufficient": ``n_obs [n]``, ``ssr [n, M]`` (sum of squared residuals; relative ones for the
    proportional model) and ``sum_log_f [n, M]`` (proportional only, else zeros). ``mode`` "pointwise": ``y [n, P]``,
    ``observed [n, P]`` (bool), ``censored [n, P]`` (bool: y holds the limit) and ``f [n, M, P]`` float32.
    """

    def __init__(self, kind: str, mode: str, *, n_obs: np.ndarray | None = None, ssr: np.ndarray | None = None,
                 sum_log_f: np.ndarray | None = None, y: np.ndarray | None = None, observed: np.ndarray | None = None,
                 censored: np.ndarray | None = None, f: np.ndarray | None = None) -> None:
        if kind not in RESIDUAL_KINDS or mode not in ("sufficient", "pointwise"):
            raise ValueError(f"bad error statistics kind/mode {kind!r}/{mode!r}")
        if mode == "sufficient" and (kind == "combined" or ssr is None or n_obs is None):
            raise ValueError("sufficient statistics exist for the additive and proportional models only")
        self.kind, self.mode = kind, mode
        if mode == "sufficient":
            self.n_obs = np.ascontiguousarray(n_obs, dtype=np.float64)
            self.ssr = np.ascontiguousarray(ssr, dtype=np.float64)
            self.sum_log_f = np.ascontiguousarray(sum_log_f if sum_log_f is not None else np.zeros_like(self.ssr),
                                                  dtype=np.float64)
            self.f = np.zeros((1, 1, 1), np.float32)
            self.y = np.zeros((1, 1))
            self.observed = np.zeros((1, 1), bool)
            self.censored = np.zeros((1, 1), bool)
        else:
            self.f = np.ascontiguousarray(f, dtype=np.float32)
            self.y = np.ascontiguousarray(y, dtype=np.float64)
            self.observed = np.ascontiguousarray(observed, dtype=np.bool_)
            self.censored = np.ascontiguousarray(censored if censored is not None else np.zeros_like(self.observed),
                                                 dtype=np.bool_)
            self.n_obs = self.observed.sum(axis=1).astype(np.float64)
            self.ssr = np.zeros((1, 1))
            self.sum_log_f = np.zeros((1, 1))

    @property
    def M(self) -> int:
        return self.ssr.shape[1] if self.mode == "sufficient" else self.f.shape[1]

    def take_draws(self, index: slice | np.ndarray) -> "ErrorStatistics":
        if self.mode == "sufficient":
            return ErrorStatistics(self.kind, self.mode, n_obs=self.n_obs, ssr=self.ssr[:, index],
                                   sum_log_f=self.sum_log_f[:, index])
        return ErrorStatistics(self.kind, self.mode, y=self.y, observed=self.observed, censored=self.censored,
                               f=self.f[:, index])

    @staticmethod
    def concatenate(parts: Sequence["ErrorStatistics"]) -> "ErrorStatistics":
        first = parts[0]
        if any(p.kind != first.kind or p.mode != first.mode for p in parts):
            raise ValueError("error statistics to concatenate must have the same kind and mode")
        if first.mode == "sufficient":
            return ErrorStatistics(first.kind, first.mode, n_obs=first.n_obs,
                                   ssr=np.concatenate([p.ssr for p in parts], axis=1),
                                   sum_log_f=np.concatenate([p.sum_log_f for p in parts], axis=1))
        return ErrorStatistics(first.kind, first.mode, y=first.y, observed=first.observed, censored=first.censored,
                               f=np.concatenate([p.f for p in parts], axis=1))

    def replace_individuals(self, rows: np.ndarray, other: "ErrorStatistics") -> "ErrorStatistics":
        """These statistics with individuals ``rows`` taken from ``other`` (same draws count)."""
        if self.mode == "sufficient":
            ssr, slf = self.ssr.copy(), self.sum_log_f.copy()
            ssr[rows], slf[rows] = other.ssr, other.sum_log_f
            return ErrorStatistics(self.kind, self.mode, n_obs=self.n_obs, ssr=ssr, sum_log_f=slf)
        f = self.f.copy()
        f[rows] = other.f
        return ErrorStatistics(self.kind, self.mode, y=self.y, observed=self.observed, censored=self.censored, f=f)

    def codes(self) -> tuple[int, int]:
        """(mode code, kind code) for the numba kernel: mode 0 none, 1 sufficient, 2 pointwise; kind 0 additive,
        1 proportional, 2 combined."""
        return (1 if self.mode == "sufficient" else 2), RESIDUAL_KINDS.index(self.kind)


def error_statistics(kind: str, predictions: np.ndarray, y: np.ndarray, observed: np.ndarray,
                     censored: np.ndarray | None = None, force_pointwise: bool = False) -> ErrorStatistics:
    """Statistics of draws' predictions ``[n, M, P]`` against observations ``y [n, P]`` (``observed``: which points
    count; ``censored``: y holds a lower limit). Sufficient statistics where they exist, pointwise otherwise."""
    observed = np.asarray(observed, dtype=bool)
    cens = np.zeros_like(observed) if censored is None else (np.asarray(censored, dtype=bool) & observed)
    if kind == "combined" or cens.any() or force_pointwise:
        return ErrorStatistics(kind, "pointwise", y=y, observed=observed, censored=cens, f=predictions)
    f = np.asarray(predictions, dtype=np.float64)
    r = np.where(observed[:, None, :], np.asarray(y, dtype=np.float64)[:, None, :] - f, 0.0)
    if kind == "additive":
        return ErrorStatistics(kind, "sufficient", n_obs=observed.sum(axis=1), ssr=np.sum(r * r, axis=2))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        rel = np.where(observed[:, None, :], r / f, 0.0)
        logf = np.where(observed[:, None, :], np.log(np.abs(f)), 0.0)
    with np.errstate(over="ignore", invalid="ignore"):
        ssr, slf = np.sum(rel * rel, axis=2), np.sum(logf, axis=2)
    bad = ~(np.isfinite(ssr) & np.isfinite(slf))
    ssr[bad], slf[bad] = np.inf, 0.0  # a zero prediction at an observation: the draw has likelihood 0
    return ErrorStatistics(kind, "sufficient", n_obs=observed.sum(axis=1), ssr=ssr, sum_log_f=slf)


# ----------------------------------------------------------------------------------------------- numba pieces


@nb.njit(cache=True, inline="always")
def _log_ndtr(u: float) -> float:
    """log Phi(u), accurate in the lower tail (asymptotic series below -20)."""
    if u > -20.0:
        return math.log(0.5 * math.erfc(-u / _SQRT2))
    u2 = u * u
    return -0.5 * u2 - math.log(-u) - 0.5 * _LOG_2PI + math.log1p(-1.0 / u2 + 3.0 / (u2 * u2))


@nb.njit(cache=True, inline="always")
def _mills(u: float) -> float:
    """phi(u) / Phi(u), the derivative of log Phi, stable in the lower tail."""
    if u > -20.0:
        return math.exp(-0.5 * u * u - 0.5 * _LOG_2PI) / (0.5 * math.erfc(-u / _SQRT2))
    u2 = u * u
    return -u / (1.0 - 1.0 / u2 + 3.0 / (u2 * u2))


@nb.njit(cache=True)
def draw_loglik(mode: int, kind: int, i: int, j: int, a: float, b: float, n_obs: np.ndarray, ssr: np.ndarray,
                slf: np.ndarray, y: np.ndarray, observed: np.ndarray, censored: np.ndarray, f: np.ndarray,
                grad: np.ndarray) -> float:
    """log p(y_i | psi_ij; a, b) and its derivatives with respect to log a and log b (written into ``grad[0:2]``)."""
    if mode == 1:
        n = n_obs[i]
        s2 = ssr[i, j]
        if not s2 < np.inf:  # a prediction of 0 under a proportional error, or an overflow: likelihood 0
            grad[0] = 0.0
            grad[1] = 0.0
            return -np.inf
        if kind == 0:
            inv = 1.0 / (a * a)
            grad[0] = -n + s2 * inv
            grad[1] = 0.0
            return -n * math.log(a) - 0.5 * s2 * inv - 0.5 * n * _LOG_2PI
        inv = 1.0 / (b * b)
        grad[0] = 0.0
        grad[1] = -n + s2 * inv
        return -n * math.log(b) - slf[i, j] - 0.5 * s2 * inv - 0.5 * n * _LOG_2PI
    total = 0.0
    ga = 0.0
    gb = 0.0
    P = y.shape[1]
    for t in range(P):
        if not observed[i, t]:
            continue
        ft = float(f[i, j, t])
        va = a * a
        vb = b * b * ft * ft
        v = va + vb
        if v <= 0.0:
            grad[0] = 0.0
            grad[1] = 0.0
            return -np.inf
        s = math.sqrt(v)
        if censored[i, t]:
            u = (y[i, t] - ft) / s
            total += _log_ndtr(u)
            g = -u * _mills(u)  # d/d log s
        else:
            r = y[i, t] - ft
            z2 = r * r / v
            total += -0.5 * z2 - math.log(s) - 0.5 * _LOG_2PI
            g = z2 - 1.0
        ga += g * va / v
        gb += g * vb / v
    grad[0] = ga
    grad[1] = gb
    return total


@nb.njit(cache=True, parallel=True)
def _draw_logliks(mode: int, kind: int, i0: int, i1: int, M: int, a: float, b: float, n_obs: np.ndarray,
                  ssr: np.ndarray, slf: np.ndarray, y: np.ndarray, observed: np.ndarray, censored: np.ndarray,
                  f: np.ndarray) -> np.ndarray:
    out = np.empty((i1 - i0, M))
    for r in nb.prange(i1 - i0):
        g = np.zeros(2)
        for j in range(M):
            out[r, j] = draw_loglik(mode, kind, i0 + r, j, a, b, n_obs, ssr, slf, y, observed, censored, f, g)
    return out


def draw_logliks(errors: ErrorStatistics, sd_add: float, sd_prop: float,
                 rows: slice | np.ndarray | None = None) -> np.ndarray:
    """log p(y_i | psi_ij; sds) of every draw of individuals ``rows`` (a slice or indices; default all),
    ``[n_rows, M]``."""
    mode, kind = errors.codes()
    n = errors.n_obs.shape[0]
    if rows is None or isinstance(rows, slice):
        i0, i1, step = (rows or slice(None)).indices(n)
        if step == 1:
            return _draw_logliks(mode, kind, i0, i1, errors.M, float(sd_add), float(sd_prop), errors.n_obs,
                                 errors.ssr, errors.sum_log_f, errors.y, errors.observed, errors.censored, errors.f)
        rows = np.arange(i0, i1, step)
    full = _draw_logliks(mode, kind, 0, n, errors.M, float(sd_add), float(sd_prop), errors.n_obs, errors.ssr,
                         errors.sum_log_f, errors.y, errors.observed, errors.censored, errors.f)
    return full[np.asarray(rows)]


def residual_start(errors: ErrorStatistics, kind: str) -> np.ndarray:
    """Log residual sds to start the optimiser from: the pooled residual scale of each individual's best draws."""
    if errors.mode == "sufficient":
        best = np.min(np.where(np.isfinite(errors.ssr), errors.ssr, np.inf), axis=1)
        ok = np.isfinite(best)
        pooled = np.sqrt(np.sum(best[ok]) / max(np.sum(errors.n_obs[ok]), 1.0))
        return np.array([np.log(max(pooled, 1e-12))])
    f = errors.f.astype(np.float64)
    r = np.where(errors.observed[:, None, :] & ~errors.censored[:, None, :], errors.y[:, None, :] - f, np.nan)
    j = np.nanargmin(np.nansum(r * r, axis=2), axis=1)
    rb = r[np.arange(r.shape[0]), j]
    fb = f[np.arange(r.shape[0]), j]
    ok = np.isfinite(rb)
    add = np.sqrt(np.mean(rb[ok] ** 2)) if ok.any() else 1.0
    with np.errstate(divide="ignore", invalid="ignore"):
        prop = np.sqrt(np.nanmean((rb[ok] / fb[ok]) ** 2)) if ok.any() else 0.1
    if kind == "additive":
        return np.log([max(add, 1e-12)])
    if kind == "proportional":
        return np.log([max(prop, 1e-6)])
    return np.log([max(0.5 * add, 1e-12), max(0.5 * prop, 1e-6)])
