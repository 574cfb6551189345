"""The figures of a results folder: multistart waterfall, profiles, individual fits, VPC, parameter distributions."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from amortized_nlme.model import Design, IndividualModel, take_design
from amortized_nlme.population.fit import FitResult
from amortized_nlme.report.constants import (
    MAX_DENSITY_INDIVIDUALS,
    N_FIT_DRAWS,
    N_INDIVIDUAL_FITS,
)
from amortized_nlme.report.tables import level_tag
from amortized_nlme.report.vpc import VPCPanel

logger = logging.getLogger(__name__)


# ============================================================================ plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _time_label(model: IndividualModel) -> str:
    unit = getattr(model, "time_unit", None)
    return f"time [{unit}]" if unit else "time"


def _tight(fig: Any) -> None:
    """tight_layout unless the figure (made by pyPESTO) already has a layout engine."""
    if fig.get_layout_engine() is None:
        fig.tight_layout()


def _grid(n: int, max_cols: int = 4) -> tuple[int, int]:
    cols = min(n, max_cols)
    return int(math.ceil(n / cols)), cols


def optima_phrase(n: int) -> str:
    return "1 distinct optimum" if n == 1 else f"{n} distinct optima"


def plot_waterfall(fit: FitResult, path: Path) -> None:
    """pyPESTO waterfall plot of the multistart final objective values."""
    plt = _pyplot()
    import pypesto.visualize

    if fit.pilot is None:
        ax = pypesto.visualize.waterfall(fit.result, size=(8, 5))
        ax.set_title(f"Multistart: {fit.n_converged} of {fit.n_starts} starts converged to the best objective")
    else:  # the exploration ran on the first draws; the final fit refined its distinct optima on more draws
        p = fit.pilot
        ax = pypesto.visualize.waterfall(p.result, size=(8, 5))
        ax.set_title(f"Multistart on the first {p.n_draws} draws: {p.n_converged} of {p.n_starts} starts converged "
                     f"to the best objective;\nits {optima_phrase(fit.n_starts)} refitted on "
                     f"{fit.objective.draws.M} draws", fontsize=10)
    fig = ax.get_figure()
    _tight(fig)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_profiles(fit: FitResult, path: Path) -> bool:
    """pyPESTO profile-likelihood plot of every profiled parameter; False (nothing written) if none was profiled."""
    plist = fit.result.profile_result.list
    if not plist:
        return False
    indices = [i for i, p in enumerate(plist[-1]) if p is not None]
    if not indices:
        return False
    plt = _pyplot()
    import pypesto.profile
    import pypesto.visualize
    from matplotlib.ticker import MaxNLocator

    rows, cols = _grid(len(indices))
    axes = pypesto.visualize.profiles(fit.result, profile_indices=indices, profile_list_ids=len(plist) - 1,
                                      size=(max(6.0, 3.6 * cols), 3.2 * rows + 0.6),
                                      x_labels=[fit.parameter_names[i] for i in indices])
    axes = np.atleast_1d(axes)
    for ax in axes.flat:
        if not ax.has_data():
            continue
        ax.xaxis.set_major_locator(MaxNLocator(4))
        for level in sorted(fit.profile_ci):
            ax.axhline(float(pypesto.profile.chi2_quantile_to_ratio(level)), color="0.5", ls=":", lw=0.8)
    axes.flat[0].set_ylabel("likelihood ratio")
    fig = axes.flat[0].get_figure()
    levels = ", ".join(f"{level_tag(lv)}%" for lv in sorted(fit.profile_ci))
    fig.suptitle("Profile likelihoods (log/unconstrained scale)" + (f"\ndotted: {levels} thresholds" if levels else ""),
                 fontsize=10)
    _tight(fig)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _pick_individuals(n: int, groups: np.ndarray | None, k: int, rng: np.random.Generator) -> np.ndarray:
    """``k`` individuals spread evenly over the groups (round robin, random within a group)."""
    if groups is None:
        return np.sort(rng.choice(n, size=min(k, n), replace=False))
    labels = np.asarray(groups).astype(str)
    pools = [list(rng.permutation(np.flatnonzero(labels == g))) for g in sorted(set(labels.tolist()))]
    out: list[int] = []
    while len(out) < min(k, n):
        for pool in pools:
            if pool and len(out) < k:
                out.append(int(pool.pop()))
    return np.array(out, dtype=np.int64)


def _prediction_design(design: Design, n_points: int = 120, dense_enough: int = 60) -> Design:
    """Design for smooth prediction curves: each individual's observation times when there are at least
    ``dense_enough`` (or when another design entry is laid out per time point and so cannot be regridded), else
    ``n_points`` equally spaced times over the observed range, the other (per-individual) design entries unchanged."""
    times = np.asarray(design["times"], dtype=np.float64)
    mask = np.asarray(design["mask"], dtype=bool)
    T = times.shape[1]
    per_time = [key for key, v in design.items() if key not in ("times", "mask") and np.ndim(v) >= 2
                and np.shape(v)[1] == T]
    if per_time or mask.sum(axis=1).min() >= dense_enough:
        return design
    grid = np.empty((times.shape[0], n_points))
    for i in range(times.shape[0]):
        t = times[i, mask[i]]
        grid[i] = np.linspace(t.min(), t.max(), n_points) if t.size else 0.0
    out = dict(design)
    out["times"] = grid
    out["mask"] = np.ones_like(grid, dtype=bool)
    return out


def plot_individual_fits(model: IndividualModel, observations: np.ndarray, design: Design, draws: np.ndarray,
                         ids: Sequence[str], groups: np.ndarray | None, path: Path, rng: np.random.Generator,
                         n_panels: int = N_INDIVIDUAL_FITS, n_draws: int = N_FIT_DRAWS) -> None:
    """Observed data and the posterior-predictive median and 90% band of the noise-free model output of a few
    individuals (``n_draws`` posterior draws each)."""
    plt = _pyplot()
    n, M, k = draws.shape
    pick = _pick_individuals(n, groups, n_panels, rng)
    S = min(n_draws, M)
    didx = np.stack([rng.choice(M, size=S, replace=False) for _ in pick])
    phi = draws[pick[:, None], didx].reshape(-1, k)
    pdesign = _prediction_design(take_design(design, pick))
    pred = model.predict(phi, take_design(pdesign, np.repeat(np.arange(pick.size), S)))
    pred = pred.reshape(pick.size, S, *pred.shape[1:])
    lo, med, hi = np.quantile(pred, [0.05, 0.5, 0.95], axis=1)
    rows, cols = _grid(pick.size)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False, sharex=False)
    d = observations.shape[2]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for a, (ax, i) in enumerate(zip(axes.flat, pick)):
        msk = np.asarray(design["mask"][i], dtype=bool)
        t = np.asarray(design["times"][i], dtype=np.float64)[msk]
        pm = np.asarray(pdesign["mask"][a], dtype=bool)
        tp = np.asarray(pdesign["times"][a], dtype=np.float64)[pm]
        order = np.argsort(tp)
        tp = tp[order]
        for j in range(d):
            c = colors[j % len(colors)]
            lbl = model.obs_names[j] if j < len(model.obs_names) else f"y{j}"
            ax.fill_between(tp, lo[a, pm, j][order], hi[a, pm, j][order], color=c, alpha=0.3, lw=0,
                            label="90% posterior band" if j == 0 else None)
            ax.plot(tp, med[a, pm, j][order], color=c, lw=1.5, label="posterior median" if j == 0 else None)
            ax.plot(t, observations[i, msk, j], "o", ms=2.2, color="k" if d == 1 else c, alpha=0.7,
                    label=("observed" if d == 1 else lbl))
        title = str(ids[i]) + (f" ({np.asarray(groups)[i]})" if groups is not None else "")
        ax.set_title(title, fontsize=9)
        if a % cols == 0:
            ax.set_ylabel(", ".join(model.obs_names) if d > 1 else model.obs_names[0])
        if a >= (rows - 1) * cols or a + cols >= pick.size:
            ax.set_xlabel(_time_label(model))
    for ax in list(axes.flat)[pick.size:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="best")
    fig.suptitle(f"Individual fits: data and posterior predictive (noise-free model, {S} posterior draws each)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_vpc(panels: list[VPCPanel], model: IndividualModel, path: Path, n_replicates: int, n_individuals: int) -> None:
    """Visual predictive check: observed 10/50/90% quantiles per time bin over the simulated 90% intervals of the same
    quantiles; one column per group, one row per observation type."""
    plt = _pyplot()
    strata = sorted({p.stratum for p in panels}, key=lambda s: [p.stratum for p in panels].index(s))
    n_obs = max(p.obs_index for p in panels) + 1
    fig, axes = plt.subplots(n_obs, len(strata), figsize=(max(8.0, 4.8 * len(strata)), 3.8 * n_obs), squeeze=False,
                             sharey="row")
    for p in panels:
        ax = axes[p.obs_index, strata.index(p.stratum)]
        ok = np.isfinite(p.observed[:, 0])
        t = p.times[ok]
        i_mid = int(np.argmin(np.abs(np.asarray(p.quantiles) - 0.5)))
        outer = " and ".join(f"{int(round(qv * 100))}%" for q, qv in enumerate(p.quantiles) if q != i_mid)
        first_outer = min((q for q in range(len(p.quantiles)) if q != i_mid), default=-1)
        for q, qv in enumerate(p.quantiles):
            mid = q == i_mid
            name = f"{int(round(qv * 100))}% quantile" if mid else f"{outer} quantiles"
            show = mid or q == first_outer
            band = f"simulated {p.interval:.0%} interval, {name}" if show else None
            ax.fill_between(t, p.sim_lo[ok, q], p.sim_hi[ok, q], color="tab:red" if mid else "tab:blue",
                            alpha=0.25 if mid else 0.2, lw=0, label=band)
            ax.plot(t, p.observed[ok, q], color="k", lw=1.6 if mid else 1.0, ls="-" if mid else "--",
                    label=f"observed {name}" if show else None)
        ax.set_title(f"{p.stratum}" if p.stratum != "all" else "all individuals", fontsize=10)
        ax.set_xlabel(_time_label(model))
        ax.set_ylabel(p.obs_name)
    axes.flat[0].legend(fontsize=7, loc="best")
    fig.suptitle(f"Visual predictive check\n{n_replicates} replicate populations of {n_individuals} individuals "
                 "simulated from the fitted population model", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_parameter_distributions(fit: FitResult, draws: np.ndarray, covariates: Mapping[str, np.ndarray] | None,
                                 groups: np.ndarray | None, path: Path, rng: np.random.Generator,
                                 conditional_mean: np.ndarray | None = None,
                                 shrinkage: Mapping[str, float] | None = None) -> None:
    """Histogram of the individual posterior medians of each log-parameter (and, when given, of the conditional means
    under the fitted population, with the eta shrinkage in the title) against the fitted population density (a
    mixture of normals over the individuals' covariates and groups)."""
    plt = _pyplot()
    pop = fit.model
    n = draws.shape[0]
    med = np.median(draws, axis=1)
    mu = pop.design(n, covariates, groups).mean(fit.estimate)
    if n > MAX_DENSITY_INDIVIDUALS:
        mu = mu[rng.choice(n, size=MAX_DENSITY_INDIVIDUALS, replace=False)]
    L = pop.cholesky(fit.estimate)
    sd = np.sqrt(np.sum(L * L, axis=1))
    k = pop.k
    rows, cols = _grid(k, 3)
    fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols, 3.0 * rows), squeeze=False)
    for p, name in enumerate(pop.param_names_individual):
        ax = axes.flat[p]
        lo = min(np.quantile(med[:, p], 0.001), np.min(mu[:, p]) - 4 * sd[p])
        hi = max(np.quantile(med[:, p], 0.999), np.max(mu[:, p]) + 4 * sd[p])
        x = np.linspace(lo, hi, 300)
        z = (x[None, :] - mu[:, p, None]) / sd[p]
        dens = np.mean(np.exp(-0.5 * z * z), axis=0) / (sd[p] * math.sqrt(2 * math.pi))
        bins = np.linspace(lo, hi, min(50, max(10, n // 10)) + 1)
        h, _, _ = ax.hist(med[:, p], bins=bins, density=True, color="tab:gray", alpha=0.6,
                          label="individual posterior medians")
        random = name in pop.random_effects
        if conditional_mean is not None and random:
            ax.hist(conditional_mean[:, p], bins=bins, density=True, histtype="step", color="tab:blue", lw=1.2,
                    label="conditional means (given the population)")
        if shrinkage and name in shrinkage:
            ax.set_title(f"eta shrinkage {100 * shrinkage[name]:.0f}%", fontsize=9)
        ax.plot(x, dens, color="tab:red", lw=1.8,
                label="fitted population" if random else f"fitted population (no random effect, kernel sd {sd[p]:.2g})")
        if not random:
            ax.set_ylim(0, 1.3 * max(h.max(), 1e-12))
        ax.set_xlabel(f"log {name}")
        ax.set_ylabel("density")
        if p == 0 or not random:
            ax.legend(fontsize=7, loc="best")
    for ax in list(axes.flat)[k:]:
        ax.axis("off")
    fig.suptitle("Individual parameters against the fitted population: posterior medians (data alone, with estimation "
                 "noise)" + (" and conditional means (given the population)" if conditional_mean is not None else ""),
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
