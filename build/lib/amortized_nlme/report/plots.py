"""The figures of a results folder that are not goodness-of-fit scatter plots: multistart waterfall, profile
likelihoods, parameter distributions and the VPCs (shared plotting helpers live here too)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from amortized_nlme.model import IndividualModel
from amortized_nlme.population.fit import FitResult
from amortized_nlme.report.constants import MAX_DENSITY_INDIVIDUALS
from amortized_nlme.report.parameters import level_tag
from amortized_nlme.report.vpc import VPCPanel

logger = logging.getLogger(__name__)


# ============================================================================ plots
def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def time_label(model: IndividualModel) -> str:
    unit = getattr(model, "time_unit", None)
    return f"time [{unit}]" if unit else "time"


def finish(fig: Any, title: str, path: Path, fontsize: float = 10.0, dpi: int = 100) -> None:
    """Give a figure its title (lines wrapped to the figure's width), lay it out below the title, save and close."""
    import textwrap

    width = max(20, int(fig.get_figwidth() * 72 / (0.58 * fontsize)))
    lines = [w for line in title.split("\n") for w in (textwrap.wrap(line, width) or [""])]
    fig.suptitle("\n".join(lines), fontsize=fontsize)
    fig.set_layout_engine("constrained")
    save(fig, path, dpi)


def save(fig: Any, path: Path, dpi: int = 100) -> None:
    """Save and close a figure."""
    plt = pyplot()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def _tight(fig: Any) -> None:
    """tight_layout unless the figure (made by pyPESTO) already has a layout engine."""
    if fig.get_layout_engine() is None:
        fig.tight_layout()


def grid(n: int, max_cols: int = 4) -> tuple[int, int]:
    cols = min(n, max_cols)
    return int(math.ceil(n / cols)), cols


def optima_phrase(n: int) -> str:
    return "1 distinct optimum" if n == 1 else f"{n} distinct optima"


def plot_waterfall(fit: FitResult, path: Path) -> None:
    """pyPESTO waterfall plot of the multistart final objective values."""
    pyplot()
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
    save(fig, path, dpi=110)


def plot_profiles(fit: FitResult, path: Path) -> bool:
    """pyPESTO profile-likelihood plot of every profiled parameter; False (nothing written) if none was profiled."""
    plist = fit.result.profile_result.list
    if not plist:
        return False
    indices = [i for i, p in enumerate(plist[-1]) if p is not None]
    if not indices:
        return False
    pyplot()
    import pypesto.profile
    import pypesto.visualize
    from matplotlib.ticker import MaxNLocator

    rows, cols = grid(len(indices))
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
    save(fig, path, dpi=110)
    return True


def plot_parameter_distributions(fit: FitResult, draws: np.ndarray, covariates: Mapping[str, np.ndarray] | None,
                                 groups: np.ndarray | None, path: Path, rng: np.random.Generator,
                                 conditional_mean: np.ndarray | None = None,
                                 shrinkage: Mapping[str, float] | None = None) -> None:
    """Histogram of the individual posterior medians of each log-parameter (and, when given, of the conditional means
    under the fitted population, with the eta shrinkage in the title) against the fitted population density (a
    mixture of normals over the individuals' covariates and groups)."""
    plt = pyplot()
    pop = fit.model
    n = draws.shape[0]
    med = np.median(draws, axis=1)
    mu = pop.design(n, covariates, groups).mean(fit.estimate)
    if n > MAX_DENSITY_INDIVIDUALS:
        mu = mu[rng.choice(n, size=MAX_DENSITY_INDIVIDUALS, replace=False)]
    L = pop.cholesky(fit.estimate)
    sd = np.sqrt(np.sum(L * L, axis=1))
    k = pop.k
    rows, cols = grid(k, 3)
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
    finish(fig, "Individual parameters against the fitted population: posterior medians (data alone, with "
           "estimation noise)" + (" and conditional means (given the population)" if conditional_mean is not None
                                  else ""), path)


def plot_vpc(panels: list[VPCPanel], path: Path, *, time_label: str, n_replicates: int, n_individuals: int,
             n_total: int, log_y: bool = False, strata_label: str = "") -> None:
    """A VPC or pcVPC figure: per time bin the observed 5/50/95% quantiles (lines; dots: the observations, corrected
    for a pcVPC) over the simulated intervals of the same quantiles (bands: blue outer, red median); one column per
    stratum, one row per observation type, and under each a panel of the fraction of BLQ observations when there
    are BLQ data; ticks on the time axis mark the bin boundaries."""
    plt = pyplot()
    strata = list(dict.fromkeys(p.stratum for p in panels))
    n_obs = max(p.obs_index for p in panels) + 1
    blq = any(p.has_blq for p in panels)
    rows = n_obs * (2 if blq else 1)
    ratios = [3, 1] * n_obs if blq else [1] * n_obs
    fig, axes = plt.subplots(rows, len(strata), figsize=(max(7.0, 5.0 * len(strata)), sum(ratios) * (1.3 if blq
                             else 3.8)), squeeze=False, sharex="col", gridspec_kw={"height_ratios": ratios})
    pc = panels[0].prediction_corrected
    for p in panels:
        r = p.obs_index * (2 if blq else 1)
        ax = axes[r, strata.index(p.stratum)]
        ok = np.isfinite(p.times) & (p.n_obs > 0)
        t = p.times[ok]
        i_mid = int(np.argmin(np.abs(np.asarray(p.quantiles) - 0.5)))
        if p.points_t is not None and p.points_t.size:
            ax.plot(p.points_t, p.points_y, ".", ms=2, color="0.55", alpha=0.35, zorder=1,
                    label=("observations (prediction-corrected)" if pc else "observations"))
        outer = ", ".join(f"{int(round(100 * q))}%" for i, q in enumerate(p.quantiles) if i != i_mid)
        first_outer = True
        floor = p.lloq[ok] if p.lloq is not None else None
        for q, qv in enumerate(p.quantiles):
            mid = q == i_mid
            lo, hi, ob = p.sim_lo[ok, q], p.sim_hi[ok, q], p.observed[ok, q]
            if floor is not None:  # interval reaching below the limit: drawn down to it
                lo = np.where(np.isnan(lo) & np.isfinite(hi), floor, lo)
            label_band = (f"simulated {p.interval:.0%} CI of the median" if mid else
                          f"simulated {p.interval:.0%} CI of the {outer} quantiles" if first_outer else None)
            ax.fill_between(t, lo, hi, color="tab:red" if mid else "tab:blue", alpha=0.25 if mid else 0.18, lw=0,
                            label=label_band, zorder=2)
            ax.plot(t, ob, color="k", lw=1.7 if mid else 1.1, ls="-" if mid else "--", zorder=3,
                    label=("observed median" if mid else f"observed {outer} quantiles" if first_outer else None))
            if not mid:
                first_outer = False
        if floor is not None and np.isfinite(floor).any():
            ax.plot(t, floor, color="tab:purple", lw=0.9, ls=":", drawstyle="steps-mid",
                    label="LLOQ" + (" (prediction-corrected, per bin)" if pc else ""))
        if p.bin_lo is not None:
            edges = 0.5 * (p.bin_hi[:-1] + p.bin_lo[1:])
            for e in edges[np.isfinite(edges)]:
                ax.axvline(e, ymin=0, ymax=0.03, color="0.3", lw=0.8)
        if log_y:
            ax.set_yscale("log")
        title = p.stratum if p.stratum != "all" else "all individuals"
        ax.set_title(f"{title}  ({int(p.n_obs.sum())} obs., {ok.sum()} bins)", fontsize=9)
        ax.set_ylabel(("pc " if pc else "") + p.obs_name + (" (log axis)" if log_y else ""))
        if not blq:
            ax.set_xlabel(time_label)
        else:
            bx = axes[r + 1, strata.index(p.stratum)]
            if p.has_blq:
                okb = np.isfinite(p.blq_observed)
                tb = p.times[okb]
                bx.fill_between(tb, p.blq_sim_lo[okb], p.blq_sim_hi[okb], color="tab:blue", alpha=0.2, lw=0,
                                label=f"simulated {p.interval:.0%} CI")
                bx.plot(tb, p.blq_observed[okb], "k-", lw=1.3, label="observed")
            bx.set_ylim(-0.02, 1.02)
            bx.set_ylabel("fraction BLQ", fontsize=8)
            bx.set_xlabel(time_label)
            if p is panels[0]:
                bx.legend(fontsize=6, loc="upper left")
    axes.flat[0].legend(fontsize=6.5, loc="best")
    kind = "Prediction-corrected visual predictive check (pcVPC)" if pc else "Visual predictive check"
    sub = (f"{n_replicates} data sets simulated from the fitted population; "
           + (f"{n_individuals} of {n_total} individuals (random subsample)" if n_individuals < n_total else
              f"all {n_total} individuals")
           + (f"; stratified by {strata_label}" if strata_label and strata_label != "none" else ""))
    finish(fig, f"{kind}\n{sub}", path)
