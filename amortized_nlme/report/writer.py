"""The results folder of a population fit: estimates, summary, individual estimates, the pyPESTO result and plots.

:func:`write_results` writes everything into a temporary sibling folder and renames it into place only when every file
is complete, so a results folder under its final name is never half written (an existing folder of the same name is
replaced as a whole). Plots are subsampled (at most ``MAX_VPC_INDIVIDUALS`` individuals for the visual predictive check,
``N_INDIVIDUAL_FITS`` panels of individual fits) so that data sets of thousands of individuals are reported in seconds.

All individual parameters are on the model's log scale; ``estimates.csv`` adds the natural-scale value where one is
meaningful (exp of log means and covariate effects, random-effect standard deviations).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from amortized_nlme.fit import DEFAULT_LEVELS, FitResult
from amortized_nlme.model import Design, IndividualModel, take_design
from amortized_nlme.population import PopulationModel

logger = logging.getLogger(__name__)

ESTIMATES_FILE = "estimates.csv"
SUMMARY_FILE = "summary.json"
INDIVIDUAL_FILE = "individual_estimates.csv"
PYPESTO_FILE = "pypesto_result.h5"
REPORT_FILE = "report.md"

#: plot subsampling: the VPC uses at most this many individuals, each replicated N_VPC_REPLICATES times
MAX_VPC_INDIVIDUALS = 1000
N_VPC_REPLICATES = 50
#: individual-fit panels and posterior draws per panel
N_INDIVIDUAL_FITS = 12
N_FIT_DRAWS = 100
#: individuals used for the fitted population density in parameter_distributions.png
MAX_DENSITY_INDIVIDUALS = 2000
#: VPC binning: use the distinct design times when there are at most this many and each has enough points
MAX_DISTINCT_TIMES = 200
MIN_POINTS_PER_TIME = 5
N_TIME_BINS = 12


# ============================================================================ estimates table
def _natural(name: str, value: float) -> tuple[float, str]:
    """Natural-scale value of one population parameter and what it means (NaN where there is none)."""
    if name.startswith("beta_"):
        return math.exp(value), "exp(beta): population median (typical value)"
    if name.startswith("B_"):
        return math.exp(value), "exp(B): fold change per unit covariate"
    if name.startswith("log_omega_"):
        return math.exp(value), "omega: random-effect sd (log scale)"
    if name.startswith("log_L_"):
        return math.exp(value), "Cholesky diagonal of Omega (log scale)"
    return float("nan"), "Cholesky off-diagonal of Omega (log scale)"


def _level_tag(level: float) -> str:
    return str(int(round(level * 100)))


def estimates_frame(fit: FitResult) -> pd.DataFrame:
    """One row per population parameter: estimate (log/unconstrained scale), natural-scale value, Wald SE and CIs,
    profile CIs, Monte-Carlo SE and the at-bound flag. Interval columns exist for the default levels and any other level
    computed; they are NaN where not computed. ``natural_lo95``/``natural_hi95`` map the 95% profile interval (Wald
    where no profile) to the natural scale (``ci95_method`` says which)."""
    rows = {r["name"]: r for r in fit.table()}
    levels = sorted(set(DEFAULT_LEVELS) | set(fit.wald_ci) | set(fit.profile_ci))
    out: list[dict[str, Any]] = []
    for i, name in enumerate(fit.parameter_names):
        r = rows[name]
        nat, kind = _natural(name, r["estimate"])
        row: dict[str, Any] = {"name": name, "estimate": r["estimate"], "natural": nat, "natural_meaning": kind,
                               "se": r.get("se", np.nan)}
        for lv in levels:
            lo, hi = r.get(f"wald_{_level_tag(lv)}", (np.nan, np.nan))
            row[f"wald{_level_tag(lv)}_lo"], row[f"wald{_level_tag(lv)}_hi"] = lo, hi
        for lv in levels:
            lo, hi = r.get(f"profile_{_level_tag(lv)}", (np.nan, np.nan))
            row[f"profile{_level_tag(lv)}_lo"], row[f"profile{_level_tag(lv)}_hi"] = lo, hi
        lo, hi, method = row.get("profile95_lo", np.nan), row.get("profile95_hi", np.nan), "profile"
        if not (np.isfinite(lo) and np.isfinite(hi)):
            lo, hi, method = row.get("wald95_lo", np.nan), row.get("wald95_hi", np.nan), "wald"
        if not (np.isfinite(lo) and np.isfinite(hi)):
            method = ""
        if np.isfinite(nat) and method:
            row["natural_lo95"], row["natural_hi95"] = math.exp(lo), math.exp(hi)
        else:
            row["natural_lo95"], row["natural_hi95"] = np.nan, np.nan
        row["ci95_method"] = method
        row["mc_se"] = r.get("mc_se", np.nan)
        row["mc_bias"] = r.get("mc_bias", np.nan)
        row["at_bound"] = bool(r.get("at_bound", False))
        out.append(row)
    return pd.DataFrame(out)


def format_estimates(fit: FitResult) -> str:
    """Compact fixed-width table of the estimates for stdout: log-scale estimate, natural value, SE, 95% CI (profile
    where computed, else Wald), Monte-Carlo SE and bias; ``*`` marks an estimate at a bound."""
    df = estimates_frame(fit)
    width = max(9, int(df["name"].str.len().max()))

    def num(x: float, w: int = 9) -> str:
        return f"{x:>{w}.4g}" if np.isfinite(x) else " " * (w - 1) + "-"

    head = (f"{'parameter':<{width}}  {'estimate':>9}  {'natural':>9}  {'SE':>9}  {'95% CI':^23}  {'MC SE':>9}  "
            f"{'MC bias':>9}")
    lines = [head, "-" * len(head)]
    for _, r in df.iterrows():
        lo = r["profile95_lo"] if r["ci95_method"] == "profile" else r["wald95_lo"]
        hi = r["profile95_hi"] if r["ci95_method"] == "profile" else r["wald95_hi"]
        tag = {"profile": " p", "wald": " w"}.get(r["ci95_method"], "")
        ci = f"{f'[{lo:.4g}, {hi:.4g}]{tag}':<23}" if r["ci95_method"] else f"{'-':^23}"
        flag = " *" if r["at_bound"] else ""
        lines.append(f"{r['name']:<{width}}  {num(r['estimate'])}  {num(r['natural'])}  {num(r['se'])}  {ci}"
                     f"  {num(r['mc_se'])}  {num(r['mc_bias'])}{flag}")
    lines.append("95% CI: p = profile likelihood, w = Wald; natural = exp(estimate) for means, covariate effects, sds; "
                 "MC = Monte-Carlo error from the finite posterior draws"
                 + ("; * = at a bound" if df["at_bound"].any() else ""))
    return "\n".join(lines)


# ============================================================================ summary and individual table
def _jsonable(obj: Any) -> Any:
    """Plain JSON types; non-finite floats become null (strict JSON has no NaN)."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, str):
        return obj
    raise TypeError(f"cannot write {type(obj).__name__} to JSON: {obj!r}")


