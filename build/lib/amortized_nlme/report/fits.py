"""Individual fits under the fitted population: each individual's data with its IPRED band (the noise-free prediction
over its posterior draws importance-reweighted to the fitted population, i.e. p(phi_i | y_i, theta-hat)), the IPRED
curve (prediction at the conditional mean) and the PRED curve (typical individual with its covariates and group).

``individual_fits.pdf`` pages through every individual (up to ``MAX_PDF_INDIVIDUALS``; above that, the worst-fitting
half and a random half of that many, in data order, said on the first page); ``individual_fits.png`` shows the worst
and best individuals by the fit score of :meth:`Diagnostics.individual_fit_score` and seeded random ones.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from amortized_nlme.model import Design, IndividualModel, take_design
from amortized_nlme.population.fit import FitResult
from amortized_nlme.report.constants import (
    MAX_PDF_INDIVIDUALS,
    N_BEST_FITS,
    N_FIT_DRAWS,
    N_RANDOM_FITS,
    N_WORST_FITS,
    PDF_COLS,
    PDF_ROWS,
)
from amortized_nlme.report.diagnostics import Diagnostics
from amortized_nlme.report.plots import finish, grid, pyplot

logger = logging.getLogger(__name__)


def prediction_design(design: Design, n_points: int = 120, dense_enough: int = 60) -> Design:
    """Design for smooth prediction curves: each individual's observation times when there are at least
    ``dense_enough`` (or when another design entry is laid out per time point and so cannot be regridded), else
    ``n_points`` equally spaced times over the observed range (from 0 when the first observation is within the
    first quarter of it), the other (per-individual) design entries unchanged."""
    times = np.asarray(design["times"], dtype=np.float64)
    mask = np.asarray(design["mask"], dtype=bool)
    T = times.shape[1]
    per_time = [key for key, v in design.items() if key not in ("times", "mask") and np.ndim(v) >= 2
                and np.shape(v)[1] == T]
    if per_time or times.shape[0] == 0 or mask.sum(axis=1).min() >= dense_enough:
        return design
    grid_t = np.empty((times.shape[0], n_points))
    for i in range(times.shape[0]):
        t = times[i, mask[i]]
        if t.size:  # from time 0 (the usual dose time) when the first observation is early enough
            lo = 0.0 if 0.0 <= t.min() <= 0.25 * t.max() else t.min()
            grid_t[i] = np.linspace(lo, t.max(), n_points)
        else:
            grid_t[i] = 0.0
    out = dict(design)
    out["times"] = grid_t
    out["mask"] = np.ones_like(grid_t, dtype=bool)
    return out


@dataclass
class IndividualCurves:
    """Prediction curves of some individuals on a prediction design: ``t [b, P]``, ``ok [b, P]`` and ``[b, P, d]``
    arrays for the band (5%, 50%, 95% of the reweighted draws), IPRED and PRED."""

    index: np.ndarray
    t: np.ndarray
    ok: np.ndarray
    lo: np.ndarray
    med: np.ndarray
    hi: np.ndarray
    ipred: np.ndarray
    pred: np.ndarray
    n_draws: int


def _resample(weights: np.ndarray, S: int, rng: np.random.Generator) -> np.ndarray:
    """Systematic resampling: ``S`` draw indices per row of normalised ``weights [b, M]``."""
    b, M = weights.shape
    cum = np.cumsum(weights, axis=1)
    cum[:, -1] = 1.0
    u = (rng.random((b, 1)) + np.arange(S)[None, :]) / S
    return np.stack([np.minimum(np.searchsorted(cum[i], u[i]), M - 1) for i in range(b)])


def individual_curves(fit: FitResult, model: IndividualModel, design: Design, index: np.ndarray,
                      diag: Diagnostics, rng: np.random.Generator, n_draws: int = N_FIT_DRAWS,
                      block: int = 64) -> IndividualCurves:
    """IPRED bands (``n_draws`` draws resampled by the importance weights at the estimate), IPRED and PRED curves of
    individuals ``index``."""
    index = np.asarray(index, dtype=np.int64)
    draws = fit.objective.draws.draws
    k = draws.shape[2]
    parts: list[tuple[np.ndarray, ...]] = []
    for a in range(0, index.size, block):
        idx = index[a:a + block]
        b = idx.size
        w = fit.objective.weights(fit.estimate, idx)
        pick = _resample(w, n_draws, rng)
        phi = draws[idx[:, None], pick].reshape(-1, k)
        pdes = prediction_design(take_design(design, idx))
        pr = np.asarray(model.predict(phi, take_design(pdes, np.repeat(np.arange(b), n_draws))), dtype=np.float64)
        pr = pr.reshape(b, n_draws, *pr.shape[1:])
        lo, med, hi = np.quantile(pr, [0.05, 0.5, 0.95], axis=1)
        ip = np.asarray(model.predict(diag.cond_mean[idx], pdes), dtype=np.float64)
        pp = np.asarray(model.predict(diag.mu[idx], pdes), dtype=np.float64)
        parts.append((np.asarray(pdes["times"], dtype=np.float64), np.asarray(pdes["mask"], dtype=bool), lo, med,
                      hi, ip, pp))
    P = max(p[0].shape[1] for p in parts)

    def cat(j: int, fill: Any) -> np.ndarray:
        out = []
        for p in parts:
            x = p[j]
            pad = P - x.shape[1]
            if pad:
                width = [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)
                x = np.pad(x, width, constant_values=fill)
            out.append(x)
        return np.concatenate(out, axis=0)

    return IndividualCurves(index, cat(0, 0.0), cat(1, False), cat(2, np.nan), cat(3, np.nan), cat(4, np.nan),
                            cat(5, np.nan), cat(6, np.nan), n_draws)


def _draw_panel(ax: Any, a: int, i: int, curves: IndividualCurves, diag: Diagnostics, title: str,
                colors: Sequence[str], legend: bool) -> None:
    ok = curves.ok[a]
    order = np.argsort(curves.t[a][ok], kind="stable")
    tp = curves.t[a][ok][order]
    d = diag.dv.shape[2]
    for o in range(d):
        c = colors[o % len(colors)]
        ax.fill_between(tp, curves.lo[a, ok, o][order], curves.hi[a, ok, o][order], color=c, alpha=0.25, lw=0,
                        label="IPRED 90% band" if o == 0 else None)
        ax.plot(tp, curves.ipred[a, ok, o][order], color=c, lw=1.5, label="IPRED" if o == 0 else None)
        ax.plot(tp, curves.pred[a, ok, o][order], color="0.25" if d == 1 else c, lw=1.1, ls="--",
                label="PRED" if o == 0 else None)
        used = diag.used[i, :, o]
        ax.plot(diag.times[i, used], diag.dv[i, used, o], "o", ms=3, color="k" if d == 1 else c,
                label=("observed" if d == 1 else diag.obs_names[o]) if o == 0 or d > 1 else None)
        cens = diag.blq[i, :, o]
        if cens.any():
            ax.plot(diag.times[i, cens], diag.dv[i, cens, o], "v", ms=4, mfc="none", color="tab:purple",
                    label="BLQ (at LLOQ)" if o == 0 else None)
    ax.set_title(title, fontsize=8)
    ax.tick_params(labelsize=7)
    if legend:
        ax.legend(fontsize=6, loc="best")


def _title(ids: Sequence[Any], groups: np.ndarray | None, i: int, extra: str = "") -> str:
    g = f" ({np.asarray(groups)[i]})" if groups is not None else ""
    return f"{ids[i]}{g}{extra}"


def choose_individuals(score: np.ndarray, rng: np.random.Generator, n_worst: int = N_WORST_FITS,
                       n_best: int = N_BEST_FITS, n_random: int = N_RANDOM_FITS) -> list[tuple[int, str]]:
    """(index, role) of the worst and best individuals by ``score`` (higher is worse; NaN never chosen) and seeded
    random other ones."""
    n = score.size
    fin = np.flatnonzero(np.isfinite(score))
    order = fin[np.argsort(score[fin], kind="stable")]
    worst = list(order[::-1][:n_worst])
    best = [i for i in order[:n_best] if i not in worst]
    rest = np.setdiff1d(np.arange(n), np.array(worst + best, dtype=np.int64))
    rand = list(np.sort(rng.choice(rest, size=min(n_random, rest.size), replace=False))) if rest.size else []
    return ([(int(i), "worst") for i in worst] + [(int(i), "best") for i in best]
            + [(int(i), "random") for i in rand])


def plot_individual_fits_png(fit: FitResult, model: IndividualModel, design: Design, diag: Diagnostics,
                             ids: Sequence[Any], groups: np.ndarray | None, path: Path, rng: np.random.Generator,
                             time_label: str) -> list[tuple[str, str]]:
    """The worst, best and random individuals' fits in one PNG; returns (id, role) of the panels."""
    plt = pyplot()
    score, score_name = diag.individual_fit_score()
    chosen = choose_individuals(score, rng)
    index = np.array([i for i, _ in chosen], dtype=np.int64)
    curves = individual_curves(fit, model, design, index, diag, rng)
    rows, cols = grid(index.size, 4)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows + 0.6), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for a, (i, role) in enumerate(chosen):
        ax = axes.flat[a]
        _draw_panel(ax, a, i, curves, diag, _title(ids, groups, i, f": {role}, {score_name} {score[i]:.2f}"),
                    colors, legend=a == 0)
        if a % cols == 0:
            ax.set_ylabel(", ".join(diag.obs_names), fontsize=8)
        if a >= index.size - cols:
            ax.set_xlabel(time_label, fontsize=8)
    for ax in list(axes.flat)[index.size:]:
        ax.axis("off")
    finish(fig, f"Individual fits under the fitted population: {N_WORST_FITS} worst and {N_BEST_FITS} best by "
                 f"{score_name}, {index.size - N_WORST_FITS - N_BEST_FITS} at random (seeded)\nband: 90% of the "
                 f"noise-free prediction over {curves.n_draws} posterior draws reweighted to the population; IPRED at "
                 "the conditional mean; PRED at the typical individual", path, fontsize=9)
    return [(str(ids[i]), role) for i, role in chosen]


