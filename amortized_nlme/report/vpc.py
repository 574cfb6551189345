"""Simulating from the fitted population model: population samples and the visual predictive check (observed vs
simulated quantiles per time bin)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from amortized_nlme.model import Design, IndividualModel, take_design
from amortized_nlme.population.model import PopulationModel
from amortized_nlme.report.constants import (
    MAX_DISTINCT_TIMES,
    MAX_VPC_INDIVIDUALS,
    MIN_POINTS_PER_TIME,
    N_TIME_BINS,
    N_VPC_REPLICATES,
)

logger = logging.getLogger(__name__)


# ============================================================================ population simulation and VPC
def sample_population(population: PopulationModel, theta: np.ndarray, n: int,
                      covariates: Mapping[str, np.ndarray] | None, groups: np.ndarray | None,
                      rng: np.random.Generator, index: np.ndarray | None = None, n_replicates: int = 1) -> np.ndarray:
    """Individual log-parameters from the fitted population ``[n_replicates, len(index), k]``: phi = mean_i(theta) +
    L z with the full Cholesky factor (random effects from Omega, parameters without random effect with their kernel
    width ``fixed_std``), at each individual's covariates and group (rows ``index`` of the ``n`` individuals)."""
    mu = population.design(n, covariates, groups).mean(np.asarray(theta, dtype=np.float64))
    if index is not None:
        mu = mu[index]
    L = population.cholesky(theta)
    z = rng.standard_normal((n_replicates, mu.shape[0], population.k))
    return mu[None] + z @ L.T


def full_parameters(model: IndividualModel, population: PopulationModel, theta: np.ndarray, psi: np.ndarray
                    ) -> np.ndarray:
    """The individual model's parameter vectors ``[n, k_model]`` for population samples ``psi [n, k_pop]``: residual
    sds that the population estimates as population parameters are set to their estimates."""
    names = tuple(model.param_names)
    if tuple(population.param_names_individual) == names:
        return psi
    out = np.empty((psi.shape[0], len(names)))
    for j, p in enumerate(population.param_names_individual):
        out[:, names.index(p)] = psi[:, j]
    if population.residual is not None:
        values = np.asarray(theta)[population.n_cov_end:]
        for p, v in zip(population.residual.names, values):
            if p in names:
                out[:, names.index(p)] = v
    return out


@dataclass
class VPCPanel:
    """One stratum (group) and observation type of a visual predictive check: per time bin the observed quantiles and
    the simulated ``interval`` ranges (and medians) of the same quantiles over replicate populations."""

    stratum: str
    obs_index: int
    obs_name: str
    times: np.ndarray          # [B] representative time of each bin (median observed time)
    n_obs: np.ndarray          # [B] observations per bin
    quantiles: tuple[float, ...]
    observed: np.ndarray       # [B, Q]
    sim_lo: np.ndarray         # [B, Q]
    sim_median: np.ndarray     # [B, Q]
    sim_hi: np.ndarray         # [B, Q]
    interval: float = 0.9

    def coverage(self, q_index: int | None = None) -> float:
        """Fraction of bins whose observed quantile lies in the simulated interval (the median by default)."""
        if q_index is None:
            q_index = int(np.argmin(np.abs(np.asarray(self.quantiles) - 0.5)))
        o, lo, hi = self.observed[:, q_index], self.sim_lo[:, q_index], self.sim_hi[:, q_index]
        ok = np.isfinite(o) & np.isfinite(lo)
        return float(np.mean((o[ok] >= lo[ok]) & (o[ok] <= hi[ok]))) if ok.any() else float("nan")