def _pilot_summary(fit: FitResult) -> dict[str, Any]:
    """The first round's multistart when the final fit refined its optima on more draws."""
    p = fit.pilot
    return {"note": f"the multistart ran on the first {p.n_draws} draws per individual; the final fit started from "
                    "its distinct optima on all draws", "n_draws": p.n_draws, "n_starts": p.n_starts,
            "n_converged": p.n_converged, "fval": p.fval,
            "starts": [{"id": r.id, "fval": r.fval, "n_fval": r.n_fval, "time_s": r.time, "exitflag": r.exitflag}
                       for r in p.result.optimize_result.list]}


def build_summary(fit: FitResult, inputs: Mapping[str, Any], extra: Mapping[str, Any] | None, ids: Sequence[str],
                  report_s: float | None = None) -> dict[str, Any]:
    """The content of ``summary.json``. Top-level keys of ``extra`` are added verbatim (e.g. ``model_selection`` with
    BICc or marginal likelihoods); a key that already exists is merged when both are dicts, else refused."""
    d = fit.diagnostics
    ess = np.asarray(d.ess, dtype=np.float64)
    opt = fit.result.optimize_result.list
    starts = [{"id": r.id, "fval": r.fval, "n_fval": r.n_fval, "time_s": r.time, "exitflag": r.exitflag,
               "message": str(r.message) if r.message is not None else None} for r in opt]
    low_ids = [str(i) for i in d.low_ess]
    summary: dict[str, Any] = {
        "objective": {"value": fit.fval, "mc_se": fit.mc_se_fval, "jensen_bias": d.jensen_bias,
                      "note": "J = -log p(data | theta) + const; the constant is shared by every population model "
                              "fitted to the same data and estimator, so differences are exact likelihood ratios"},
        "information_criteria": fit.information_criteria(),
        "n_individuals": len(ids),
        "n_draws_per_individual": int(fit.objective.draws.M),
        "parameter_names": list(fit.parameter_names),
        "estimates": estimates_frame(fit).to_dict(orient="records"),
        "natural": fit.natural(),
        "multistart": {"n_starts": fit.n_starts, "n_converged": fit.n_converged, "starts": starts,
                       **({} if fit.pilot is None else {"pilot": _pilot_summary(fit)})},
        "at_bound": [n for n, b in zip(fit.parameter_names, fit.at_bound if fit.at_bound is not None else [])
                     if b],
        "timings": {"fit_s": fit.time_s, **({"report_s": report_s} if report_s is not None else {})},
        "ess": {**d.summary(), "ess_q05": float(np.quantile(ess, 0.05)), "ess_mean": float(ess.mean()),
                "low_ess_ids": low_ids[:100], "low_ess_ids_truncated": len(low_ids) > 100},
        "inputs": dict(inputs),
    }
    for key, value in (extra or {}).items():
        if key not in summary:
            summary[key] = value
        elif isinstance(summary[key], dict) and isinstance(value, Mapping):
            clash = sorted(set(summary[key]) & set(value))
            if clash:
                raise ValueError(f"extra[{key!r}] would overwrite {clash} in the summary")
            summary[key] = {**summary[key], **value}
        else:
            raise ValueError(f"extra key {key!r} clashes with a summary entry")
    return _jsonable(summary)