def pdf_individuals(score: np.ndarray, rng: np.random.Generator, limit: int = MAX_PDF_INDIVIDUALS
                    ) -> tuple[np.ndarray, str]:
    """Which individuals individual_fits.pdf holds (data order) and a sentence saying so."""
    n = score.size
    if n <= limit:
        return np.arange(n), f"all {n} individuals"
    fin = np.flatnonzero(np.isfinite(score))
    worst = fin[np.argsort(score[fin], kind="stable")[::-1][: limit // 2]]
    rest = np.setdiff1d(np.arange(n), worst)
    rand = rng.choice(rest, size=limit - worst.size, replace=False)
    return np.sort(np.concatenate([worst, rand])), (f"{limit} of {n} individuals: the {worst.size} worst-fitting "
                                                    f"and {rand.size} at random (seeded)")


def _clear(ax: Any) -> None:
    """Remove the data artists and legend of an axes (much faster than ``cla``, keeps the axes for the next page)."""
    for art in [*ax.lines, *ax.collections, *ax.texts]:
        art.remove()
    if ax.get_legend() is not None:
        ax.get_legend().remove()
    ax.relim()
    ax.set_xlabel("")
    ax.set_ylabel("")


def write_individual_fits_pdf(fit: FitResult, model: IndividualModel, design: Design, diag: Diagnostics,
                              ids: Sequence[Any], groups: np.ndarray | None, path: Path, rng: np.random.Generator,
                              time_label: str, limit: int | None = MAX_PDF_INDIVIDUALS) -> str:
    """Every individual's fit (up to ``limit``; None: no limit), ``PDF_ROWS x PDF_COLS`` per page; returns what it
    holds. One figure is reused for every page (creating and laying out 16 axes per page costs more than
    drawing them)."""
    plt = pyplot()
    from matplotlib.backends.backend_pdf import PdfPages

    score, score_name = diag.individual_fit_score()
    index, what = pdf_individuals(score, rng, score.size if limit is None else limit)
    per_page = PDF_ROWS * PDF_COLS
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    n_pages = int(np.ceil(index.size / per_page))
    fig, axes = plt.subplots(PDF_ROWS, PDF_COLS, figsize=(11.0, 8.5), squeeze=False)
    fig.subplots_adjust(left=0.06, right=0.985, bottom=0.06, top=0.92, wspace=0.28, hspace=0.5)
    suptitle = None
    try:
        with PdfPages(path) as pdf:
            for page in range(n_pages):
                idx = index[page * per_page:(page + 1) * per_page]
                curves = individual_curves(fit, model, design, idx, diag, rng)
                for a, ax in enumerate(axes.flat):
                    _clear(ax)
                    ax.set_visible(a < idx.size)
                for a, i in enumerate(idx):
                    ax = axes.flat[a]
                    extra = f": {score_name} {score[i]:.2f}" if np.isfinite(score[i]) else ""
                    _draw_panel(ax, a, int(i), curves, diag, _title(ids, groups, int(i), extra), colors,
                                legend=a == 0)
                    ax.autoscale_view()
                    ax.locator_params(nbins=4)
                    if a % PDF_COLS == 0:
                        ax.set_ylabel(", ".join(diag.obs_names), fontsize=7)
                    if a >= idx.size - PDF_COLS:
                        ax.set_xlabel(time_label, fontsize=7)
                if suptitle is not None:
                    suptitle.remove()
                suptitle = fig.suptitle(f"Individual fits, page {page + 1} of {n_pages} ({what})\nband: 90% of the "
                                        f"noise-free prediction over {N_FIT_DRAWS} posterior draws reweighted to the "
                                        "population; IPRED solid, PRED dashed", fontsize=8)
                pdf.savefig(fig)
            info = pdf.infodict()
            info["Title"] = "Individual fits under the fitted population"
    finally:
        plt.close(fig)
    return what
