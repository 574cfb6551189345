"""Tables of a population fit: the printed estimates, the individual estimates and the summary.json content (the
parameter tables themselves are built in :mod:`amortized_nlme.report.parameters`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from amortized_nlme.model import IndividualModel
from amortized_nlme.population.fit import FitResult
from amortized_nlme.provenance import plain_json
from amortized_nlme.report.parameters import estimates_frame, level_tag  # noqa: F401 - re-exported

logger = logging.getLogger(__name__)


# ============================================================================ printed estimates
def format_estimates(fit: FitResult) -> str:
    """Compact fixed-width table of the estimates for stdout: log-scale estimate, natural value (typical values and
    sds; fold change per unit for covariate effects, marked x), SE, RSE%, 95% CI (profile where computed, else Wald,
    on the estimate's scale), Monte-Carlo SE and bias; ``*`` marks an estimate at a bound."""
    df = estimates_frame(fit)
    width = max(9, int(df["name"].str.len().max()))

    def num(x: float, w: int = 9) -> str:
        return f"{x:>{w}.4g}" if np.isfinite(x) else " " * (w - 1) + "-"

    head = (f"{'parameter':<{width}}  {'estimate':>9}  {'natural':>10}  {'SE':>9}  {'RSE%':>6}  {'95% CI':^23}  "
            f"{'MC SE':>9}  {'MC bias':>9}")
    lines = [head, "-" * len(head)]
    for _, r in df.iterrows():
        lo = r["profile95_lo"] if r["ci95_method"] == "profile" else r["wald95_lo"]
        hi = r["profile95_hi"] if r["ci95_method"] == "profile" else r["wald95_hi"]
        tag = {"profile": " p", "wald": " w"}.get(r["ci95_method"], "")
        ci = f"{f'[{lo:.4g}, {hi:.4g}]{tag}':<23}" if r["ci95_method"] else f"{'-':^23}"
        flag = " *" if r["at_bound"] else ""
        nat = (num(r["natural"]) + " " if np.isfinite(r["natural"]) else
               num(r["fold_change_per_unit"]) + "x" if np.isfinite(r["fold_change_per_unit"]) else num(np.nan) + " ")
        rse = f"{r['rse_pct']:>6.1f}" if np.isfinite(r["rse_pct"]) else "     -"
        lines.append(f"{r['name']:<{width}}  {num(r['estimate'])}  {nat}  {num(r['se'])}  {rse}  {ci}"
                     f"  {num(r['mc_se'])}  {num(r['mc_bias'])}{flag}")
    lines.append("95% CI: p = profile likelihood, w = Wald (estimate scale); natural = typical value exp(beta) or sd "
                 "exp(log sd); x = fold change per unit of the covariate; RSE% on the natural scale; "
                 "MC = Monte-Carlo error from the finite posterior draws"
                 + ("; * = at a bound" if df["at_bound"].any() else ""))
    return "\n".join(lines)


# ============================================================================ summary and individual table
def _pilot_summary(fit: FitResult) -> dict[str, Any]:
    """The first round's multistart when the final fit refined its optima on more draws."""
    p = fit.pilot
    return {"note": f"the multistart ran on the first {p.n_draws} draws per individual; the final fit started from "
                    "its distinct optima on all draws", "n_draws": p.n_draws, "n_starts": p.n_starts,
            "n_converged": p.n_converged, "fval": p.fval,
            "starts": [{"id": r.id, "fval": r.fval, "n_fval": r.n_fval, "time_s": r.time, "exitflag": r.exitflag}
                       for r in p.result.optimize_result.list]}


def _relative_criteria(fit: FitResult) -> dict[str, Any]:
    """2J, AIC and BIC from the fit's objective J: relative values (not -2LL, which only the importance-sampling
    estimate of ``model_selection`` is called), comparable between population models on the same draws."""
    ic = dict(fit.information_criteria())
    return {"objective_x2_rel": ic.pop("minus2ll_rel"), **ic,
            "note": "2J, AIC = 2J + 2p, BIC = 2J + p log(n) with J the fit's objective: up to a constant shared by "
                    "every population model fitted to the same data and draws (not -2LL)"}


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
        "information_criteria": _relative_criteria(fit),
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
    return plain_json(summary)


def individual_frame(model: IndividualModel, draws: np.ndarray, ids: Sequence[str],
                     covariates: Mapping[str, np.ndarray] | None, groups: np.ndarray | None,
                     ess: np.ndarray | None = None,
                     conditional: tuple[np.ndarray, np.ndarray] | None = None,
                     conditional_names: Sequence[str] | None = None) -> pd.DataFrame:
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
        names = conditional_names or model.param_names
        for p, name in enumerate(names):
            cols[f"log_{name}_cond_mean"] = conditional[0][:, p]
            cols[f"log_{name}_cond_sd"] = conditional[1][:, p]
    q05, med, q95 = np.quantile(draws, [0.05, 0.5, 0.95], axis=1)
    for p, name in enumerate(model.param_names):
        cols[f"log_{name}_median"] = med[:, p]
        cols[f"log_{name}_q05"] = q05[:, p]
        cols[f"log_{name}_q95"] = q95[:, p]
    return pd.DataFrame(cols)