def individual_frame(model: IndividualModel, draws: np.ndarray, ids: Sequence[str],
                     covariates: Mapping[str, np.ndarray] | None, groups: np.ndarray | None,
                     ess: np.ndarray | None = None,
                     conditional: tuple[np.ndarray, np.ndarray] | None = None) -> pd.DataFrame:
    """Per individual: id, group, covariates, ESS at the estimate; the mean and sd of each log-parameter given the
    individual's data under the *fitted population model* (``log_<p>_cond_mean``, ``log_<p>_cond_sd``: Monolix's
    conditional mean, the individual estimate for predictions and diagnostics), when ``conditional`` is given; and
    the estimator's posterior under its broad training prior, median and 90% interval (``log_<p>_median``,
    ``log_<p>_q05``, ``log_<p>_q95``), which depends on the data alone."""
    cols: dict[str, Any] = {"id": [str(i) for i in ids]}
    if groups is not None:
        cols["group"] = np.asarray(groups).astype(str)
    for name, values in (covariates or {}).items():
        cols[name] = np.asarray(values).reshape(-1)
    if ess is not None:
        cols["ess"] = np.asarray(ess, dtype=np.float64)
    if conditional is not None:
        for p, name in enumerate(model.param_names):
            cols[f"log_{name}_cond_mean"] = conditional[0][:, p]
            cols[f"log_{name}_cond_sd"] = conditional[1][:, p]
    q05, med, q95 = np.quantile(draws, [0.05, 0.5, 0.95], axis=1)
    for p, name in enumerate(model.param_names):
        cols[f"log_{name}_median"] = med[:, p]
        cols[f"log_{name}_q05"] = q05[:, p]
        cols[f"log_{name}_q95"] = q95[:, p]
    return pd.DataFrame(cols)


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
    sim = model.simulate(phi.reshape(-1, population.k), rep_design, rng)
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


def _optima(n: int) -> str:
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
                     f"to the best objective;\nits {_optima(fit.n_starts)} refitted on "
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
    levels = ", ".join(f"{_level_tag(lv)}%" for lv in sorted(fit.profile_ci))
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


# ============================================================================ report.md
def _markdown_table(df: pd.DataFrame) -> str:
    def fmt(x: Any) -> str:
        if isinstance(x, (float, np.floating)):
            return f"{x:.4g}" if np.isfinite(x) else "–"
        return str(x)

    head = "| " + " | ".join(df.columns) + " |"
    sep = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *body])


