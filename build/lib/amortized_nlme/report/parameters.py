"""The parameter tables of a fit: what every population parameter means, natural-scale values and relative standard
errors, the random effects as sds, CV% and correlations, derived parameters, and the covariance and correlation
matrices of the estimates. Standard errors of functions of theta come from the delta method with the inverse observed
Fisher information (the Hessian of the objective, ``fit.hessian``) and a central-difference Jacobian.

Derived parameters are a hook of the individual model: a model may define ``derived_parameters``, a sequence of
:class:`DerivedParameter` (name, function of the log-parameters, description, unit), e.g. for a one-compartment model
``DerivedParameter("t_half", lambda p: np.log(2) / np.exp(p["ke"]), "elimination half-life", "h")`` and
``DerivedParameter("CL", lambda p: np.exp(p["ke"] + p["V"]), "clearance", "L/h")``. The report gives each at the
typical individual (per group for group-specific parameters, covariates at 0, i.e. at their reference) with its SE,
and at every individual's conditional means in ``patab.csv``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from amortized_nlme.model import IndividualModel
from amortized_nlme.population.fit import DEFAULT_LEVELS, FitResult
from amortized_nlme.population.model import PopulationModel

Z95 = float(stats.norm.ppf(0.975))


@dataclass(frozen=True)
class DerivedParameter:
    """A quantity computed from the individual log-parameters: ``function(log_params)`` gets a mapping from each
    parameter name to an array of log values and returns the derived value (natural scale, same shape)."""

    name: str
    function: Callable[[Mapping[str, np.ndarray]], np.ndarray]
    description: str = ""
    unit: str = ""

    def __call__(self, names: Sequence[str], phi: np.ndarray) -> np.ndarray:
        """The value at log-parameters ``phi [..., k]`` (columns in ``names`` order)."""
        phi = np.asarray(phi, dtype=np.float64)
        return np.asarray(self.function({p: phi[..., i] for i, p in enumerate(names)}), dtype=np.float64)


def model_derived_parameters(model: IndividualModel) -> tuple[DerivedParameter, ...]:
    """The derived parameters the individual model defines (attribute ``derived_parameters``; none by default)."""
    out = []
    for d in getattr(model, "derived_parameters", ()) or ():
        out.append(d if isinstance(d, DerivedParameter) else DerivedParameter(*d))
    return tuple(out)


# ============================================================================ covariance of the estimates
def covariance_of_estimates(fit: FitResult) -> np.ndarray | None:
    """Inverse observed Fisher information ``[p, p]`` at the estimate, or None when the Hessian is missing, singular
    or not positive definite."""
    if fit.hessian is None:
        return None
    H = np.asarray(fit.hessian, dtype=np.float64)
    if not np.all(np.isfinite(H)):
        return None
    try:
        np.linalg.cholesky(H)
    except np.linalg.LinAlgError:
        return None
    cov = np.linalg.inv(H)
    return 0.5 * (cov + cov.T)


def delta_method(g: Callable[[np.ndarray], np.ndarray], theta: np.ndarray, cov: np.ndarray | None,
                 rel_step: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
    """g(theta) ``[r]`` and its delta-method SEs sqrt(diag(J cov J^T)) (NaN without ``cov``), with the Jacobian J by
    central differences."""
    theta = np.asarray(theta, dtype=np.float64)
    val = np.atleast_1d(np.asarray(g(theta), dtype=np.float64))
    if cov is None:
        return val, np.full(val.shape, np.nan)
    J = np.empty((val.size, theta.size))
    for i in range(theta.size):
        h = rel_step * max(1.0, abs(theta[i]))
        e = np.zeros_like(theta)
        e[i] = h
        J[:, i] = (np.atleast_1d(g(theta + e)) - np.atleast_1d(g(theta - e))) / (2.0 * h)
    var = np.einsum("ri,ij,rj->r", J, cov, J)
    return val, np.sqrt(np.where(var >= 0, var, np.nan))


def covariance_tables(fit: FitResult, cov: np.ndarray | None) -> tuple[pd.DataFrame | None, pd.DataFrame | None,
                                                                        dict[str, Any]]:
    """The covariance and correlation matrices of the estimates (frames indexed by parameter name) and a summary:
    condition number of the correlation matrix (largest / smallest eigenvalue, NONMEM's convention; above ~1000 the
    estimates are poorly determined together) and the pairs correlated beyond 0.95 in absolute value."""
    names = list(fit.parameter_names)
    if cov is None:
        return None, None, {"available": False, "reason": "the observed Fisher information is missing, singular or "
                                                          "not positive definite at the estimate"}
    sd = np.sqrt(np.diag(cov))
    corr = cov / np.outer(sd, sd)
    eig = np.linalg.eigvalsh(corr)
    cond = float(eig.max() / eig.min()) if eig.min() > 0 else float("inf")
    pairs = [{"a": names[i], "b": names[j], "correlation": float(corr[i, j])}
             for i in range(len(names)) for j in range(i) if abs(corr[i, j]) > 0.95]
    info = {"available": True, "condition_number": cond, "eigenvalues": eig.tolist(), "high_correlations": pairs,
            "note": "covariance = inverse observed Fisher information (Hessian of -log L by central differences of "
                    "the analytic gradient); condition number = largest / smallest eigenvalue of the correlation "
                    "matrix"}
    return (pd.DataFrame(cov, index=names, columns=names), pd.DataFrame(corr, index=names, columns=names), info)


# ============================================================================ meaning of each population parameter
def parameter_roles(pop: PopulationModel) -> dict[str, dict[str, Any]]:
    """For every population parameter name: ``kind`` (typical value, covariate effect, omega, Cholesky factor,
    residual error sd, other), the individual ``parameter`` it belongs to, and ``group``/``covariate`` where any."""
    roles: dict[str, dict[str, Any]] = {}
    for p in pop.param_names_individual:
        if p in pop.group_specific:
            for g in pop.groups:
                roles[f"beta_{p}[{g}]"] = {"kind": "typical value", "parameter": p, "group": g}
        else:
            roles[f"beta_{p}"] = {"kind": "typical value", "parameter": p}
        for c in pop.covariates.get(p, ()):
            roles[f"B_{p}_{c}"] = {"kind": "covariate effect", "parameter": p, "covariate": c}
    for a, pa in enumerate(pop.random_effects):
        roles[f"log_omega_{pa}"] = {"kind": "omega", "parameter": pa}
        roles[f"log_L_{pa}"] = {"kind": "Cholesky factor", "parameter": pa}
        for pb in pop.random_effects[:a]:
            roles[f"L_{pa}_{pb}"] = {"kind": "Cholesky factor", "parameter": pa, "other": pb}
    for name in pop.parameter_names:
        if name not in roles:
            if name.startswith("log_sigma_"):
                roles[name] = {"kind": "residual error sd", "parameter": name[len("log_"):]}
            else:
                roles[name] = {"kind": "other", "parameter": ""}
    return {name: roles[name] for name in pop.parameter_names}


def cv_percent(omega: np.ndarray | float) -> np.ndarray:
    """CV% of a log-normal parameter with log-scale sd omega: 100 sqrt(exp(omega^2) - 1)."""
    om = np.asarray(omega, dtype=np.float64)
    return 100.0 * np.sqrt(np.expm1(om * om))


def _exp(x: float) -> float:
    """exp that overflows to inf (an interval open at a bound) instead of raising."""
    with np.errstate(over="ignore"):
        return float(np.exp(x))


def level_tag(level: float) -> str:
    return str(int(round(level * 100)))


# ============================================================================ estimates.csv
def estimates_frame(fit: FitResult, cov: np.ndarray | None = None) -> pd.DataFrame:
    """One row per population parameter (``fit.parameter_names`` order).

    ``estimate`` is on the log/unconstrained scale of theta, with Wald SE, ``rse_pct`` (relative SE on the natural
    scale where one exists: 100 SE for log-scale typical values, omegas and residual sds, since SE(exp b) / exp b =
    SE(b) by the delta method; 100 SE / |B| for covariate coefficients; none for Cholesky entries), Wald and profile
    intervals at every computed level, and Monte-Carlo SE and bias. ``natural`` only where it means something: the
    typical value exp(beta) (population median) and the sd exp(log omega) or exp(log sigma), with its SE and 95%
    interval (profile where computed, else Wald, mapped through exp); covariate coefficients get
    ``fold_change_per_unit`` = exp(B) instead, the factor on the parameter per unit of the (transformed) covariate;
    omega rows get ``cv_pct``."""
    rows = {r["name"]: r for r in fit.table()}
    roles = parameter_roles(fit.model)
    levels = sorted(set(DEFAULT_LEVELS) | set(fit.wald_ci) | set(fit.profile_ci))
    out: list[dict[str, Any]] = []
    for name in fit.parameter_names:
        r = rows[name]
        role = roles[name]
        kind = role["kind"]
        est = r["estimate"]
        se = r.get("se", np.nan)
        row: dict[str, Any] = {"name": name, "kind": kind, "parameter": role.get("parameter", ""),
                               "group": role.get("group", ""), "covariate": role.get("covariate", ""),
                               "estimate": est, "se": se}
        exp_scale = kind in ("typical value", "omega", "residual error sd")
        if exp_scale:
            row["rse_pct"] = 100.0 * se
        elif kind == "covariate effect":
            row["rse_pct"] = 100.0 * se / abs(est) if est != 0 else np.nan
        else:
            row["rse_pct"] = np.nan
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
        row["ci95_method"] = method
        meaning = {"typical value": "exp(beta): typical value (population median)",
                   "omega": "omega: sd of the random effect (log scale)",
                   "residual error sd": "residual error sd"}.get(kind, "")
        nat = _exp(est) if exp_scale else np.nan
        row["natural"] = nat
        row["natural_meaning"] = meaning
        row["natural_se"] = nat * se if exp_scale else np.nan
        ok = exp_scale and bool(method)
        row["natural_lo95"] = _exp(lo) if ok else np.nan
        row["natural_hi95"] = _exp(hi) if ok else np.nan
        row["cv_pct"] = float(cv_percent(nat)) if kind == "omega" else np.nan
        fc = kind == "covariate effect"
        row["fold_change_per_unit"] = _exp(est) if fc else np.nan
        row["fold_change_lo95"] = _exp(lo) if fc and method else np.nan
        row["fold_change_hi95"] = _exp(hi) if fc and method else np.nan
        row["mc_se"] = r.get("mc_se", np.nan)
        row["mc_bias"] = r.get("mc_bias", np.nan)
        row["at_bound"] = bool(r.get("at_bound", False))
        out.append(row)
    return pd.DataFrame(out)


# ============================================================================ random_effects.csv
def _omega_functions(pop: PopulationModel) -> tuple[list[str], Callable[[np.ndarray], np.ndarray]]:
    """Names and the function theta -> (sd of every random effect, then every correlation below the diagonal)."""
    re = list(pop.random_effects)
    names = [f"omega_{p}" for p in re]
    pairs = [(a, b) for a in range(len(re)) for b in range(a)] if pop.covariance == "full" else []
    names += [f"corr_{re[a]}_{re[b]}" for a, b in pairs]

    def g(theta: np.ndarray) -> np.ndarray:
        Om = pop.covariance_matrix(theta)
        sd = np.sqrt(np.diag(Om))
        corr = [Om[a, b] / (sd[a] * sd[b]) for a, b in pairs]
        return np.concatenate([sd, np.asarray(corr, dtype=np.float64)])

    return names, g


def random_effects_frame(fit: FitResult, cov: np.ndarray | None,
                         shrinkage: Mapping[str, float] | None = None) -> pd.DataFrame:
    """One row per random effect (``kind`` = sd): omega (sd on the log scale), delta-method SE, RSE%, 95% interval
    (Wald on log omega), variance, CV% = 100 sqrt(exp(omega^2) - 1) with its interval, eta shrinkage %; and, with a
    full Omega, one row per correlation (``kind`` = correlation): estimate, SE, 95% interval (Wald on Fisher's z)."""
    pop = fit.model
    names, g = _omega_functions(pop)
    if not names:
        return pd.DataFrame(columns=["name", "kind", "parameter", "estimate", "se", "rse_pct", "lo95", "hi95"])
    val, se = delta_method(g, fit.estimate, cov)
    q = len(pop.random_effects)
    rows = []
    for i, name in enumerate(names):
        v, s = float(val[i]), float(se[i])
        if i < q:
            p = pop.random_effects[i]
            s_log = s / v if v > 0 else np.nan
            lo, hi = v * _exp(-Z95 * s_log), v * _exp(Z95 * s_log)
            rows.append({"name": name, "kind": "sd", "parameter": p, "estimate": v, "se": s,
                         "rse_pct": 100.0 * s / v if v > 0 else np.nan, "lo95": lo, "hi95": hi,
                         "variance": v * v, "cv_pct": float(cv_percent(v)), "cv_lo95": float(cv_percent(lo)),
                         "cv_hi95": float(cv_percent(hi)),
                         "shrinkage_pct": 100.0 * shrinkage[p] if shrinkage and p in shrinkage else np.nan})
        else:
            r = float(np.clip(v, -0.999999, 0.999999))
            z_se = s / (1.0 - r * r)
            z = math.atanh(r)
            rows.append({"name": name, "kind": "correlation", "parameter": name[len("corr_"):], "estimate": v,
                         "se": s, "rse_pct": 100.0 * s / abs(v) if v != 0 else np.nan,
                         "lo95": math.tanh(z - Z95 * z_se), "hi95": math.tanh(z + Z95 * z_se)})
    return pd.DataFrame(rows)


# ============================================================================ derived_parameters.csv
def typical_log_parameters(pop: PopulationModel, theta: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Labels and log-parameters ``[G, k]`` of the typical individual: one per group when some parameter is
    group-specific, covariates at 0 (their reference)."""
    covs = sorted({c for cs in pop.covariates.values() for c in cs})
    labels = list(pop.groups) if pop.group_specific else [""]
    G = len(labels)
    d = pop.design(G, {c: np.zeros(G) for c in covs}, labels if pop.group_specific else None)
    return labels, d.mean(np.asarray(theta, dtype=np.float64))


def derived_frame(fit: FitResult, cov: np.ndarray | None, derived: Sequence[DerivedParameter]) -> pd.DataFrame:
    """One row per derived parameter (and group): value at the typical individual, delta-method SE, RSE%, and the
    95% interval (Wald on the log scale for positive values, else on the natural scale)."""
    pop = fit.model
    names = list(pop.param_names_individual)
    labels, _ = typical_log_parameters(pop, fit.estimate)
    rows = []
    for dp in derived:
        def g(theta: np.ndarray, dp: DerivedParameter = dp) -> np.ndarray:
            return dp(names, typical_log_parameters(pop, theta)[1])

        val, se = delta_method(g, fit.estimate, cov)
        for lab, v, s in zip(labels, val, se):
            v, s = float(v), float(s)
            if v > 0 and np.isfinite(s):
                lo, hi, how = v * _exp(-Z95 * s / v), v * _exp(Z95 * s / v), "wald (log scale)"
            else:
                lo, hi, how = v - Z95 * s, v + Z95 * s, "wald"
            rows.append({"name": dp.name if not lab else f"{dp.name}[{lab}]", "group": lab,
                         "description": dp.description, "unit": dp.unit, "estimate": v, "se": s,
                         "rse_pct": 100.0 * s / abs(v) if v != 0 else np.nan, "lo95": lo, "hi95": hi,
                         "ci_method": how})
    return pd.DataFrame(rows)


def derived_individual_values(derived: Sequence[DerivedParameter], names: Sequence[str], phi: np.ndarray
                              ) -> dict[str, np.ndarray]:
    """Each derived parameter at log-parameters ``phi [n, k]`` (e.g. the conditional means)."""
    return {dp.name: dp(names, phi) for dp in derived}
