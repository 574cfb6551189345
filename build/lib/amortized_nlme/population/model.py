"""Population models on the log-parameter scale: phi_i = beta_group(i) + B x_i + b_i, b_i ~ N(0, Omega).

A :class:`PopulationModel` is a plain, data-independent description (which parameters have random effects, diagonal or
full Omega, covariates per parameter, group-specific parameters). It defines the layout of the population parameter
vector ``theta`` and maps ``theta`` to per-individual means and a Cholesky factor. Nothing here touches the trained
estimator: changing the population model means building a new object and refitting on the same posterior draws.

Layout of ``theta`` (all on an unconstrained or log scale):

* ``beta_<p>`` (or ``beta_<p>[<group>]`` for group-specific parameters): population mean of log-parameter p;
* ``B_<p>_<cov>``: coefficient of covariate column ``cov`` on log-parameter p (covariates are transformed by the
  caller, e.g. ``log(wt / median_wt)``; categorical covariates enter as 0/1 dummy columns, see :func:`dummy_columns`);
* diagonal Omega: ``log_omega_<p>`` = log standard deviation of the random effect of p;
* full Omega = L L^T over the random-effect parameters, L lower triangular: ``log_L_<p>`` (log of the diagonal entry
  of row p) and ``L_<p>_<q>`` (row p, column q < p).

Parameters without random effect. Their population density is a point mass at beta_p, and
p(y_i | theta) then needs the posterior *density* at phi_p = beta_p, which posterior draws alone do not give. We
estimate it with a Gaussian kernel of fixed, known width h_p (``fixed_std``, default 0.05 on the log scale, i.e. about
5 % between-individual variation): the importance-sampling estimator then targets the model phi_ip ~ N(beta_p, h_p^2)
exactly, which is the point-mass model smoothed by that kernel. Bias relative to the point mass is O(h^2 / s^2)
(s = individual posterior sd of p), Monte-Carlo variance grows as h/s shrinks (roughly M h / s draws carry weight).
Choose h well below the typical posterior sd but not so small that the effective sample size collapses;
:meth:`PopulationModel.with_fixed_std_from_draws` sets h_p to a fraction of the median posterior sd, and the
objective's diagnostics report per-individual effective sample sizes. h is never estimated.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.linalg import solve_triangular

from amortized_nlme.model import NormalPrior
from amortized_nlme.population.residual import ResidualError
from amortized_nlme.provenance import write_json_atomic

logger = logging.getLogger(__name__)

#: default kernel width (log scale) for parameters without random effect, see the module docstring
DEFAULT_FIXED_STD = 0.05


@dataclass(frozen=True)
class PopulationDesign:
    """Per-individual design of the mean: ``mu[:, p] = Z[p] @ theta[index[p]]`` (one small matrix per parameter)."""

    n: int
    Z: tuple[np.ndarray | None, ...]  # None: intercept only (mu[:, p] = theta[index[p][0]] for everyone)
    index: tuple[np.ndarray, ...]
    offset: np.ndarray | None = None  # [n, k]: covariate effects fixed at known values (e.g. allometric exponents)

    def mean(self, theta: np.ndarray) -> np.ndarray:
        """Per-individual log-scale means ``[n, k]``."""
        mu = np.empty((self.n, len(self.Z)))
        for p, (Z, idx) in enumerate(zip(self.Z, self.index)):
            mu[:, p] = theta[idx[0]] if Z is None else Z @ theta[idx]
        return mu if self.offset is None else mu + self.offset

    def mean_grad(self, g_mu: np.ndarray, out: np.ndarray) -> None:
        """Add the chain rule of ``mu`` to ``out`` (theta-sized): out[index[p]] += Z[p]^T g_mu[:, p]."""
        for p, (Z, idx) in enumerate(zip(self.Z, self.index)):
            if Z is None:
                out[idx[0]] += g_mu[:, p].sum()
            else:
                out[idx] += Z.T @ g_mu[:, p]


class PopulationModel:
    """Gaussian population model on log-parameters with random effects, covariates and group-specific means."""

    def __init__(
        self,
        prior: NormalPrior,
        random_effects: Sequence[str] | str | None = None,
        covariance: str = "diagonal",
        covariates: Mapping[str, Sequence[str]] | None = None,
        group_specific: Sequence[str] = (),
        groups: Sequence[str] = (),
        group_column: str | None = None,
        fixed_std: Mapping[str, float] | float | None = None,
        bound_sd: float = 4.0,
        residual: ResidualError | None = None,
        fixed_covariate_effects: Mapping[str, Mapping[str, float]] | None = None,
    ) -> None:
        names = tuple(prior.names)
        self.prior = prior
        self.param_names_individual: tuple[str, ...] = names
        if random_effects is None or random_effects == "all":
            random_effects = names
        elif isinstance(random_effects, str):
            random_effects = (random_effects,)
        unknown = [p for p in random_effects if p not in names]
        if unknown:
            raise ValueError(f"random effects on unknown parameters {unknown}; parameters are {list(names)}")
        # keep individual-parameter order, whatever order the user wrote
        self.random_effects: tuple[str, ...] = tuple(p for p in names if p in set(random_effects))
        if covariance not in ("diagonal", "full"):
            raise ValueError(f"covariance must be 'diagonal' or 'full', got {covariance!r}")
        self.covariance = covariance
        covariates = dict(covariates or {})
        bad = [p for p in covariates if p not in names]
        if bad:
            raise ValueError(f"covariates given for unknown parameters {bad}; parameters are {list(names)}")
        self.covariates: dict[str, tuple[str, ...]] = {p: tuple(covariates[p]) for p in names if covariates.get(p)}
        bad = [p for p in group_specific if p not in names]
        if bad:
            raise ValueError(f"group-specific parameters {bad} are unknown; parameters are {list(names)}")
        self.group_specific: tuple[str, ...] = tuple(p for p in names if p in set(group_specific))
        self.groups: tuple[str, ...] = tuple(str(g) for g in groups)
        if self.group_specific and len(self.groups) < 2:
            raise ValueError("group-specific parameters need at least two group levels in `groups`")
        if len(set(self.groups)) != len(self.groups):
            raise ValueError(f"duplicate group levels in {self.groups}")
        self.group_column = group_column
        fixed = [p for p in names if p not in self.random_effects]
        if fixed_std is None:
            fixed_std = DEFAULT_FIXED_STD
        if isinstance(fixed_std, Mapping):
            bad = [p for p in fixed_std if p not in fixed]
            if bad:
                raise ValueError(f"fixed_std given for {bad}, which have a random effect or do not exist")
            self.fixed_std = {p: float(fixed_std.get(p, DEFAULT_FIXED_STD)) for p in fixed}
        else:
            self.fixed_std = {p: float(fixed_std) for p in fixed}
        if any(v <= 0 for v in self.fixed_std.values()):
            raise ValueError("fixed_std must be positive")
        self.bound_sd = float(bound_sd)
        if residual is not None and set(residual.names) & set(names):
            raise ValueError(f"residual-error parameters {list(residual.names)} are population parameters; they must "
                             "not also be individual parameters")
        #: residual-error sds estimated as population parameters through the exact likelihood (None: the individual
        #: model's error parameters, if any, are individual parameters like the others)
        self.residual = residual
        fixed_effects = {p: dict(v) for p, v in (fixed_covariate_effects or {}).items() if v}
        bad = [p for p in fixed_effects if p not in names]
        if bad:
            raise ValueError(f"fixed covariate effects on unknown parameters {bad}; parameters are {list(names)}")
        #: covariate coefficients fixed at known values (not estimated): parameter -> {covariate: coefficient}
        self.fixed_covariate_effects = fixed_effects
        self._build_layout()

    # ------------------------------------------------------------------ layout
    def _build_layout(self) -> None:
        names = self.param_names_individual
        theta_names: list[str] = []
        self._beta_index: list[np.ndarray] = []
        for p in names:
            if p in self.group_specific:
                start = len(theta_names)
                theta_names += [f"beta_{p}[{g}]" for g in self.groups]
                self._beta_index.append(np.arange(start, len(theta_names)))
            else:
                self._beta_index.append(np.array([len(theta_names)]))
                theta_names.append(f"beta_{p}")
        self._cov_index: list[np.ndarray] = []
        for p in names:
            covs = self.covariates.get(p, ())
            start = len(theta_names)
            theta_names += [f"B_{p}_{c}" for c in covs]
            self._cov_index.append(np.arange(start, len(theta_names)))
        self.n_mean = len(theta_names)
        re_pos = [names.index(p) for p in self.random_effects]
        self._re_pos = np.array(re_pos, dtype=np.int64)
        if self.covariance == "diagonal":
            theta_names += [f"log_omega_{p}" for p in self.random_effects]
            # (row, col) of L_full for each omega parameter, and whether it is log-transformed
            self._chol_rows = self._re_pos.copy()
            self._chol_cols = self._re_pos.copy()
            self._chol_log = np.ones(len(re_pos), dtype=bool)
        else:
            rows, cols, logs = [], [], []
            for a, pa in enumerate(self.random_effects):
                for b in range(a + 1):
                    pb = self.random_effects[b]
                    if a == b:
                        theta_names.append(f"log_L_{pa}")
                    else:
                        theta_names.append(f"L_{pa}_{pb}")
                    rows.append(re_pos[a])
                    cols.append(re_pos[b])
                    logs.append(a == b)
            self._chol_rows = np.array(rows, dtype=np.int64)
            self._chol_cols = np.array(cols, dtype=np.int64)
            self._chol_log = np.array(logs, dtype=bool)
        self.n_cov_end = len(theta_names)  # theta[n_mean:n_cov_end]: the Omega (Cholesky) parameters
        if self.residual is not None:
            theta_names += list(self.residual.theta_names)
        self.parameter_names: tuple[str, ...] = tuple(theta_names)
        self._fixed_pos = np.array([names.index(p) for p in self.fixed_std], dtype=np.int64)
        self._fixed_val = np.array(list(self.fixed_std.values()), dtype=np.float64)

    @property
    def n_theta(self) -> int:
        """Number of population parameters."""
        return len(self.parameter_names)

    @property
    def k(self) -> int:
        """Number of individual (log-scale) parameters."""
        return len(self.param_names_individual)

    def replace(self, **changes: Any) -> "PopulationModel":
        """A new model with some options changed (e.g. ``covariance="full"``); the draws are untouched."""
        cfg = self._options()
        cfg["residual"] = self.residual
        cfg.update(changes)
        return PopulationModel(self.prior, **cfg)

    def _options(self) -> dict[str, Any]:
        return {
            "random_effects": list(self.random_effects),
            "covariance": self.covariance,
            "covariates": {p: list(c) for p, c in self.covariates.items()},
            "group_specific": list(self.group_specific),
            "groups": list(self.groups),
            "group_column": self.group_column,
            "fixed_std": dict(self.fixed_std),
            "bound_sd": self.bound_sd,
            "residual": None if self.residual is None else self.residual.to_dict(),
            "fixed_covariate_effects": {p: dict(v) for p, v in self.fixed_covariate_effects.items()},
        }

    def __repr__(self) -> str:
        return f"PopulationModel({self._options()})"

    # ------------------------------------------------------------ theta -> model
    def cholesky(self, theta: np.ndarray) -> np.ndarray:
        """Full ``[k, k]`` lower-triangular factor of the covariance (fixed-std rows included)."""
        L = np.zeros((self.k, self.k))
        vals = np.asarray(theta[self.n_mean : self.n_cov_end], dtype=np.float64)
        L[self._chol_rows, self._chol_cols] = np.where(self._chol_log, np.exp(vals), vals)
        L[self._fixed_pos, self._fixed_pos] = self._fixed_val
        return L

    def chol_grad(self, theta: np.ndarray, dL: np.ndarray, out: np.ndarray) -> None:
        """Write d/dtheta of the covariance part into ``out`` given ``dL`` = d/dL_full (lower triangle used)."""
        vals = np.asarray(theta[self.n_mean : self.n_cov_end], dtype=np.float64)
        g = dL[self._chol_rows, self._chol_cols]
        out[self.n_mean : self.n_cov_end] = np.where(self._chol_log, g * np.exp(vals), g)

    def covariance_matrix(self, theta: np.ndarray) -> np.ndarray:
        """Omega over the random-effect parameters ``[q, q]``."""
        L = self.cholesky(theta)[np.ix_(self._re_pos, self._re_pos)]
        return L @ L.T

    def design(
        self, n: int, covariates: Mapping[str, np.ndarray] | None = None, groups: np.ndarray | Sequence[Any] | None = None
    ) -> PopulationDesign:
        """Bind the model to ``n`` individuals: covariate columns (name -> ``[n]``) and group labels ``[n]``."""
        covariates = covariates or {}
        needed = sorted({c for cs in self.covariates.values() for c in cs}
                        | {c for cs in self.fixed_covariate_effects.values() for c in cs})
        missing = [c for c in needed if c not in covariates]
        if missing:
            raise ValueError(f"population model needs covariate columns {missing}; got {sorted(covariates)}")
        cols: dict[str, np.ndarray] = {}
        for c in needed:
            x = np.asarray(covariates[c], dtype=np.float64).reshape(-1)
            if x.size != n:
                raise ValueError(f"covariate {c!r} has {x.size} values for {n} individuals")
            if not np.all(np.isfinite(x)):
                raise ValueError(f"covariate {c!r} has missing or non-finite values")
            cols[c] = x
        onehot = None
        if self.group_specific:
            if groups is None:
                raise ValueError(f"group-specific parameters {list(self.group_specific)} need group labels")
            labels = np.asarray(groups).astype(str).reshape(-1)
            if labels.size != n:
                raise ValueError(f"{labels.size} group labels for {n} individuals")
            unknown = sorted(set(labels.tolist()) - set(self.groups))
            if unknown:
                raise ValueError(f"group labels {unknown} are not among the model's groups {list(self.groups)}")
            onehot = np.stack([(labels == g).astype(np.float64) for g in self.groups], axis=1)
        Zs, idxs = [], []
        for p_i, p in enumerate(self.param_names_individual):
            covs = [cols[c][:, None] for c in self.covariates.get(p, ())]
            if p in self.group_specific:
                Z: np.ndarray | None = np.ascontiguousarray(np.hstack([onehot, *covs]))
            elif covs:
                Z = np.ascontiguousarray(np.hstack([np.ones((n, 1)), *covs]))
            else:
                Z = None
            Zs.append(Z)
            idxs.append(np.concatenate([self._beta_index[p_i], self._cov_index[p_i]]).astype(np.int64))
        offset = None
        if self.fixed_covariate_effects:
            offset = np.zeros((n, self.k))
            for p, effects in self.fixed_covariate_effects.items():
                for c, coef in effects.items():
                    offset[:, self.param_names_individual.index(p)] += float(coef) * cols[c]
        return PopulationDesign(n=n, Z=tuple(Zs), index=tuple(idxs), offset=offset)

    # ------------------------------------------------------------------ bounds
    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Optimisation bounds from the individual prior: means within prior mean ± bound_sd·sd, log-sds in
        [log(sd/100), log(2 sd)], Cholesky off-diagonals within ±2 sd, covariate effects within ±bound_sd·sd
        (covariates are assumed centred and of O(1) spread)."""
        lb, ub = np.empty(self.n_theta), np.empty(self.n_theta)
        m, s = self.prior.mean, self.prior.std
        for p in range(self.k):
            lb[self._beta_index[p]] = m[p] - self.bound_sd * s[p]
            ub[self._beta_index[p]] = m[p] + self.bound_sd * s[p]
            lb[self._cov_index[p]] = -self.bound_sd * s[p]
            ub[self._cov_index[p]] = self.bound_sd * s[p]
        rows = self._chol_rows
        sl = slice(self.n_mean, self.n_cov_end)
        lb[sl] = np.where(self._chol_log, np.log(s[rows] / 100.0), -2.0 * s[rows])
        ub[sl] = np.where(self._chol_log, np.log(2.0 * s[rows]), 2.0 * s[rows])
        if self.residual is not None:
            c, w = np.asarray(self.residual.center), np.asarray(self.residual.scale)
            lb[self.n_cov_end:], ub[self.n_cov_end:] = c - 4.0 * w, c + 4.0 * w
        return lb, ub

    def init_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Narrower box for random start points: means within ±2 sd, log-sds in [log(sd/20), log(sd)], small
        Cholesky off-diagonals and covariate effects (random starts far out in the tails waste evaluations)."""
        lb, ub = self.bounds()
        m, s = self.prior.mean, self.prior.std
        for p in range(self.k):
            lb[self._beta_index[p]] = m[p] - 2.0 * s[p]
            ub[self._beta_index[p]] = m[p] + 2.0 * s[p]
            lb[self._cov_index[p]] = -s[p]
            ub[self._cov_index[p]] = s[p]
        rows = self._chol_rows
        sl = slice(self.n_mean, self.n_cov_end)
        lb[sl] = np.where(self._chol_log, np.log(s[rows] / 20.0), -0.3 * s[rows])
        ub[sl] = np.where(self._chol_log, np.log(s[rows]), 0.3 * s[rows])
        if self.residual is not None:
            c, w = np.asarray(self.residual.center), np.asarray(self.residual.scale)
            lb[self.n_cov_end:], ub[self.n_cov_end:] = c - 1.5 * w, c + 1.5 * w
        return lb, ub

    # ------------------------------------------------------------ start point
    def initial_guess(
        self,
        draws: np.ndarray,
        covariates: Mapping[str, np.ndarray] | None = None,
        groups: np.ndarray | Sequence[Any] | None = None,
        residual_start: np.ndarray | None = None,
    ) -> np.ndarray:
        """Moment-based theta from individual posterior draws ``[n, M, k]``: least squares of posterior medians on
        the mean design; Omega from the residual covariance minus the mean posterior variance; the residual-error
        parameters at ``residual_start`` (log sds; default the centre of their range); clipped to bounds."""
        draws = np.asarray(draws)
        n = draws.shape[0]
        med = np.median(draws, axis=1)
        post_var = draws.var(axis=1).mean(axis=0)
        design = self.design(n, covariates, groups)
        theta = np.zeros(self.n_theta)
        resid = np.empty_like(med)
        for p, (Z, idx) in enumerate(zip(design.Z, design.index)):
            if Z is None:
                Z = np.ones((n, 1))
            coef, *_ = np.linalg.lstsq(Z, med[:, p], rcond=None)
            theta[idx] = coef
            resid[:, p] = med[:, p] - Z @ coef
        lb, ub = self.bounds()
        re = self._re_pos
        if re.size:
            C = np.atleast_2d(np.cov(resid[:, re], rowvar=False)) if n > 1 else np.eye(re.size)
            raw = np.diag(C).copy()
            var = np.maximum(raw - post_var[re], 0.25 * raw)
            s_lo = np.exp(lb[self.n_mean : self.n_cov_end][self._chol_log])
            s_hi = np.exp(ub[self.n_mean : self.n_cov_end][self._chol_log])
            sd = np.clip(np.sqrt(np.maximum(var, 0.0)), s_lo * 1.5, s_hi / 1.5)
            if self.covariance == "diagonal":
                theta[self.n_mean : self.n_cov_end] = np.log(sd)
            else:
                d = np.sqrt(np.maximum(raw, 1e-300))
                R = C / np.outer(d, d)
                R = 0.9 * R + 0.1 * np.eye(re.size)  # shrink the correlation so that it is safely positive definite
                Lq = np.linalg.cholesky(sd[:, None] * R * sd[None, :])
                vals = []
                for a in range(re.size):
                    for b in range(a + 1):
                        vals.append(np.log(Lq[a, a]) if a == b else Lq[a, b])
                theta[self.n_mean : self.n_cov_end] = vals
        if self.residual is not None:
            start = np.asarray(self.residual.center if residual_start is None else residual_start, dtype=np.float64)
            theta[self.n_cov_end:] = start
        return np.clip(theta, lb + 1e-6 * (ub - lb), ub - 1e-6 * (ub - lb))

    def with_fixed_std_from_draws(self, draws: np.ndarray, fraction: float = 0.2) -> "PopulationModel":
        """Set each fixed-effect kernel width h_p to ``fraction`` × the median individual posterior sd of p."""
        if not self.fixed_std:
            return self
        sd = np.median(np.asarray(draws).std(axis=1), axis=0)
        names = self.param_names_individual
        h = {p: float(fraction * sd[names.index(p)]) for p in self.fixed_std}
        logger.info("kernel widths for parameters without random effect: %s", h)
        return self.replace(fixed_std=h)

    # ------------------------------------------------------------- reporting
    def transform(self, theta: np.ndarray) -> dict[str, Any]:
        """Readable estimates: log-scale and natural-scale (exp) means, covariate effects, random-effect sds,
        correlation matrix (full Omega) and the kernel widths of parameters without random effect."""
        theta = np.asarray(theta, dtype=np.float64)
        log_mean, natural, effects = {}, {}, {}
        for p_i, p in enumerate(self.param_names_individual):
            for j in self._beta_index[p_i]:
                key = self.parameter_names[j][len("beta_") :]
                log_mean[key] = float(theta[j])
                natural[key] = float(np.exp(theta[j]))
            for j in self._cov_index[p_i]:
                effects[self.parameter_names[j]] = float(theta[j])
        Om = self.covariance_matrix(theta)
        sd = np.sqrt(np.diag(Om))
        out: dict[str, Any] = {
            "log_mean": log_mean,
            "natural_mean": natural,
            "covariate_effects": effects,
            "omega_sd": {p: float(v) for p, v in zip(self.random_effects, sd)},
            "fixed_std": dict(self.fixed_std),
        }
        if self.residual is not None:
            out["residual_sd"] = {n: float(np.exp(v)) for n, v in zip(self.residual.names, theta[self.n_cov_end:])}
            out["residual_kind"] = self.residual.kind
        if self.covariance == "full":
            out["correlation"] = {
                "names": list(self.random_effects),
                "matrix": (Om / np.outer(sd, sd)).tolist(),
            }
        return out

    # ----------------------------------------------------------- serialising
    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable config, including the prior spec (so that the theta layout and bounds are reproducible)."""
        d = self._options()
        d["prior"] = self.prior.spec()
        d["parameter_names"] = list(self.parameter_names)
        return d

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], prior: NormalPrior | None = None) -> "PopulationModel":
        """Build from a config dict (as written by :meth:`to_dict` or by hand); ``prior`` overrides a stored one."""
        cfg = dict(config)
        spec = cfg.pop("prior", None)
        cfg.pop("parameter_names", None)
        if prior is None:
            if spec is None:
                raise ValueError("population model config has no prior; pass the estimator's prior")
            prior = NormalPrior.from_spec(spec)
        allowed = {
            "random_effects", "covariance", "covariates", "group_specific", "groups", "group_column", "fixed_std",
            "bound_sd", "residual", "fixed_covariate_effects",
        }
        unknown = sorted(set(cfg) - allowed)
        if unknown:
            raise ValueError(f"unknown population model options {unknown}; allowed are {sorted(allowed)}")
        if isinstance(cfg.get("residual"), Mapping):
            cfg["residual"] = ResidualError.from_dict(cfg["residual"])
        model = cls(prior, **cfg)
        if config.get("parameter_names") is not None and list(config["parameter_names"]) != list(model.parameter_names):
            raise ValueError("stored parameter_names do not match the layout this config produces")
        return model

    @classmethod
    def load(cls, path: str | Path, prior: NormalPrior) -> "PopulationModel":
        """Read a population-model file (TOML/JSON, the schema of :class:`~amortized_nlme.config.PopulationConfig`)
        whose group levels, if any, are listed in the file; covariates refer to covariate column names."""
        from amortized_nlme.config import load_population
        from amortized_nlme.population.covariates import population_from_config

        return population_from_config(load_population(path), prior, group_levels=None, where=str(path))

    def save(self, path: str | Path) -> None:
        """Write :meth:`to_dict` as JSON."""
        write_json_atomic(path, self.to_dict())


def whiten_inverse(L: np.ndarray) -> np.ndarray:
    """Inverse of a lower-triangular Cholesky factor (used to whiten residuals)."""
    return solve_triangular(L, np.eye(L.shape[0]), lower=True)