def render_report(fit: FitResult, summary: Mapping[str, Any], plots: Sequence[str]) -> str:
    """A short human-readable summary: objective, criteria, estimates, natural-scale quantities, ESS and plots."""
    df = estimates_frame(fit)
    show = pd.DataFrame({
        "parameter": df["name"], "estimate": df["estimate"], "SE": df["se"],
        "95% CI": [f"[{lo:.4g}, {hi:.4g}] ({m})" if m else "–" for lo, hi, m in zip(
            np.where(df["ci95_method"] == "profile", df["profile95_lo"], df["wald95_lo"]),
            np.where(df["ci95_method"] == "profile", df["profile95_hi"], df["wald95_hi"]), df["ci95_method"])],
        "natural": df["natural"],
        "natural 95% CI": [f"[{lo:.4g}, {hi:.4g}]" if np.isfinite(lo) else "–"
                           for lo, hi in zip(df["natural_lo95"], df["natural_hi95"])],
        "MC SE": df["mc_se"], "MC bias": df["mc_bias"], "at bound": np.where(df["at_bound"], "yes", ""),
    })
    ic = summary["information_criteria"]
    ess = summary["ess"]
    inputs = summary.get("inputs", {})
    nat = fit.natural()
    lines = [
        "# Population fit",
        "",
        f"- individuals: {summary['n_individuals']}, posterior draws per individual: "
        f"{summary['n_draws_per_individual']}",
        f"- objective J = {fit.fval:.4f} (Monte-Carlo SE {fit.mc_se_fval:.3f}); -2LL = {ic['minus2ll_rel']:.3f}, "
        f"AIC = {ic['aic_rel']:.3f}, BIC = {ic['bic_rel']:.3f} (up to a constant shared by all population models "
        "fitted to the same data and estimator)",
        (f"- multistart: {fit.n_converged} of {fit.n_starts} starts converged to the best objective; "
         f"fit time {fit.time_s:.1f} s" if fit.pilot is None else
         f"- multistart on the first {fit.pilot.n_draws} draws: {fit.pilot.n_converged} of {fit.pilot.n_starts} "
         f"starts converged to the best objective; its {_optima(fit.n_starts)} refitted on all draws "
         f"({fit.n_converged} reached the best); last fit {fit.time_s:.1f} s"),
        f"- importance sampling: median ESS {ess['ess_median']:.1f}, minimum {ess['ess_min']:.1f}, "
        f"{ess['n_low_ess']} individuals below {ess['ess_threshold']:.0f}",
    ]
    mc = summary.get("monte_carlo") or {}
    if mc.get("rounds"):
        worst = mc.get("max_mc_over_se")
        grown = (f"adapted from {mc['n_draws_start']} to {mc['n_draws_final']}" if mc["n_draws_final"] !=
                 mc["n_draws_start"] else f"{mc['n_draws_final']} ({mc['draws']})")
        lines.append(f"- posterior draws per individual: {grown}; Monte-Carlo error of the estimates (SE and "
                     "jackknife bias, from refits on disjoint draw subsets) at most "
                     f"{worst:.2f} x the statistical SE (target {mc['target_mc_over_se']:.2f})"
                     if worst is not None else f"- posterior draws per individual: {grown}")
    for key in ("data_hash", "estimator_sha256", "seed"):
        if key in inputs:
            lines.append(f"- {key}: `{inputs[key]}`")
    shrink = (summary.get("shrinkage") or {}).get("eta_shrinkage")
    if shrink:
        lines.append("- eta shrinkage (conditional means): " + ", ".join(f"{p} {100 * v:.0f}%" for p, v in
                                                                           shrink.items()))
    if summary.get("at_bound"):
        lines.append(f"- **warning**: estimates at a bound: {', '.join(summary['at_bound'])}")
    if "model_selection" in summary:
        lines.append(f"- model selection: `{json.dumps(summary['model_selection'])}`")
    lines += ["", "## Estimates (log / unconstrained scale; natural = exp)", "", _markdown_table(show), ""]
    lines += ["## Natural scale", "", "| parameter | typical value | random-effect sd (log scale) |", "|---|---|---|"]
    for key, val in nat["natural_mean"].items():
        base = key.split("[")[0]
        om = nat["omega_sd"].get(base)
        lines.append(f"| {key} | {val:.4g} | {f'{om:.4g}' if om is not None else 'none (fixed)'} |")
    if nat.get("covariate_effects"):
        lines += ["", "Covariate effects (log scale; exp = fold change per unit): "
                  + ", ".join(f"{k} = {v:.4g}" for k, v in nat["covariate_effects"].items())]
    if "correlation" in nat:
        names = nat["correlation"]["names"]
        lines += ["", "Random-effect correlations:", "", "| | " + " | ".join(names) + " |",
                  "|---|" + "---|" * len(names)]
        for name, row in zip(names, nat["correlation"]["matrix"]):
            lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    lines += ["", "## Files", "", f"- [{ESTIMATES_FILE}]({ESTIMATES_FILE}), [{SUMMARY_FILE}]({SUMMARY_FILE}), "
              f"[{INDIVIDUAL_FILE}]({INDIVIDUAL_FILE}), [{PYPESTO_FILE}]({PYPESTO_FILE}) (all multistart and profile "
              "results, `pypesto.store.read_result`)"]
    if plots:
        lines += ["", "## Plots", ""]
        for p in plots:
            lines += [f"### {p}", "", f"![{p}]({p})", ""]
    return "\n".join(lines) + "\n"


