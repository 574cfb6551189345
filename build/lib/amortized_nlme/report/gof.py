"""Goodness-of-fit figures from :class:`~amortized_nlme.report.diagnostics.Diagnostics`: observations against
population and individual predictions, IWRES and NPDE against time and PRED, the NPDE distribution, and the ETAs
against covariates and against N(0, omega).

Scatter plots draw at most ``MAX_GOF_POINTS`` observations (a seeded random subsample, said in the title); the trend
lines (binned medians and 5/95% quantiles) and every number use all of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from amortized_nlme.report.constants import MAX_GOF_POINTS
from amortized_nlme.report.diagnostics import Diagnostics, binned_smooth, is_log_scale
from amortized_nlme.report.plots import finish, grid, pyplot

_POINT = {"ms": 2.5, "alpha": 0.35, "color": "tab:blue", "ls": "none", "marker": "o", "mec": "none"}


def _subsample(k: int, rng: np.random.Generator, limit: int = MAX_GOF_POINTS) -> np.ndarray:
    return np.sort(rng.choice(k, size=limit, replace=False)) if k > limit else np.arange(k)


def _sub_note(k: int, limit: int = MAX_GOF_POINTS) -> str:
    return f"{limit} of {k} observations drawn (random subsample; trends use all)" if k > limit else \
        f"{k} observations"


def _trend(ax: Any, x: np.ndarray, y: np.ndarray, log_x: bool = False, bands: bool = False) -> None:
    """Binned median (and 5/95% quantiles) of y over x, in bins equal-count in x (or log x)."""
    xx = np.log(x) if log_x else x
    qs = (0.05, 0.5, 0.95) if bands else (0.5,)
    xs, ys = binned_smooth(xx, y, q=qs)
    if xs.size == 0:
        return
    xs = np.exp(xs) if log_x else xs
    mid = len(qs) // 2
    ax.plot(xs, ys[:, mid], color="tab:red", lw=1.6, label="binned median")
    if bands:
        ax.plot(xs, ys[:, 0], color="tab:red", lw=1.0, ls="--", label="binned 5%, 95%")
        ax.plot(xs, ys[:, -1], color="tab:red", lw=1.0, ls="--")


def plot_dv_vs_predictions(diag: Diagnostics, path: Path, rng: np.random.Generator) -> None:
    """DV against PRED and IPRED, with linear and log axes (log axes only for observations not on a log scale
    already and with at least 90% positive values): one row per observation type; identity line and binned-median
    trend."""
    plt = pyplot()
    d = len(diag.obs_names)
    log_cols = []  # log axes for observation types not on a log scale already and (nearly) all positive
    for o, name in enumerate(diag.obs_names):
        u = diag.used[..., o]
        pos = float(np.mean((diag.dv[..., o][u] > 0) & (diag.pred[..., o][u] > 0))) if u.any() else 0.0
        log_cols.append(not is_log_scale(name) and pos >= 0.9)
    ncol = 4 if any(log_cols) else 2
    fig, axes = plt.subplots(d, ncol, figsize=(3.6 * ncol, 3.5 * d), squeeze=False)
    notes = []
    for o, name in enumerate(diag.obs_names):
        use = diag.used[..., o]
        dv, pred, ipred = diag.dv[..., o][use], diag.pred[..., o][use], diag.ipred[..., o][use]
        pick = _subsample(dv.size, rng)
        notes.append((f"{name}: " if d > 1 else "") + _sub_note(dv.size))
        panels = [("PRED", pred, False), ("IPRED", ipred, False)]
        if log_cols[o]:
            panels += [("PRED", pred, True), ("IPRED", ipred, True)]
        for c, (label, x, log) in enumerate(panels):
            ax = axes[o, c]
            if log:
                pos = (x > 0) & (dv > 0)
                xs, ys, keep = x[pos], dv[pos], pos[pick]
                ax.plot(x[pick][keep], dv[pick][keep], **_POINT)
                ax.set_xscale("log")
                ax.set_yscale("log")
                if (~pos).any():
                    ax.text(0.98, 0.02, f"{int((~pos).sum())} non-positive not shown", transform=ax.transAxes,
                            ha="right", va="bottom", fontsize=7, color="0.4")
            else:
                xs, ys = x, dv
                ax.plot(x[pick], dv[pick], **_POINT)
            if xs.size:
                lo, hi = float(min(xs.min(), ys.min())), float(max(xs.max(), ys.max()))
                ax.plot([lo, hi], [lo, hi], color="k", lw=0.9, label="identity")
                _trend(ax, xs, ys, log_x=log)
            ax.set_xlabel(label + (" (log axes)" if log else ""))
            ax.set_ylabel(f"DV ({name})")
            ax.set_title(f"DV vs {label}" + (", log axes" if log else ""), fontsize=9)
        for c in range(len(panels), ncol):
            axes[o, c].axis("off")
    axes[0, 0].legend(fontsize=7, loc="upper left")
    finish(fig, "Observations against population (PRED, typical individual) and individual (IPRED, conditional "
                 "mean) predictions\n" + "; ".join(notes), path, fontsize=10)


def plot_residuals(diag: Diagnostics, path: Path, rng: np.random.Generator, time_label: str) -> None:
    """IWRES and NPDE against time and against PRED (rows: residual x observation type), with 0 and +-1.96 lines and
    binned 5/50/95% quantiles."""
    plt = pyplot()
    d = len(diag.obs_names)
    kinds = [("IWRES", diag.iwres)]
    if np.isfinite(diag.npde).any():
        kinds.append(("NPDE", diag.npde))
    nrow = d * len(kinds)
    fig, axes = plt.subplots(nrow, 2, figsize=(10.0, 3.2 * nrow), squeeze=False)
    times = np.broadcast_to(diag.times[..., None], diag.dv.shape)
    notes = []
    r = 0
    for o, name in enumerate(diag.obs_names):
        for label, res in kinds:
            ok = (diag.used if label == "IWRES" else diag.observed)[..., o] & np.isfinite(res[..., o])
            y, t, pred = res[..., o][ok], times[..., o][ok], diag.pred[..., o][ok]
            pick = _subsample(y.size, rng)
            if label == "IWRES":
                notes.append(f"{name}: " + _sub_note(y.size))
            for c, (x, xl) in enumerate(((t, time_label), (pred, "PRED"))):
                ax = axes[r, c]
                ax.plot(x[pick], y[pick], **_POINT)
                for h, ls in ((0.0, "-"), (-1.96, ":"), (1.96, ":")):
                    ax.axhline(h, color="k", lw=0.8, ls=ls)
                _trend(ax, x, y, bands=True)
                ax.set_xlabel(xl)
                ax.set_ylabel(label + (f" ({name})" if d > 1 else ""))
                ax.set_title(f"{label} vs {'time' if c == 0 else 'PRED'}", fontsize=9)
            r += 1
    axes[0, 0].legend(fontsize=7, loc="upper right")
    npde_note = (f"NPDE from {diag.n_npde_simulations} simulations per individual" if len(kinds) > 1 else
                 "NPDE not computed")
    if diag.blq.any():
        npde_note += f" ({int(diag.blq.sum())} BLQ observations: no IWRES, imputed NPDE)"
    finish(fig, f"Residuals: IWRES = (DV - IPRED) / residual sd; {npde_note}\n" + "; ".join(notes), path, fontsize=10)


def plot_npde_distribution(diag: Diagnostics, summary: Mapping[str, Any], path: Path) -> None:
    """QQ plot of the NPDEs against N(0, 1) (with the pointwise 95% band of the order statistics of a normal sample of
    the same size) and their histogram against the N(0, 1) density; the tests of the npde package in the title."""
    plt = pyplot()
    x = np.sort(diag.npde[np.isfinite(diag.npde)])
    n = x.size
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10.0, 4.4))
    if n:
        idx = np.unique(np.linspace(1, n, min(n, 2000)).round().astype(int))
        theo = stats.norm.ppf((idx - 0.5) / n)
        lo = stats.norm.ppf(stats.beta.ppf(0.025, idx, n - idx + 1))
        hi = stats.norm.ppf(stats.beta.ppf(0.975, idx, n - idx + 1))
        ax1.fill_between(theo, lo, hi, color="0.8", lw=0, label="95% band of a N(0, 1) sample")
        ax1.plot(theo, x[idx - 1], "o", ms=2.5, color="tab:blue", mec="none", label="NPDE")
        lim = float(max(abs(theo).max(), abs(x).max()))
        ax1.plot([-lim, lim], [-lim, lim], color="k", lw=0.9)
        bins = np.linspace(min(-4.0, x.min()), max(4.0, x.max()), min(60, max(10, n // 20)) + 1)
        ax2.hist(x, bins=bins, density=True, color="tab:blue", alpha=0.55, label="NPDE")
        g = np.linspace(bins[0], bins[-1], 300)
        ax2.plot(g, stats.norm.pdf(g), color="k", lw=1.3, label="N(0, 1)")
    ax1.set_xlabel("N(0, 1) quantile")
    ax1.set_ylabel("NPDE quantile")
    ax1.set_title("QQ plot", fontsize=9)
    ax1.legend(fontsize=7, loc="upper left")
    ax2.set_xlabel("NPDE")
    ax2.set_ylabel("density")
    ax2.set_title("Histogram", fontsize=9)
    ax2.legend(fontsize=7)
    s = summary
    if "mean" in s:
        line = (f"mean {s['mean']:.3f} (t-test p = {s['p_mean_ttest']:.3g}), variance {s['variance']:.3f} "
                f"(Fisher p = {s['p_variance_fisher']:.3g}), Shapiro-Wilk p = {s['p_normal_shapiro_wilk']:.3g}, "
                f"KS p = {s['p_normal_ks']:.3g}")
    else:
        line = "too few NPDEs for tests"
    blq = f" ({int(diag.blq.sum())} BLQ, imputed)" if diag.blq.any() else ""
    finish(fig, f"NPDE: {n} observations{blq}, {diag.n_npde_simulations} simulations per individual from the "
                f"fitted model\n{line}", path, fontsize=10)


def _categorical(x: np.ndarray, max_levels: int = 6) -> bool:
    if x.dtype.kind in "OUSb":
        return True
    return np.unique(x[np.isfinite(x)]).size <= max_levels


def _level(v: Any) -> str:
    """A category label: 1 rather than 1.0."""
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    return str(v)


def plot_eta_covariates(diag: Diagnostics, covariates: Mapping[str, np.ndarray] | None, groups: np.ndarray | None,
                        path: Path, rng: np.random.Generator) -> bool:
    """ETA (conditional mean minus population mean) of every random effect against every covariate (and the
    group): scatter with binned median for continuous covariates, box plots for categorical ones (at most 6
    levels). False (nothing written) without random effects or covariates."""
    cols: list[tuple[str, np.ndarray]] = [(c, np.asarray(v).reshape(-1)) for c, v in (covariates or {}).items()]
    if groups is not None:
        cols.append(("group", np.asarray(groups).astype(str)))
    re = [(p, i) for i, p in enumerate(diag.param_names) if p in diag.random_effects]
    if not cols or not re:
        return False
    plt = pyplot()
    eta = diag.eta
    n = eta.shape[0]
    pick = _subsample(n, rng, 5000)
    fig, axes = plt.subplots(len(re), len(cols), figsize=(3.4 * len(cols) + 0.6, 2.7 * len(re) + 0.6),
                             squeeze=False)
    for r, (p, i) in enumerate(re):
        for c, (cname, x) in enumerate(cols):
            ax = axes[r, c]
            y = eta[:, i]
            if _categorical(x):
                levels = sorted(set(x.tolist()), key=str)
                data = [y[x == lv] for lv in levels]
                ax.boxplot(data, widths=0.6, flierprops={"ms": 2})
                ax.set_xticks(np.arange(1, len(levels) + 1), [_level(lv) for lv in levels])
            else:
                ax.plot(x[pick], y[pick], **_POINT)
                _trend(ax, x.astype(np.float64), y)
            ax.axhline(0.0, color="k", lw=0.8)
            if r == len(re) - 1:
                ax.set_xlabel(cname)
            if c == 0:
                ax.set_ylabel(f"ETA {p}")
    finish(fig, "ETAs (conditional mean minus population mean, log scale) against covariates"
           + (f"; {pick.size} of {n} individuals drawn in scatter plots" if pick.size < n else ""), path)
    return True


def plot_eta_distributions(diag: Diagnostics, path: Path) -> bool:
    """Histogram of the ETAs of every random effect against the fitted N(0, omega) density, eta shrinkage in the
    title (the ETAs are conditional means, narrower than N(0, omega) by about the shrinkage). False without
    random effects."""
    re = [(p, i) for i, p in enumerate(diag.param_names) if p in diag.random_effects]
    if not re:
        return False
    plt = pyplot()
    eta = diag.eta
    rows, cols = grid(len(re), 3)
    fig, axes = plt.subplots(rows, cols, figsize=(3.8 * cols, 3.0 * rows + 0.5), squeeze=False)
    for a, (p, i) in enumerate(re):
        ax = axes.flat[a]
        om = float(diag.omega_sd[i])
        y = eta[:, i]
        span = max(4.0 * om, float(np.max(np.abs(y))) if y.size else 0.0)
        bins = np.linspace(-span, span, min(50, max(10, y.size // 10)) + 1)
        ax.hist(y, bins=bins, density=True, color="tab:blue", alpha=0.55, label="ETA (conditional means)")
        g = np.linspace(-span, span, 300)
        ax.plot(g, stats.norm.pdf(g, 0.0, om), color="k", lw=1.3, label=f"N(0, omega = {om:.3g})")
        ax.axvline(0.0, color="0.4", lw=0.8)
        shr = diag.eta_shrinkage.get(p, float("nan"))
        ax.set_title(f"{p}: shrinkage {100 * shr:.0f}%, mean {y.mean():+.3f}", fontsize=9)
        ax.set_xlabel(f"ETA {p} (log scale)")
        if a == 0:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(re):]:
        ax.axis("off")
    finish(fig, "ETA distributions against the fitted random-effect distributions", path)
    return True