def time_bins(times: np.ndarray, mask: np.ndarray, n_bins: int = N_TIME_BINS) -> tuple[np.ndarray, np.ndarray]:
    """Bin index ``[n, T]`` (-1 where masked) and representative time per bin: the distinct design times when they
    are few and repeated (a common grid), else ``n_bins`` bins of equal observation count."""
    t = times[mask]
    uniq, counts = np.unique(t, return_counts=True)
    idx = np.full(times.shape, -1, dtype=np.int64)
    if uniq.size <= MAX_DISTINCT_TIMES and counts.min() >= min(MIN_POINTS_PER_TIME, t.size):
        idx[mask] = np.searchsorted(uniq, t)
        return idx, uniq
    edges = np.unique(np.quantile(t, np.linspace(0.0, 1.0, n_bins + 1)))
    b = np.clip(np.searchsorted(edges[1:-1], t, side="right"), 0, max(edges.size - 2, 0))
    idx[mask] = b
    reps = np.array([np.median(t[b == j]) if np.any(b == j) else np.nan for j in range(max(edges.size - 1, 1))])
    return idx, reps


def visual_predictive_check(
    population: PopulationModel, theta: np.ndarray, model: IndividualModel, observations: np.ndarray, design: Design,
    covariates: Mapping[str, np.ndarray] | None = None, groups: np.ndarray | None = None, *,
    n_replicates: int = N_VPC_REPLICATES, max_individuals: int = MAX_VPC_INDIVIDUALS,
    quantiles: Sequence[float] = (0.1, 0.5, 0.9), interval: float = 0.9, seed: int = 0,
) -> list[VPCPanel]:
    """Simulate ``n_replicates`` replicate populations from the fitted population model (each individual's own design,
    covariates and group; at most ``max_individuals`` individuals, chosen at random) and compare the observed
    ``quantiles`` per time bin with the simulated ``interval`` ranges of the same quantiles. One panel per group (or
    one for everyone) and observation type."""
    rng = np.random.default_rng(seed)
    n = observations.shape[0]
    sub = np.sort(rng.choice(n, size=max_individuals, replace=False)) if n > max_individuals else np.arange(n)
    m = sub.size
    phi = sample_population(population, theta, n, covariates, groups, rng, index=sub, n_replicates=n_replicates)
    rep_design = take_design(design, np.tile(sub, n_replicates))
    sim = model.simulate(full_parameters(model, population, theta, phi.reshape(-1, population.k)), rep_design, rng)
    sim = sim.reshape(n_replicates, m, *sim.shape[1:])
    has_nan = bool(np.isnan(sim).any())
    if has_nan:
        logger.warning("VPC: %d simulated values are NaN (failed simulations); ignored", int(np.isnan(sim).sum()))
    obs = observations[sub]
    mask = np.asarray(design["mask"], dtype=bool)[sub]
    bins, reps = time_bins(np.asarray(design["times"], dtype=np.float64)[sub], mask)
    if groups is None:
        strata = [("all", np.arange(m))]
    else:
        labels = np.asarray(groups).astype(str)[sub]
        strata = [(g, np.flatnonzero(labels == g)) for g in sorted(set(labels.tolist()))]
    qs = np.asarray(quantiles, dtype=np.float64)
    a = (1.0 - interval) / 2.0
    panels = []
    for label, rows in strata:
        bins_s, mask_s = bins[rows], mask[rows]
        for j in range(obs.shape[2]):
            B = reps.size
            o = np.full((B, qs.size), np.nan)
            lo, md, hi = (np.full((B, qs.size), np.nan) for _ in range(3))
            counts = np.zeros(B, dtype=np.int64)
            sim_s, obs_s = sim[:, rows][..., j], obs[rows][..., j]
            for b in range(B):
                sel = mask_s & (bins_s == b)
                c = int(sel.sum())
                counts[b] = c
                if c < 3:
                    continue
                o[b] = np.quantile(obs_s[sel], qs)
                vals = sim_s[:, sel]
                sq = (np.nanquantile if has_nan else np.quantile)(vals, qs, axis=1)  # [Q, R]
                lo[b], md[b], hi[b] = np.quantile(sq, [a, 0.5, 1.0 - a], axis=1)
            name = model.obs_names[j] if j < len(model.obs_names) else f"y{j}"
            panels.append(VPCPanel(label, j, name, reps, counts, tuple(qs.tolist()), o, lo, md, hi, interval))
    return panels