# ============================================================================ writing
@contextmanager
def _atomic_directory(out_dir: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``out_dir`` (renames), on an exception it is deleted
    and ``out_dir`` (new or pre-existing) is untouched."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the results folder gets ordinary permissions
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.rmdir(old)
        os.replace(out_dir, old)
        try:
            os.replace(tmp, out_dir)
        except BaseException:
            os.replace(old, out_dir)
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(old, ignore_errors=True)
        logger.info("replaced existing results folder %s", out_dir)
    else:
        os.replace(tmp, out_dir)


def write_results(
    out_dir: Path, *, fit: FitResult, model: IndividualModel, observations: np.ndarray, design: Design,
    draws: np.ndarray, ids: Sequence[str], covariates: dict[str, np.ndarray] | None, groups: np.ndarray | None,
    inputs: dict, extra: dict | None = None, plots: bool = True, seed: int = 0,
) -> Path:
    """Write the results folder of ``fit`` (estimates.csv, summary.json, individual_estimates.csv, pypesto_result.h5,
    report.md and the plots) atomically to ``out_dir`` and return it. ``observations [n, T, d]``, ``design``,
    ``draws [n, M, k]``, ``ids``, ``covariates`` and ``groups`` are those the fit used; ``inputs`` (data hash,
    estimator hash, population model, seed, versions, ...) goes verbatim into summary.json, as do the top-level keys
    of ``extra``. ``seed`` seeds the plot subsampling and the VPC simulations."""
    import pypesto.store

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    draws = np.asarray(draws, dtype=np.float64)
    observations = np.asarray(observations, dtype=np.float64)
    n = draws.shape[0]
    if observations.shape[0] != n or len(ids) != n or np.asarray(design["times"]).shape[0] != n:
        raise ValueError(f"observations ({observations.shape[0]}), design, ids ({len(ids)}) and draws ({n}) must cover "
                         "the same individuals")
    if groups is not None and len(groups) != n:
        raise ValueError(f"{len(groups)} group labels for {n} individuals")
    rng = np.random.default_rng(seed)
    with _atomic_directory(out_dir) as tmp:
        estimates_frame(fit).to_csv(tmp / ESTIMATES_FILE, index=False)
        conditional = fit.objective.conditional_moments(fit.estimate)
        shrinkage = fit.objective.shrinkage(fit.estimate, conditional[0])
        individual_frame(model, draws, ids, covariates, groups, fit.diagnostics.ess, conditional).to_csv(
            tmp / INDIVIDUAL_FILE, index=False)
        pypesto.store.write_result(fit.result, tmp / PYPESTO_FILE, overwrite=True, problem=True, optimize=True,
                                   profile=bool(fit.result.profile_result.list))
        written: list[str] = []
        if plots:
            plot_waterfall(fit, tmp / "waterfall.png")
            written.append("waterfall.png")
            if plot_profiles(fit, tmp / "profiles.png"):
                written.append("profiles.png")
            try:
                plot_individual_fits(model, observations, design, draws, ids, groups, tmp / "individual_fits.png",
                                     rng)
                written.append("individual_fits.png")
            except NotImplementedError as exc:
                logger.warning("no individual-fit plot: %s", exc)
            panels = visual_predictive_check(fit.model, fit.estimate, model, observations, design, covariates, groups,
                                             seed=int(rng.integers(2**31)))
            plot_vpc(panels, model, tmp / "vpc.png", N_VPC_REPLICATES, min(n, MAX_VPC_INDIVIDUALS))
            written.append("vpc.png")
            plot_parameter_distributions(fit, draws, covariates, groups, tmp / "parameter_distributions.png", rng,
                                         conditional[0], shrinkage)
            written.append("parameter_distributions.png")
        summary = build_summary(fit, inputs, extra, ids, report_s=time.perf_counter() - t0)
        summary["shrinkage"] = {"eta_shrinkage": shrinkage,
                                "note": "1 - sd over individuals of E[eta_i | y_i] / omega, eta_i = phi_i - mu_i, "
                                        "conditional means under the fitted population model (NONMEM/Monolix "
                                        "convention; above ~0.3 individual estimates are pulled to the population "
                                        "mean and diagnostics based on them mislead)"}
        summary["plots"] = written
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, allow_nan=False))
        (tmp / REPORT_FILE).write_text(render_report(fit, summary, written))
    logger.info("results written to %s in %.1f s", out_dir, time.perf_counter() - t0)
    return out_dir
