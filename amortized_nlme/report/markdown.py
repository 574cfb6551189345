"""report.md: the human-readable report of a results folder (objective, parameters, diagnostics, files, figures).

One number is called -2LL: the importance-sampling estimate of the marginal likelihood (``model_selection`` in the
summary), with its Monte-Carlo SE. The fit's own objective J is reported as "objective (relative)" 2J, since it
equals -2LL only up to a constant shared by the population models fitted to the same draws.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from amortized_nlme.population.fit import FitResult
from amortized_nlme.report.constants import (
    CORRELATION_FILE,
    COVARIANCE_FILE,
    DERIVED_FILE,
    ESTIMATES_FILE,
    INDIVIDUAL_FILE,
    INDIVIDUAL_FITS_PDF,
    PATAB_FILE,
    PYPESTO_FILE,
    RANDOM_EFFECTS_FILE,
    SDTAB_FILE,
    SUMMARY_FILE,
)
from amortized_nlme.report.plots import optima_phrase

FILE_DESCRIPTIONS = {
    ESTIMATES_FILE: "every population parameter: estimate (estimation scale), SE, RSE%, Wald and profile intervals, "
                    "natural-scale value where meaningful, fold change per unit for covariate effects, CV% for "
                    "omegas, Monte-Carlo SE and bias",
    RANDOM_EFFECTS_FILE: "random effects as sd (log scale) with SE, RSE%, 95% CI, CV% and shrinkage; correlations "
                         "with SE and 95% CI (full Omega)",
    DERIVED_FILE: "derived parameters at the typical individual with delta-method SE and 95% CI",
    COVARIANCE_FILE: "covariance matrix of the estimates (inverse observed Fisher information)",
    CORRELATION_FILE: "correlation matrix of the estimates",
    SDTAB_FILE: "one row per observation: ID, TIME, DV, PRED, IPRED, RES, IRES, IWRES, EPRED, NPDE, BLQ "
                "(+ GROUP, DVID/DVNAME)",
    PATAB_FILE: "one row per individual: natural-scale individual parameters exp(conditional mean), their "
                "conditional sd (log scale), derived parameters, ETAs, covariates",
    INDIVIDUAL_FILE: "per individual: conditional means and sds under the fitted population, the estimator's "
                     "posterior under its training prior (median, 90% interval), ESS",
    PYPESTO_FILE: "all multistart and profile results (`pypesto.store.read_result`)",
    SUMMARY_FILE: "every number of this report, machine-readable, with the exact inputs",
    INDIVIDUAL_FITS_PDF: "every individual's fit, paged",
}

PLOT_DESCRIPTIONS = {
    "waterfall.png": "multistart final objective values",
    "profiles.png": "profile likelihoods",
    "gof_dv_vs_pred.png": "DV against PRED and IPRED, linear and log axes",
    "gof_residuals.png": "IWRES and NPDE against time and PRED",
    "npde.png": "NPDE QQ plot and histogram against N(0, 1)",
    "eta_covariates.png": "ETAs against covariates",
    "eta_distributions.png": "ETA distributions against N(0, omega)",
    "parameter_distributions.png": "individual parameters against the fitted population",
    "vpc.png": "visual predictive check",
    "pcvpc.png": "prediction-corrected VPC",
    "pcvpc_log.png": "prediction-corrected VPC, log axis",
    "individual_fits.png": "worst, best and random individual fits",
}


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, (bool, np.bool_)):
        return "yes" if x else ""
    if isinstance(x, (int, np.integer)):
        return str(x)
    if isinstance(x, (float, np.floating)):
        return f"{x:.{digits}g}" if np.isfinite(x) else "–"
    return str(x)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return out


def _ci(lo: float, hi: float) -> str:
    return f"[{lo:.4g}, {hi:.4g}]" if np.isfinite(lo) and np.isfinite(hi) else "–"


def _share(x: float | None) -> str:
    """A fraction as a percentage; "–" for a missing value (NaN is written as null in summary.json)."""
    return f"{100 * x:.0f}%" if x is not None and np.isfinite(x) else "–"


def _pct(x: float) -> str:
    return f"{x:.1f}" if x is not None and np.isfinite(x) else "–"


def _label(r: Any) -> str:
    """``ka (beta_ka)``, ``kms [eGFP] (beta_kms[eGFP])``: the individual parameter, its group, the theta name."""
    p = str(r.get("parameter", "") or "")
    g = r.get("group", "")
    g = "" if not isinstance(g, str) or not g else f" [{g}]"
    return f"{p}{g} (`{r['name']}`)" if p else str(r["name"])


def _objective_lines(fit: FitResult, summary: Mapping[str, Any]) -> list[str]:
    ms = summary.get("model_selection") or {}
    lines = []
    if ms.get("computed") and ms.get("minus2ll") is not None:
        extra = ", ".join(f"{k.upper()} {ms[k]:.2f}" for k in ("aic", "bic", "bicc") if ms.get(k) is not None)
        lines.append(f"- **−2LL = {ms['minus2ll']:.2f}** (Monte-Carlo SE {ms.get('minus2ll_se', float('nan')):.2f}; "
                     f"importance sampling with {ms.get('n_draws', '?')} draws per individual)"
                     + (f"; {extra}" if extra else ""))
        if ms.get("ofv") is not None:
            lines.append(f"- OFV = {ms['ofv']:.2f} (NONMEM's convention: −2LL without N log 2π, N the number of "
                         "observations; comparable with NONMEM's OFV for the same data and model)")
    else:
        reason = ms.get("reason", "not requested")
        lines.append(f"- −2LL: not computed ({reason})")
    ic = summary["information_criteria"]
    lines.append(f"- objective (relative) 2J = {2 * fit.fval:.3f} (Monte-Carlo SE {2 * fit.mc_se_fval:.3f}); "
                 f"AIC (relative) {ic['aic_rel']:.3f}, BIC (relative) {ic['bic_rel']:.3f}: these differ from −2LL "
                 "by a constant shared by every population model fitted to the same data and draws, so only their "
                 "differences between such models mean something")
    return lines


def _parameter_sections(estimates: pd.DataFrame, random_effects: pd.DataFrame, derived: pd.DataFrame | None,
                        summary: Mapping[str, Any]) -> list[str]:
    lines: list[str] = ["## Parameters", "",
                        "Natural scale where it means something; RSE% on that scale; 95% CI from the profile "
                        "likelihood where computed, else Wald.", ""]
    tv = estimates[estimates["kind"] == "typical value"]
    if len(tv):
        rows = [(_label(r), r["natural"], r["natural_se"], _pct(r["rse_pct"]),
                 _ci(r["natural_lo95"], r["natural_hi95"]), r["ci95_method"], r["at_bound"]) for _, r in tv.iterrows()]
        lines += ["### Typical values (population median, exp(beta))", "",
                  *_table(["parameter", "value", "SE", "RSE%", "95% CI", "CI", "at bound"], rows), ""]
    ce = estimates[estimates["kind"] == "covariate effect"]
    if len(ce):
        rows = []
        for _, r in ce.iterrows():
            lo, hi = (r["profile95_lo"], r["profile95_hi"]) if r["ci95_method"] == "profile" else \
                (r["wald95_lo"], r["wald95_hi"])
            rows.append((r["name"], r["estimate"], r["se"], _pct(r["rse_pct"]), _ci(lo, hi),
                         r["fold_change_per_unit"], _ci(r["fold_change_lo95"], r["fold_change_hi95"])))
        lines += ["### Covariate effects (coefficient on the log parameter per unit of the covariate as entered)", "",
                  *_table(["coefficient", "estimate", "SE", "RSE%", "95% CI", "fold change per unit",
                           "95% CI"], rows), ""]
    sd = random_effects[random_effects["kind"] == "sd"] if len(random_effects) else random_effects
    if len(sd):
        rows = [(r["parameter"], r["estimate"], r["se"], _pct(r["rse_pct"]), _ci(r["lo95"], r["hi95"]),
                 _pct(r["cv_pct"]), _ci(r["cv_lo95"], r["cv_hi95"]), _pct(r["shrinkage_pct"]))
                for _, r in sd.iterrows()]
        lines += ["### Random effects (omega = sd of the log parameter; CV% = 100 sqrt(exp(omega²) − 1))", "",
                  *_table(["parameter", "omega", "SE", "RSE%", "95% CI (Wald)", "CV%", "CV% 95% CI",
                           "shrinkage %"], rows), ""]
    corr = random_effects[random_effects["kind"] == "correlation"] if len(random_effects) else random_effects
    if len(corr):
        rows = [(r["name"], r["estimate"], r["se"],
                 _ci(r["lo95"], r["hi95"])) for _, r in corr.iterrows()]
        lines += ["### Random-effect correlations (delta-method SE; CI on Fisher's z)", "",
                  *_table(["correlation", "estimate", "SE", "95% CI"], rows), ""]
    fixed = (summary.get("natural") or {}).get("fixed_std") or {}
    if fixed:
        lines += ["Parameters without random effect (fitted with a fixed kernel sd on the log scale): "
                  + ", ".join(f"{p} ({v:.3g})" for p, v in fixed.items()), ""]
    res = estimates[estimates["kind"] == "residual error sd"]
    lines += ["### Residual error", ""]
    if len(res):
        rows = [(_label(r), r["natural"], r["natural_se"], _pct(r["rse_pct"]),
                 _ci(r["natural_lo95"], r["natural_hi95"])) for _, r in res.iterrows()]
        lines += _table(["parameter", "sd", "SE", "RSE%", "95% CI"], rows) + [""]
    re = summary.get("residual_error") or {}
    eps = (summary.get("shrinkage") or {}).get("epsilon_shrinkage") or {}
    src = re.get("source", "")
    lines.append(f"- source: {src}" + (f" ({', '.join(re['parameters'])}: see the typical values above)"
                                        if re.get("parameters") else "")
                 + (f"; kind {re['kind']}" if re.get("kind") else "")
                 + f"; IWRES sd from {re.get('iwres_sd_from', '?')}")
    if eps:
        lines.append("- epsilon shrinkage (1 − sd of IWRES): " + ", ".join(f"{k} {_share(v)}" for k, v in
                                                                          eps.items()))
    lines.append("")
    if derived is not None and len(derived):
        rows = [(r["name"], r["description"], r["unit"], r["estimate"], r["se"], _pct(r["rse_pct"]),
                 _ci(r["lo95"], r["hi95"])) for _, r in derived.iterrows()]
        lines += ["### Derived parameters (typical individual, covariates at reference; delta method)", "",
                  *_table(["parameter", "description", "unit", "value", "SE", "RSE%", "95% CI"], rows), ""]
    return lines


def render_report(fit: FitResult, summary: Mapping[str, Any], *, estimates: pd.DataFrame,
                  random_effects: pd.DataFrame, derived: pd.DataFrame | None, plots: Sequence[str],
                  files: Sequence[str]) -> str:
    """The report: objective, parameter tables, the estimation-scale table, covariance of the estimates,
    diagnostics (shrinkage, NPDE, ESS, Monte-Carlo error), what was subsampled, files and figures."""
    ess = summary["ess"]
    inputs = summary.get("inputs", {})
    n_blq = summary.get("n_blq", 0)
    lines = [
        "# Population fit",
        "",
        f"- individuals: {summary['n_individuals']}, observations: {summary.get('n_observations', '?')}"
        + (f" ({n_blq} below LLOQ)" if n_blq else "") + f", posterior draws per individual: "
        f"{summary['n_draws_per_individual']}",
        *_objective_lines(fit, summary),
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
    if summary.get("at_bound"):
        lines.append(f"- **warning**: estimates at a bound: {', '.join(summary['at_bound'])}")
    if "model_selection" in summary and not (summary["model_selection"] or {}).get("computed"):
        lines.append(f"- model selection: `{json.dumps(summary['model_selection'])}`")
    lines.append("")
    lines += _parameter_sections(estimates, random_effects, derived, summary)
    # estimation-scale table
    df = estimates
    rows = [(r["name"], r["kind"], r["estimate"], r["se"], _ci(r["wald95_lo"], r["wald95_hi"]),
             _ci(r["profile95_lo"], r["profile95_hi"]), r["mc_se"], r["mc_bias"], r["at_bound"])
            for _, r in df.iterrows()]
    lines += ["### All population parameters (estimation scale: log or unconstrained)", "",
              *_table(["parameter", "kind", "estimate", "SE", "Wald 95% CI", "profile 95% CI", "MC SE", "MC bias",
                       "at bound"], rows), ""]
    cov = summary.get("covariance_of_estimates") or {}
    lines += ["### Covariance of the estimates", ""]
    if cov.get("available"):
        cn = cov["condition_number"]
        lines.append(f"- condition number of the correlation matrix of the estimates: {cn:.3g}"
                     + (" (**above 1000: the estimates are poorly determined jointly**)" if cn > 1000 else ""))
        high = cov.get("high_correlations") or []
        lines.append("- pairs correlated beyond ±0.95: " + (", ".join(f"{h['a']} ~ {h['b']} ({h['correlation']:.3f})"
                                                                    for h in high) if high else "none"))
        lines.append(f"- [{COVARIANCE_FILE}]({COVARIANCE_FILE}), [{CORRELATION_FILE}]({CORRELATION_FILE})")
    else:
        lines.append(f"- not available: {cov.get('reason', 'no Hessian')}")
    lines.append("")
    # diagnostics
    lines += ["## Diagnostics", ""]
    shrink = (summary.get("shrinkage") or {}).get("eta_shrinkage") or {}
    if shrink:
        lines.append("- eta shrinkage (conditional means): " + ", ".join(f"{p} {_share(v)}" for p, v in
                                                                           shrink.items()))
    npde = summary.get("npde") or {}
    if "mean" in npde:
        lines.append(f"- NPDE from {npde['n_simulations']} simulations per individual of the fitted model "
                     f"({npde['n']} observations): mean {npde['mean']:.3f} (t-test p = {npde['p_mean_ttest']:.3g}), "
                     f"variance {npde['variance']:.3f} (Fisher test p = {npde['p_variance_fisher']:.3g}), "
                     f"Shapiro-Wilk p = {npde['p_normal_shapiro_wilk']:.3g}, Kolmogorov-Smirnov p = "
                     f"{npde['p_normal_ks']:.3g}; global (Bonferroni) p = {npde['p_global_bonferroni']:.3g}")
    elif npde:
        lines.append(f"- NPDE: {npde.get('n', 0)} values, too few for tests")
    vpc = summary.get("vpc") or {}
    if vpc:
        lines.append(f"- VPCs: {vpc['n_replicates']} simulated data sets of {vpc['n_individuals']} of "
                     f"{vpc['n_total']} individuals; stratified by {vpc['stratified_by']}; bins: {vpc['binning']} "
                     "(one per nominal time on a common grid, else optimal 1-D k-means of the observed times)")
    subs = summary.get("subsampling") or {}
    lines.append("- subsampled for figures (tables cover everyone): " + ("; ".join(subs.values()) if subs else
                                                                          "nothing"))
    if "model_selection" in summary and (summary["model_selection"] or {}).get("computed"):
        ms = {k: v for k, v in summary["model_selection"].items() if not isinstance(v, (dict, list))}
        lines.append(f"- model selection: `{json.dumps(ms)}`")
    lines += ["", "## Files", ""]
    for f in files:
        desc = FILE_DESCRIPTIONS.get(f, "")
        lines.append(f"- [{f}]({f})" + (f": {desc}" if desc else ""))
    if plots:
        lines += ["", "## Figures", ""]
        for p in plots:
            lines += [f"### {p}" + (f": {PLOT_DESCRIPTIONS[p]}" if p in PLOT_DESCRIPTIONS else ""), "",
                      f"![{p}]({p})", ""]
    return "\n".join(lines) + "\n"
