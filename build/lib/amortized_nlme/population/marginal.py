"""Absolute marginal likelihoods by importance sampling, and information criteria (-2LL, AIC, BIC, BICc) that are
comparable with NONMEM, Monolix, saemix and nlme.

The amortized objective J(theta) drops sum_i log p(y_i) (the evidence under the training prior), so it ranks population
models fitted to the same data but has no absolute meaning. Here, for one population model and one theta,

    p(y_i | theta) = E_g[ p(y_i | phi) p(phi | theta) / g_i(phi) ],   phi ~ g_i,

with the defensive mixture proposal

    g_i = w_q q(phi | y_i) + w_p N(phi; mu_i(theta), Sigma(theta)) + w_t t_4(phi; m_i, C_i)

* q: the trained estimator's posterior (the natural proposal: it already covers the individual's likelihood);
* N(mu_i, Sigma): the population density itself, which bounds the weights by p(y_i | phi) / w_p (Hesterberg's defensive
  importance sampling: no infinite-variance weights wherever q has lighter tails than the target);
* t_4(m_i, C_i): a heavy-tailed Gaussian approximation of the target p(phi | y_i, theta): the natural parameters of a
  Gaussian fitted to separate pilot draws of q, minus those of the training prior (the individual "likelihood" part),
  plus those of the population density. It matters for parameters without random effect, whose population density is
  much narrower than q.

Draws are allocated to the components in exact proportion to the weights (stratified), so the estimator is unbiased for
p(y_i | theta); the pilot draws are independent of the importance draws. The Monte-Carlo standard error of
log p(y | theta) = sum_i log p(y_i | theta) is the delta-method one, sqrt(sum_i Var(w_i) / (M mean(w_i)^2)).

Parameters without random effect: the population model gives them a Gaussian kernel N(beta_p, h_p^2) of fixed width
``fixed_std`` (see :mod:`amortized_nlme.population`); the marginal likelihood here is that of exactly this model, the
same one the objective fits, i.e. of the point-mass model smoothed by a kernel of width h_p. h_p is not estimated and is
not counted as a parameter.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from scipy.special import gammaln, logsumexp

from amortized_nlme.model import Design, IndividualModel, take_design
from amortized_nlme.population.model import PopulationModel, whiten_inverse

logger = logging.getLogger(__name__)

_LOG_2PI = math.log(2.0 * math.pi)
#: degrees of freedom of the multivariate-t component
T_DF = 4.0
#: upper bound on n_individuals x draws x time points per batched likelihood call (memory)
_LL_BATCH = 4_000_000


class PosteriorEstimator(Protocol):
    """What the importance sampler needs from an estimator (``TrainedEstimator`` or an exact stand-in in tests)."""

    def sample(self, observations: np.ndarray, design: Design, n_draws: int, *, seed: int | None = None
               ) -> np.ndarray: ...

    def log_prob(self, phi: np.ndarray, observations: np.ndarray, design: Design) -> np.ndarray: ...


# ------------------------------------------------------------------------------------------- parameter counting


@dataclass(frozen=True)
class ParameterCount:
    """Which population parameters BICc penalises with log(N) (``random``) and which with log(N_tot) (``fixed``)."""

    random: tuple[str, ...]
    fixed: tuple[str, ...]

    @property
    def total(self) -> int:
        return len(self.random) + len(self.fixed)


def count_parameters(population: PopulationModel) -> ParameterCount:
    """Split theta as Delattre, Lavielle and Poursat (2014) do for BICc.

    log(N) (rate sqrt(N), estimated from between-individual variation): the mean ``beta_p`` (every group level) and
    every covariate coefficient ``B_p_c`` of a parameter p that HAS a random effect, and all Omega parameters
    (``log_omega_p``, ``log_L_p``, ``L_p_q``). log(N_tot) (rate sqrt(N_tot)): the mean and covariate coefficients of a
    parameter WITHOUT random effect -- this includes residual-error parameters, which are individual parameters without
    random effect here. Kernel widths ``fixed_std`` are not estimated and not counted. This is the split saemix uses
    (``nbeta.random`` / ``nbeta.fixed``) and Monolix documents.
    """
    random_p = set(population.random_effects)
    residual = set(population.residual.theta_names) if population.residual is not None else set()
    rnd: list[str] = []
    fix: list[str] = []
    for name in population.parameter_names:
        if name in residual:  # residual-error sds: estimated from all observations
            fix.append(name)
            continue
        if name.startswith("beta_"):
            p = name[len("beta_"):].split("[", 1)[0]
        elif name.startswith("B_"):
            p = _covariate_parameter(population, name)
        else:  # log_omega_*, log_L_*, L_*_*: random-effect (co)variances
            rnd.append(name)
            continue
        (rnd if p in random_p else fix).append(name)
    return ParameterCount(tuple(rnd), tuple(fix))


def _covariate_parameter(population: PopulationModel, name: str) -> str:
    """Individual parameter a ``B_<p>_<cov>`` entry belongs to (names may contain underscores)."""
    for p, covs in population.covariates.items():
        if any(name == f"B_{p}_{c}" for c in covs):
            return p
    raise ValueError(f"cannot attribute {name!r} to an individual parameter")


def information_criteria(loglik: float, population: PopulationModel, n_individuals: int, n_observations: int
                         ) -> dict[str, Any]:
    """-2LL, AIC = -2LL + 2P, BIC = -2LL + P log N (N individuals, as Monolix and saemix) and
    BICc = -2LL + P_R log N + P_F log N_tot (Delattre et al. 2014; split by :func:`count_parameters`)."""
    cnt = count_parameters(population)
    m2ll = -2.0 * float(loglik)
    P = cnt.total
    return {
        "minus2ll": m2ll,
        "aic": m2ll + 2.0 * P,
        "bic": m2ll + P * math.log(n_individuals),
        "bicc": m2ll + len(cnt.random) * math.log(n_individuals) + len(cnt.fixed) * math.log(n_observations),
        "n_theta": P,
        "n_random": len(cnt.random),
        "n_fixed": len(cnt.fixed),
        "n_individuals": int(n_individuals),
        "n_observations": int(n_observations),
        "random_parameters": list(cnt.random),
        "fixed_parameters": list(cnt.fixed),
    }


def penalty_bicc(population: PopulationModel, n_individuals: int, n_observations: int) -> float:
    """The BICc penalty alone (added to 2 J for ranking models on the amortized objective)."""
    cnt = count_parameters(population)
    return len(cnt.random) * math.log(n_individuals) + len(cnt.fixed) * math.log(n_observations)


def count_observations(observations: np.ndarray, design: Design) -> int:
    """N_tot: observed values (``mask [n, T]`` times the ``d`` observation types, or a ``[n, T, d]`` mask)."""
    mask = np.asarray(design["mask"], dtype=bool)
    if mask.ndim == 3:
        return int(mask.sum())
    return int(mask.sum()) * int(observations.shape[2])


# ---------------------------------------------------------------------------------------- importance sampling


@dataclass
class MarginalLikelihood:
    """log p(y | theta) by importance sampling, with its Monte-Carlo error and per-individual effective sample sizes.

    ``jensen_bias``: the expected downward bias of the log of a mean, 0.5 sum_i Var_i (reported, not subtracted).
    """

    loglik: float
    se: float
    per_individual: np.ndarray
    var_per_individual: np.ndarray
    ess: np.ndarray
    n_draws: int
    mixture: dict[str, float]
    jensen_bias: float
    criteria: dict[str, Any] = field(default_factory=dict)

    @property
    def minus2ll(self) -> float:
        return -2.0 * self.loglik

    @property
    def minus2ll_se(self) -> float:
        return 2.0 * self.se

    def summary(self) -> dict[str, Any]:
        """Plain numbers for reports."""
        out = {
            "loglik": self.loglik,
            "loglik_se": self.se,
            "minus2ll": self.minus2ll,
            "minus2ll_se": self.minus2ll_se,
            "jensen_bias": self.jensen_bias,
            "ess_min": float(self.ess.min()),
            "ess_median": float(np.median(self.ess)),
            "n_draws": self.n_draws,
            "mixture": dict(self.mixture),
        }
        out.update({k: v for k, v in self.criteria.items() if k != "minus2ll"})
        return out


def individual_loglik(model: IndividualModel, phi: np.ndarray, observations: np.ndarray, design: Design
                      ) -> np.ndarray:
    """log p(y_i | phi_ij) for draws ``phi [n, M, k]`` -> ``[n, M]``, batched over individuals to bound memory;
    non-finite values (numerical overflow far in the tails) become -inf, i.e. weight 0."""
    n, M, k = phi.shape
    T = max(1, observations.shape[1] * observations.shape[2])
    per = max(1, _LL_BATCH // max(1, M * T))
    out = np.empty((n, M))
    for start in range(0, n, per):
        stop = min(start + per, n)
        rows = np.repeat(np.arange(start, stop), M)
        ll = model.log_likelihood(phi[start:stop].reshape(-1, k), observations[rows], take_design(design, rows))
        out[start:stop] = np.asarray(ll, dtype=np.float64).reshape(stop - start, M)
    return np.where(np.isfinite(out), out, -np.inf)


def _log_t(x: np.ndarray, mean: np.ndarray, chol: np.ndarray, df: float) -> np.ndarray:
    """Multivariate-t log density of ``x [n, M, k]`` with location ``mean [n, k]``, scale ``chol chol^T [n, k, k]``."""
    k = x.shape[-1]
    r = x - mean[:, None, :]
    z = np.einsum("nkl,nml->nmk", np.linalg.inv(chol), r)
    delta = np.sum(z * z, axis=-1)
    logdet = np.sum(np.log(np.diagonal(chol, axis1=1, axis2=2)), axis=1)[:, None]
    return (gammaln(0.5 * (df + k)) - gammaln(0.5 * df) - 0.5 * k * math.log(df * math.pi) - logdet
            - 0.5 * (df + k) * np.log1p(delta / df))


class ImportanceSampler:
    """log p(y | theta) for any population model and theta on one data set.

    The posterior part of the proposal (draws from q, their log q and their log-likelihood) is drawn and evaluated once
    and reused for every population model and theta; the population and t components are drawn per evaluation.
    ``pilot_draws`` (``[n, M', k]``, e.g. the draws the population model was fitted on) give the Gaussian summary of q
    used by the t component; they must be independent of the importance draws (default: a separate draw from q).
    """

    def __init__(
        self,
        model: IndividualModel,
        estimator: PosteriorEstimator,
        observations: np.ndarray,
        design: Design,
        n_draws: int = 2000,
        defensive: float = 0.1,
        t_weight: float = 0.3,
        pilot_draws: np.ndarray | None = None,
        seed: int = 0,
    ) -> None:
        if not (0.0 < defensive < 1.0) or not (0.0 <= t_weight < 1.0) or defensive + t_weight >= 1.0:
            raise ValueError("need 0 < defensive < 1, 0 <= t_weight < 1 and defensive + t_weight < 1")
        self.model = model
        self.estimator = estimator
        self.observations = np.asarray(observations, dtype=np.float64)
        self.design = design
        self.prior = model.prior
        self.n = self.observations.shape[0]
        self.k = self.prior.dim
        self.n_observations = count_observations(self.observations, design)
        self.seed = int(seed)
        self.M_p = max(1, int(round(defensive * n_draws)))
        self.M_t = int(round(t_weight * n_draws))
        self.M_q = n_draws - self.M_p - self.M_t
        if self.M_q < 1:
            raise ValueError("too few importance draws for the posterior component")
        self.M = n_draws
        # realised (stratified) proportions: the mixture density uses exactly these, so the estimate is unbiased
        self.log_w = np.log(np.array([self.M_q, self.M_p, self.M_t], dtype=np.float64) / n_draws,
                            where=np.array([True, True, self.M_t > 0]),
                            out=np.full(3, -np.inf))
        # seeds far from those of the caller's fitting draws (TrainedEstimator.sample uses seed + batch index)
        self.phi_q = np.asarray(estimator.sample(self.observations, design, self.M_q, seed=self.seed + 100_003),
                                np.float64)
        self.logq_q = self._log_q(self.phi_q)
        self.ll_q = individual_loglik(model, self.phi_q, self.observations, design)
        if self.M_t:
            if pilot_draws is None:
                pilot_draws = estimator.sample(self.observations, design, max(200, min(1000, n_draws // 2)),
                                               seed=self.seed + 200_003)
            self._set_pilot(np.asarray(pilot_draws, dtype=np.float64))
        self.n_evaluations = 0
        logger.debug("importance sampler: %d individuals, %d draws (%d q, %d population, %d t)", self.n, self.M,
                     self.M_q, self.M_p, self.M_t)

    def _log_q(self, phi: np.ndarray) -> np.ndarray:
        lq = np.asarray(self.estimator.log_prob(phi, self.observations, self.design), dtype=np.float64)
        return np.where(np.isfinite(lq), lq, -np.inf)

    def _set_pilot(self, pilot: np.ndarray) -> None:
        """Natural parameters of the individual "likelihood" part: Gaussian fit of q minus the training prior."""
        if pilot.shape[0] != self.n or pilot.shape[2] != self.k:
            raise ValueError(f"pilot draws must have shape [{self.n}, M, {self.k}], got {pilot.shape}")
        m = pilot.mean(axis=1)
        r = pilot - m[:, None, :]
        S = np.einsum("nmk,nml->nkl", r, r) / max(1, pilot.shape[1] - 1)
        S += 1e-10 * np.eye(self.k)
        P_q = np.linalg.inv(S)
        lam = P_q - np.diag(1.0 / self.prior.variance)
        eta = np.einsum("nkl,nl->nk", P_q, m) - self.prior.mean / self.prior.variance
        # clip directions where q is wider than the prior (flow error): the likelihood is taken as flat there
        vals, vecs = np.linalg.eigh(0.5 * (lam + np.swapaxes(lam, 1, 2)))
        keep = (vals > 0).astype(np.float64)
        self._lam = np.einsum("nkj,nj,nlj->nkl", vecs, np.maximum(vals, 0.0), vecs)
        self._eta = np.einsum("nkj,nj,nlj,nl->nk", vecs, keep, vecs, eta)

    def _t_component(self, mu: np.ndarray, L: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Location ``[n, k]`` and scale Cholesky ``[n, k, k]`` of the t approximation of p(phi | y_i, theta)."""
        A = whiten_inverse(L)
        P_pop = A.T @ A
        P = self._lam + P_pop
        C = np.linalg.inv(P)
        C = 0.5 * (C + np.swapaxes(C, 1, 2))
        loc = np.einsum("nkl,nl->nk", C, self._eta + mu @ P_pop.T)
        return loc, np.linalg.cholesky(C)

    def evaluate(
        self,
        population: PopulationModel,
        theta: np.ndarray,
        covariates: Mapping[str, np.ndarray] | None = None,
        groups: np.ndarray | Sequence[Any] | None = None,
        seed: int | None = None,
    ) -> MarginalLikelihood:
        """Estimate log p(y | theta) under ``population`` (Gaussian kernel ``fixed_std`` for parameters without random
        effect, as in the objective), with BICc and friends in ``criteria``."""
        if tuple(population.param_names_individual) != tuple(self.prior.names):
            raise ValueError("population model and individual model have different parameters")
        theta = np.asarray(theta, dtype=np.float64)
        rng = np.random.default_rng([self.seed, 104729, self.n_evaluations if seed is None else int(seed)])
        self.n_evaluations += 1
        mu = population.design(self.n, covariates, groups).mean(theta)
        L = population.cholesky(theta)
        A = whiten_inverse(L)
        log_det = float(np.sum(np.log(np.diag(L))))

        def log_pop(phi: np.ndarray) -> np.ndarray:
            z = (phi - mu[:, None, :]) @ A.T
            return -0.5 * np.sum(z * z, axis=-1) - log_det - 0.5 * self.k * _LOG_2PI

        extra = [mu[:, None, :] + rng.standard_normal((self.n, self.M_p, self.k)) @ L.T]
        if self.M_t:
            loc, chol = self._t_component(mu, L)
            z = rng.standard_normal((self.n, self.M_t, self.k))
            u = rng.chisquare(T_DF, size=(self.n, self.M_t, 1))
            extra.append(loc[:, None, :] + np.einsum("nkl,nml->nmk", chol, z) / np.sqrt(u / T_DF))
        phi_x = np.concatenate(extra, axis=1)
        logq_x = self._log_q(phi_x)
        ll_x = individual_loglik(self.model, phi_x, self.observations, self.design)
        phi = np.concatenate([self.phi_q, phi_x], axis=1)
        logq = np.concatenate([self.logq_q, logq_x], axis=1)
        ll = np.concatenate([self.ll_q, ll_x], axis=1)
        lp = log_pop(phi)
        comps = [self.log_w[0] + logq, self.log_w[1] + lp]
        if self.M_t:
            comps.append(self.log_w[2] + _log_t(phi, loc, chol, T_DF))
        log_g = logsumexp(np.stack(comps), axis=0)
        logw = ll + lp - log_g
        logw = np.where(np.isfinite(logw), logw, -np.inf)
        mx = logw.max(axis=1, keepdims=True)
        if not np.all(np.isfinite(mx)):
            bad = np.flatnonzero(~np.isfinite(mx[:, 0]))
            raise FloatingPointError(f"no draw with a finite importance weight for individuals {bad[:10].tolist()}")
        w = np.exp(logw - mx)
        mean_w = w.mean(axis=1)
        ll_i = mx[:, 0] + np.log(mean_w)
        var_i = w.var(axis=1, ddof=1) / (self.M * mean_w**2)
        ess = w.sum(axis=1) ** 2 / np.sum(w * w, axis=1)
        total = float(ll_i.sum())
        res = MarginalLikelihood(
            loglik=total,
            se=float(np.sqrt(var_i.sum())),
            per_individual=ll_i,
            var_per_individual=var_i,
            ess=ess,
            n_draws=self.M,
            mixture={"posterior": self.M_q / self.M, "population": self.M_p / self.M, "t": self.M_t / self.M},
            jensen_bias=float(0.5 * var_i.sum()),
        )
        res.criteria = information_criteria(total, population, self.n, self.n_observations)
        low = ess < max(5.0, 0.01 * self.M)
        if low.any():
            logger.warning("importance sampling: %d of %d individuals with ESS < %.0f (min %.1f)", int(low.sum()),
                           self.n, max(5.0, 0.01 * self.M), float(ess.min()))
        logger.info("log-likelihood %.3f (MC SE %.3f), -2LL %.2f, BICc %.2f, median ESS %.0f of %d", total, res.se,
                    res.minus2ll, res.criteria["bicc"], float(np.median(ess)), self.M)
        return res


def marginal_log_likelihood(
    model: IndividualModel,
    estimator: PosteriorEstimator,
    observations: np.ndarray,
    design: Design,
    population: PopulationModel,
    theta: np.ndarray,
    covariates: Mapping[str, np.ndarray] | None = None,
    groups: np.ndarray | Sequence[Any] | None = None,
    n_draws: int = 2000,
    defensive: float = 0.1,
    t_weight: float = 0.3,
    pilot_draws: np.ndarray | None = None,
    seed: int = 0,
) -> MarginalLikelihood:
    """One-shot :class:`ImportanceSampler` evaluation (build a sampler to evaluate several models on shared draws)."""
    sampler = ImportanceSampler(model, estimator, observations, design, n_draws=n_draws, defensive=defensive,
                                t_weight=t_weight, pilot_draws=pilot_draws, seed=seed)
    return sampler.evaluate(population, theta, covariates, groups)
