"""Simulating from the fitted population model: population samples and the visual predictive check (VPC), plain or
prediction-corrected (pcVPC, Bergstrand et al. 2011, AAPS J 13:143), stratified, with BLQ data.

Binning follows the sampling times: one bin per distinct design time when the design is a common grid (few distinct
times, each with enough observations), else optimal one-dimensional k-means bins of the observed times (Jenks natural
breaks, exact by dynamic programming; on log(t + t0) when the times span orders of magnitude, as PK sampling does), so
that clusters of nominal times stay together however sparse the design;
bins with fewer than ``MIN_POINTS_PER_BIN`` observations are merged into a neighbour. Bins are made per stratum.

Prediction correction (per stratum, observation type and bin, PRED = prediction at the typical individual):
pcY = lb + (Y - lb) (PRED_bin - lb) / (PRED - lb) with PRED_bin the median PRED in the bin and lower bound lb = 0;
for observations on a log scale (``log_dv``; by default observation names starting with "log") and wherever some
PRED is negative, the correction is additive, pcY = Y + PRED_bin - PRED. Observed and
simulated values get the same correction. Where PRED - lb is (numerically) 0 no correction is applied.

Censoring: BLQ observations, and simulated values below the limit, enter the quantiles as values below everything
(so observed and simulated data are censored alike); a quantile that falls among them is below the limit and is not
drawn. With BLQ data each panel also has the fraction of BLQ observations per bin against the simulated interval of
that fraction.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from amortized_nlme.model import Design, IndividualModel, take_design
from amortized_nlme.population.model import PopulationModel
from amortized_nlme.report.censoring import Censoring
from amortized_nlme.report.constants import (
    MAX_DISTINCT_TIMES,
    MAX_VPC_INDIVIDUALS,
    MIN_POINTS_PER_BIN,
    MIN_POINTS_PER_TIME,
    N_TIME_BINS,
    N_VPC_REPLICATES,
)
from amortized_nlme.report.residuals import (
    ResidualError,
    individual_predictions,
    simulate_observations,
)

logger = logging.getLogger(__name__)

#: simulated values kept in memory for one VPC (replicates x individuals x time points x types)
VPC_SIMULATION_BUDGET = 20_000_000
_CENSORED = -1e200


# ============================================================================ population simulation
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


# ============================================================================ binning
def _jenks(values: np.ndarray, weights: np.ndarray, k: int) -> np.ndarray:
    """Optimal 1-D k-means of sorted ``values`` with ``weights``: the start index of each of the k clusters
    (dynamic programming over the within-cluster sum of squares)."""
    m = values.size
    k = max(1, min(k, m))
    w = np.concatenate([[0.0], np.cumsum(weights)])
    wx = np.concatenate([[0.0], np.cumsum(weights * values)])
    wx2 = np.concatenate([[0.0], np.cumsum(weights * values * values)])

    def cost(i: np.ndarray, j: int) -> np.ndarray:  # SS of points i..j-1 for an array of i
        W = w[j] - w[i]
        S = wx[j] - wx[i]
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(W > 0, (wx2[j] - wx2[i]) - S * S / np.where(W > 0, W, 1.0), 0.0)

    D = np.full((k + 1, m + 1), np.inf)
    arg = np.zeros((k + 1, m + 1), dtype=np.int64)
    D[0, 0] = 0.0
    for c in range(1, k + 1):
        for j in range(c, m + 1):
            i = np.arange(c - 1, j)
            tot = D[c - 1, i] + cost(i, j)
            a = int(np.argmin(tot))
            D[c, j], arg[c, j] = tot[a], i[a]
    starts = []
    j = m
    for c in range(k, 0, -1):
        i = int(arg[c, j])
        starts.append(i)
        j = i
    return np.array(starts[::-1], dtype=np.int64)


def _kmeans_edges(t: np.ndarray, k: int, max_points: int = 400) -> np.ndarray:
    """Inner bin edges (midpoints between neighbouring clusters) of optimal k-means bins of the times ``t``; more
    than ``max_points`` distinct times are first compressed into that many weighted groups, cut at the largest gaps
    between distinct times (so that no group spans two clusters of sampling times)."""
    uniq, counts = np.unique(t, return_counts=True)
    if uniq.size > max_points:
        cuts = np.sort(np.argsort(np.diff(uniq), kind="stable")[::-1][: max_points - 1]) + 1
        grp = np.zeros(uniq.size, dtype=np.int64)
        grp[cuts] = 1
        grp = np.cumsum(grp)
        wsum = np.bincount(grp, weights=counts)
        vals = np.bincount(grp, weights=counts * uniq) / wsum
        lo = uniq[np.concatenate([[0], cuts])]
        hi = uniq[np.concatenate([cuts - 1, [uniq.size - 1]])]
    else:
        vals, wsum, lo, hi = uniq.astype(np.float64), counts.astype(np.float64), uniq, uniq
    starts = _jenks(vals, wsum, k)
    return np.array([0.5 * (hi[s - 1] + lo[s]) for s in starts[1:]])


def _binning_scale(t: np.ndarray) -> np.ndarray:
    """The scale bins are made on: log(t + t0) with t0 a tenth of the median positive time when the times are
    non-negative and spread over orders of magnitude (largest over median above 3, as in PK sampling at 0.25, 0.5,
    1, 2, ... 24 h, where equal distances on the time axis would merge the early samples), else t itself."""
    pos = t[t > 0]
    if t.min() < 0 or pos.size == 0 or t.max() <= 3.0 * np.median(pos):
        return t
    return np.log(t + 0.1 * np.median(pos))


def _merge_small(t: np.ndarray, b: np.ndarray, n_bins: int, min_points: int) -> np.ndarray:
    """Merge bins with fewer than ``min_points`` observations into the neighbour whose median time is closer."""
    b = b.copy()
    while True:
        labels = np.unique(b)
        if labels.size <= 1:
            return np.searchsorted(labels, b)
        counts = np.array([np.sum(b == lab) for lab in labels])
        small = int(np.argmin(counts))
        if counts[small] >= min_points:
            return np.searchsorted(labels, b)
        med = np.array([np.median(t[b == lab]) for lab in labels])
        if small == 0:
            target = 1
        elif small == labels.size - 1:
            target = small - 1
        else:
            target = small - 1 if med[small] - med[small - 1] <= med[small + 1] - med[small] else small + 1
        b[b == labels[small]] = labels[target]


def time_bins(times: np.ndarray, mask: np.ndarray, n_bins: int | None = None, method: str = "auto",
              min_points: int = MIN_POINTS_PER_BIN) -> tuple[np.ndarray, np.ndarray]:
    """Bin index ``[n, T]`` (-1 where masked) and representative time per bin (median observed time).

    ``method``: ``"nominal"`` (one bin per distinct time), ``"kmeans"`` (optimal 1-D k-means of the observed
    times with ``n_bins`` bins, default ``N_TIME_BINS``, on a log scale for times spread over orders of magnitude,
    see :func:`_binning_scale`), ``"quantile"`` (equal-count bins; ties are kept together)
    or ``"auto"``: nominal when there are at most ``MAX_DISTINCT_TIMES`` distinct times with at least
    ``MIN_POINTS_PER_TIME`` observations each, else k-means. Bins with fewer than ``min_points`` observations are
    merged into a neighbour (not for nominal bins)."""
    times = np.asarray(times, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    t = times[mask]
    idx = np.full(times.shape, -1, dtype=np.int64)
    if t.size == 0:
        return idx, np.empty(0)
    uniq, counts = np.unique(t, return_counts=True)
    if method == "auto":
        nominal = uniq.size <= MAX_DISTINCT_TIMES and counts.min() >= min(MIN_POINTS_PER_TIME, t.size)
        method = "nominal" if nominal else "kmeans"
    if method == "nominal":
        idx[mask] = np.searchsorted(uniq, t)
        return idx, uniq.astype(np.float64)
    k = int(min(n_bins or N_TIME_BINS, uniq.size, max(1, t.size // max(min_points, 1))))
    u = _binning_scale(t)
    if method == "kmeans":
        edges = _kmeans_edges(u, k)
    elif method == "quantile":
        edges = np.unique(np.quantile(u, np.linspace(0.0, 1.0, k + 1))[1:-1])
    else:
        raise ValueError(f"unknown binning method {method!r}: auto, nominal, kmeans or quantile")
    b = np.searchsorted(edges, u, side="right")
    b = _merge_small(t, b, k, min_points)
    idx[mask] = b
    reps = np.array([np.median(t[b == j]) for j in range(int(b.max()) + 1)])
    return idx, reps


# ============================================================================ VPC
@dataclass(frozen=True)
class VPCOptions:
    """How the results folder draws its VPCs: ``stratify`` by ``"group"`` (default; none without groups), a
    covariate column, or None; ``log_y``: also write ``pcvpc_log.png`` (None: when the observations are not on a log
    scale already and mostly positive); ``binning``/``n_bins`` as :func:`time_bins`; ``quantiles`` and the simulated
    ``interval``; ``n_replicates`` simulated data sets of at most ``max_individuals`` individuals; ``log_dv``:
    observations on a log scale, corrected additively (None: by the observation name)."""

    stratify: str | None = "group"
    log_y: bool | None = None
    binning: str = "auto"
    n_bins: int | None = None
    quantiles: tuple[float, ...] = (0.05, 0.5, 0.95)
    interval: float = 0.95
    n_replicates: int = N_VPC_REPLICATES
    max_individuals: int = MAX_VPC_INDIVIDUALS
    log_dv: bool | None = None


@dataclass
class VPCPanel:
    """One stratum and observation type of a VPC: per time bin the observed quantiles and the simulated
    ``interval`` ranges (and medians) of the same quantiles over replicate data sets; NaN where a quantile is below
    the limit of quantification or a bin has too few observations. With BLQ data, the observed fraction of BLQ
    observations per bin and its simulated interval."""

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
    interval: float = 0.95
    bin_lo: np.ndarray | None = None   # [B] earliest and latest observed time of each bin
    bin_hi: np.ndarray | None = None
    prediction_corrected: bool = False
    log_dv: bool = False
    blq_observed: np.ndarray | None = None    # [B] fraction of observations BLQ
    blq_sim_lo: np.ndarray | None = None
    blq_sim_median: np.ndarray | None = None
    blq_sim_hi: np.ndarray | None = None
    lloq: np.ndarray | None = None            # [B] median limit per bin (prediction-corrected in a pcVPC)
    points_t: np.ndarray | None = None        # observations drawn under the quantiles (subsampled, corrected for
    points_y: np.ndarray | None = None        # a pcVPC; BLQ ones left out)

    @property
    def has_blq(self) -> bool:
        return self.blq_observed is not None

    def coverage(self, q_index: int | None = None) -> float:
        """Fraction of bins whose observed quantile lies in the simulated interval (the median by default)."""
        if q_index is None:
            q_index = int(np.argmin(np.abs(np.asarray(self.quantiles) - 0.5)))
        o, lo, hi = self.observed[:, q_index], self.sim_lo[:, q_index], self.sim_hi[:, q_index]
        ok = np.isfinite(o) & np.isfinite(lo) & np.isfinite(hi)
        return float(np.mean((o[ok] >= lo[ok]) & (o[ok] <= hi[ok]))) if ok.any() else float("nan")


@dataclass
class VPCSimulation:
    """Replicate data sets simulated from the fitted population for a (sub)sample of the individuals, with what
    every kind of VPC needs: observations, PRED, strata, censoring."""

    index: np.ndarray          # [m] rows of the data set
    observations: np.ndarray   # [m, T, d]
    mask: np.ndarray           # [m, T]
    times: np.ndarray          # [m, T]
    simulated: np.ndarray      # [R, m, T, d] float32
    pred: np.ndarray           # [m, T, d]
    strata: np.ndarray         # [m] labels
    blq: np.ndarray | None     # [m, T, d]
    lloq: np.ndarray | None    # [m, T, d] filled limits
    obs_names: tuple[str, ...]
    n_total: int
    failed: int = 0

    @property
    def n_replicates(self) -> int:
        return self.simulated.shape[0]


def simulate_vpc(
    population: PopulationModel, theta: np.ndarray, model: IndividualModel, observations: np.ndarray, design: Design,
    covariates: Mapping[str, np.ndarray] | None = None, groups: np.ndarray | None = None, *,
    strata: np.ndarray | None = None, censoring: Censoring | None = None, residual: ResidualError | None = None,
    n_replicates: int = N_VPC_REPLICATES, max_individuals: int = MAX_VPC_INDIVIDUALS, seed: int = 0,
) -> VPCSimulation:
    """Simulate ``n_replicates`` replicate data sets from the fitted population model (each individual's own
    design, covariates and group; at most ``max_individuals`` individuals, fewer when the design is long, chosen at
    random) and compute PRED for the prediction correction. ``strata [n]``: labels to stratify by (default: one
    stratum)."""
    rng = np.random.default_rng(seed)
    obs = np.asarray(observations, dtype=np.float64)
    n, T, d = obs.shape
    cap = max(1, min(max_individuals, VPC_SIMULATION_BUDGET // max(n_replicates * T * d, 1)))
    sub = np.sort(rng.choice(n, size=cap, replace=False)) if n > cap else np.arange(n)
    m = sub.size
    phi = sample_population(population, theta, n, covariates, groups, rng, index=sub, n_replicates=n_replicates)
    sims = np.empty((n_replicates, m, T, d), dtype=np.float32)
    per = max(1, VPC_SIMULATION_BUDGET // 8 // max(m * T * d, 1))  # replicates per simulate call
    for r0 in range(0, n_replicates, per):
        r1 = min(n_replicates, r0 + per)
        rep = take_design(design, np.tile(sub, r1 - r0))
        s = simulate_observations(model, phi[r0:r1].reshape(-1, population.k), rep, rng, residual)
        sims[r0:r1] = np.asarray(s).reshape(r1 - r0, m, T, d)
    failed = int(np.isnan(sims).sum())
    if failed:
        logger.warning("VPC: %d simulated values are NaN (failed simulations); ignored", failed)
    mu = population.design(n, covariates, groups).mean(np.asarray(theta, dtype=np.float64))[sub]
    pred = individual_predictions(model, mu, take_design(design, sub))
    labels = np.full(m, "all", dtype=object) if strata is None else np.asarray(strata).astype(str)[sub]
    blq = lloq = None
    if censoring is not None and np.isfinite(censoring.lloq).any():
        blq = censoring.blq[sub]
        lloq = censoring.filled_lloq()[sub]
    names = tuple(model.obs_names[j] if j < len(model.obs_names) else f"y{j}" for j in range(d))
    return VPCSimulation(sub, obs[sub], np.asarray(design["mask"], dtype=bool)[sub],
                         np.asarray(design["times"], dtype=np.float64)[sub], sims, pred, labels, blq, lloq, names, n,
                         failed)


def _correct(y: np.ndarray, pred: np.ndarray, pred_bin: float, log_dv: bool, lb: float = 0.0) -> np.ndarray:
    """Prediction-corrected values (see the module docstring); censored sentinels stay censored."""
    if log_dv:
        out = y + (pred_bin - pred)
    else:
        denom = pred - lb
        scale = max(float(np.nanmax(np.abs(pred))) if pred.size else 0.0, 1e-300)
        ok = (denom > 1e-9 * scale) & (pred_bin - lb > 1e-9 * scale)
        with np.errstate(divide="ignore", invalid="ignore"):
            out = np.where(ok, lb + (y - lb) * (pred_bin - lb) / np.where(ok, denom, 1.0), y)
    return np.where(y <= _CENSORED / 2, _CENSORED, out)


def vpc_panels(sim: VPCSimulation, *, prediction_corrected: bool = False, log_dv: bool | None = None,
               quantiles: Sequence[float] = (0.05, 0.5, 0.95), interval: float = 0.95, binning: str = "auto",
               n_bins: int | None = None, min_points: int = 3, max_points: int = 3000) -> list[VPCPanel]:
    """The panels of a VPC (pcVPC with ``prediction_corrected``) from one :class:`VPCSimulation`: one per stratum
    and observation type. ``log_dv``: observations on a log scale (additive correction); None: additive for
    observation names starting with ``log`` and for predictions that can be negative, else proportional. At most
    ``max_points`` observations per panel are kept for drawing."""
    qs = np.asarray(quantiles, dtype=np.float64)
    a = (1.0 - interval) / 2.0
    panels = []
    for label in sorted(set(sim.strata.tolist()), key=str):
        rows = np.flatnonzero(sim.strata == label)
        mask_s = sim.mask[rows]
        bins, reps = time_bins(sim.times[rows], mask_s, n_bins=n_bins, method=binning)
        B = reps.size
        t_s = sim.times[rows]
        for j, name in enumerate(sim.obs_names):
            obs_s = sim.observations[rows][..., j].copy()
            sim_s = sim.simulated[:, rows][..., j].astype(np.float64)
            pred_s = sim.pred[rows][..., j]
            if log_dv is None:  # additive for log-scale observations and for predictions that can be negative
                log_j = name.lower().startswith("log") or bool(np.nanmin(pred_s[mask_s], initial=0.0) < 0.0)
            else:
                log_j = bool(log_dv)
            blq_s = sim.blq[rows][..., j] if sim.blq is not None else None
            if blq_s is not None:
                lloq_s = sim.lloq[rows][..., j]
                obs_s = np.where(blq_s, _CENSORED, obs_s)
                sim_blq = sim_s < lloq_s[None]
                sim_s = np.where(sim_blq, _CENSORED, sim_s)
            o = np.full((B, qs.size), np.nan)
            lo, md, hi = (np.full((B, qs.size), np.nan) for _ in range(3))
            counts = np.zeros(B, dtype=np.int64)
            blo, bhi = np.full(B, np.nan), np.full(B, np.nan)
            fr_o = np.full(B, np.nan) if blq_s is not None else None
            fr_lo, fr_md, fr_hi = ((np.full(B, np.nan) for _ in range(3)) if blq_s is not None
                                   else (None, None, None))
            lloq_b = np.full(B, np.nan) if blq_s is not None else None
            pts_t: list[np.ndarray] = []
            pts_y: list[np.ndarray] = []
            for b in range(B):
                sel = mask_s & (bins == b)
                c = int(sel.sum())
                counts[b] = c
                if c == 0:
                    continue
                blo[b], bhi[b] = t_s[sel].min(), t_s[sel].max()
                yo, ys = obs_s[sel], sim_s[:, sel]
                if blq_s is not None:
                    lim = lloq_s[sel]
                    if prediction_corrected:
                        lim = _correct(lim, pred_s[sel], float(np.median(pred_s[sel])), log_j)
                    lloq_b[b] = float(np.median(lim))
                    fr_o[b] = float(blq_s[sel].mean())
                    fr = sim_blq[:, sel].mean(axis=1)
                    fr_lo[b], fr_md[b], fr_hi[b] = np.quantile(fr, [a, 0.5, 1.0 - a])
                if c < min_points:
                    continue
                if prediction_corrected:
                    pb = float(np.median(pred_s[sel]))
                    yo = _correct(yo, pred_s[sel], pb, log_j)
                    ys = _correct(ys, pred_s[sel][None], pb, log_j)
                o[b] = np.quantile(yo, qs)
                keep = yo > _CENSORED / 1e50
                pts_t.append(t_s[sel][keep])
                pts_y.append(yo[keep])
                sq = np.nanquantile(ys, qs, axis=1) if sim.failed else np.quantile(ys, qs, axis=1)  # [Q, R]
                lo[b], md[b], hi[b] = np.quantile(sq, [a, 0.5, 1.0 - a], axis=1)
            for arr in (o, lo, md, hi):
                arr[arr <= _CENSORED / 1e50] = np.nan  # quantiles among the censored values: below the limit
            pt = np.concatenate(pts_t) if pts_t else np.empty(0)
            py = np.concatenate(pts_y) if pts_y else np.empty(0)
            if pt.size > max_points:
                keep = np.random.default_rng(j).choice(pt.size, max_points, replace=False)
                pt, py = pt[keep], py[keep]
            panels.append(VPCPanel(str(label), j, name, reps, counts, tuple(qs.tolist()), o, lo, md, hi, interval,
                                   blo, bhi, prediction_corrected, log_j, fr_o, fr_lo, fr_md, fr_hi, lloq_b, pt, py))
    return panels


def visual_predictive_check(
    population: PopulationModel, theta: np.ndarray, model: IndividualModel, observations: np.ndarray, design: Design,
    covariates: Mapping[str, np.ndarray] | None = None, groups: np.ndarray | None = None, *,
    n_replicates: int = N_VPC_REPLICATES, max_individuals: int = MAX_VPC_INDIVIDUALS,
    quantiles: Sequence[float] = (0.05, 0.5, 0.95), interval: float = 0.95, seed: int = 0,
    prediction_corrected: bool = False, log_dv: bool | None = None, strata: np.ndarray | None | str = "groups",
    censoring: Censoring | None = None, residual: ResidualError | None = None, binning: str = "auto",
    n_bins: int | None = None,
) -> list[VPCPanel]:
    """Simulate replicate data sets from the fitted population model and compare the observed ``quantiles`` per
    time bin with the simulated ``interval`` ranges of the same quantiles (:func:`simulate_vpc`, :func:`vpc_panels`).
    ``strata``: ``"groups"`` (one stratum per group, or one for everyone without groups), None (one stratum) or
    labels ``[n]``."""
    labels = (groups if isinstance(strata, str) and strata == "groups" else strata)
    sim = simulate_vpc(population, theta, model, observations, design, covariates, groups, strata=labels,
                       censoring=censoring, residual=residual, n_replicates=n_replicates,
                       max_individuals=max_individuals, seed=seed)
    return vpc_panels(sim, prediction_corrected=prediction_corrected, log_dv=log_dv, quantiles=quantiles,
                      interval=interval, binning=binning, n_bins=n_bins)


def stratum_labels(name: str | None, groups: np.ndarray | None, covariates: Mapping[str, np.ndarray] | None,
                   n: int, max_levels: int = 6) -> tuple[np.ndarray | None, str]:
    """Labels ``[n]`` to stratify a VPC by ``name``: ``"group"`` (the groups), a covariate column (its values when
    it has at most ``max_levels`` levels, else below / at or above its median), or None; and a description."""
    if name is None:
        return None, "none"
    if name == "group":
        return (None, "none") if groups is None else (np.asarray(groups).astype(str), "group")
    if not covariates or name not in covariates:
        raise ValueError(f"cannot stratify the VPC by {name!r}: not 'group' nor a covariate "
                         f"({sorted(covariates or {})})")
    x = np.asarray(covariates[name]).reshape(-1)
    if x.size != n:
        raise ValueError(f"covariate {name!r} has {x.size} values for {n} individuals")
    levels = np.unique(x)
    if levels.size <= max_levels:
        return np.array([f"{name}={v:g}" if isinstance(v, (float, np.floating)) else f"{name}={v}" for v in x],
                        dtype=object), name
    med = float(np.median(x))
    return np.where(x < med, f"{name} < {med:.3g}", f"{name} >= {med:.3g}").astype(object), f"{name} (median split)"
