"""Tables of a population fit: the estimates (log and natural scale, SEs, Monte-Carlo error, intervals), the printed
summary, the individual estimates and the summary.json content."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from amortized_nlme.model import IndividualModel
from amortized_nlme.population.fit import DEFAULT_LEVELS, FitResult
from amortized_nlme.provenance import plain_json

logger = logging.getLogger(__name__)


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


def level_tag(level: float) -> str:
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
            lo, hi = r.get(f"wald_{level_tag(lv)}", (np.nan, np.nan))
            row[f"wald{level_tag(lv)}_lo"], row[f"wald{level_tag(lv)}_hi"] = lo, hi
        for lv in levels:
            lo, hi = r.get(f"profile_{level_tag(lv)}", (np.nan, np.nan))
            row[f"profile{level_tag(lv)}_lo"], row[f"profile{level_tag(lv)}_hi"] = lo, hi
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
