"""report.md: the human-readable report of a results folder (estimates, diagnostics, provenance, plots)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from amortized_nlme.population.fit import FitResult
from amortized_nlme.report.constants import (
    ESTIMATES_FILE,
    INDIVIDUAL_FILE,
    PYPESTO_FILE,
    SUMMARY_FILE,
)
from amortized_nlme.report.plots import optima_phrase
from amortized_nlme.report.tables import estimates_frame

logger = logging.getLogger(__name__)


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
         f"starts converged to the best objective; its {optima_phrase(fit.n_starts)} refitted on all draws "
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
