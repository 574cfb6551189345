"""How posterior draws become importance weights in the population objective — exact first.

* **exact** (default for every model with a likelihood): draws phi_ij from a proposal g_i (the trained estimator
  q(phi | y_i), refined where it misses, see :mod:`amortized_nlme.inference.proposal`) weighted by
  p(y_i | phi_ij) / g_i(phi_ij). The objective is then an importance-sampling estimate of -log p(D | theta) itself:
  an imperfect estimator costs Monte-Carlo variance, never bias. Residual-error sds without random effect are
  population parameters entering through per-draw residual statistics (:mod:`amortized_nlme.population.residual`);
  when the estimator's parameters include them, they become auxiliary coordinates integrated out exactly with a
  normalised conditional r_i(s | psi) (:class:`AuxiliaryConditional`):
      E_g[ p(y | psi, sigma) N(psi; theta) r(s | psi) / g(psi, s) ] = p(y | theta, sigma)   for any normalised r.
* **amortized** (on request, and for models without a likelihood such as SDEs): weights 1 / p(phi), the seed
  paper's objective, exact only when the estimator is the exact posterior.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from amortized_nlme.config import PopulationConfig
from amortized_nlme.errors import ConfigError
from amortized_nlme.model import Design, IndividualModel, NormalPrior, ResidualError, take_design
from amortized_nlme.population.objective import DrawSet
from amortized_nlme.population.residual import ErrorStatistics, error_statistics

logger = logging.getLogger(__name__)

LIKELIHOODS = ("exact", "amortized")
#: model evaluations (draws x observation points) per batch when predictions are computed
PREDICTION_BATCH = 4_000_000
#: pointwise residual statistics (combined error, censoring) keep draws x points float32 predictions: refuse above
MAX_POINTWISE_VALUES = 400_000_000


def resolve_likelihood(requested: str, model: IndividualModel) -> str:
    """``--likelihood`` resolved: "auto" is exact for every model with a likelihood, amortized otherwise (the
    result says which, and why)."""
    if requested not in ("auto", *LIKELIHOODS):
        raise ConfigError(f"--likelihood must be auto, exact or amortized, not {requested!r}")
    if requested == "exact" and not model.has_likelihood:
        raise ConfigError(f"{model.name} has no tractable individual likelihood (e.g. an SDE): use --likelihood "
                          "amortized")
    if requested == "auto":
        return "exact" if model.has_likelihood else "amortized"
    return requested


@dataclass(frozen=True)
class WeightPlan:
    """Which estimator coordinates the population model's Gaussian part covers (``psi``), which are auxiliary
    (residual sds in the estimator's parameters that the population estimates as population parameters) and the
    population-level residual-error model, for one likelihood."""

    likelihood: str
    psi_names: tuple[str, ...]
    psi_index: np.ndarray
    aux_index: np.ndarray
    residual: ResidualError | None
    aux_names: tuple[str, ...] = ()
    data_prior: NormalPrior | None = None

    def prior(self, model: IndividualModel) -> NormalPrior:
        """The training prior of the psi coordinates in the data's units (bounds and starts of the population
        model)."""
        return (self.data_prior or model.prior).subset(self.psi_names)

    def summary(self) -> dict:
        return {"likelihood": self.likelihood, "individual_parameters": list(self.psi_names),
                "auxiliary_parameters": list(self.aux_names),
                "residual_error": None if self.residual is None else self.residual.to_dict()}


def plan_weights(likelihood: str, model: IndividualModel, config: PopulationConfig, observations: np.ndarray,
                 design: Design) -> WeightPlan:
    """Decide the weights' layout: with exact weights, residual sds without random effect are population
    parameters (all of a model's residual sds together: if any has a random effect, all stay individual)."""
    names = tuple(model.param_names)
    if likelihood == "amortized":
        if config.residual_error is not None:
            raise ConfigError("residual_error is a population parameter of the exact likelihood; the amortized "
                              "objective estimates residual sds as individual parameters (drop residual_error or "
                              "use --likelihood exact)")
        return WeightPlan("amortized", names, np.arange(len(names)), np.zeros(0, np.int64), None,
                          data_prior=model.data_prior(observations, design))
    random = set(names) if config.random_effects == "all" else set(config.random_effects)
    err = tuple(model.error_params)
    if err and any(p in random for p in err):
        if config.residual_error is not None:
            raise ConfigError(f"residual_error = {config.residual_error!r} but {[p for p in err if p in random]} "
                              "have random effects: remove them from random_effects to estimate the residual error "
                              "as a population parameter")
        return WeightPlan("exact", names, np.arange(len(names)), np.zeros(0, np.int64), None,
                          data_prior=model.data_prior(observations, design))
    kind = config.residual_error or model.error_kind or (model.residual_kinds()[0] if model.residual_kinds()
                                                          else None)
    if kind is None:
        return WeightPlan("exact", names, np.arange(len(names)), np.zeros(0, np.int64), None,
                          data_prior=model.data_prior(observations, design))
    try:
        residual = model.residual_error(kind, observations, design)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    psi = tuple(p for p in names if p not in err)
    return WeightPlan("exact", psi, np.array([names.index(p) for p in psi], np.int64),
                      np.array([names.index(p) for p in err], np.int64), residual, err,
                      data_prior=model.data_prior(observations, design))


class AuxiliaryConditional:
    """r_i(s | psi): a Gaussian conditional of the auxiliary coordinates s given psi for every individual, from a
    Gaussian fit to pilot draws of q (close to q's own conditional, so r / q stays well behaved). Fitted once and
    kept, so every batch of draws of an individual uses the same r."""

    def __init__(self, pilot: np.ndarray, psi_index: np.ndarray, aux_index: np.ndarray) -> None:
        pilot = np.asarray(pilot, dtype=np.float64)
        self.psi_index, self.aux_index = np.asarray(psi_index), np.asarray(aux_index)
        x, s = pilot[..., self.psi_index], pilot[..., self.aux_index]
        mx, ms = x.mean(axis=1), s.mean(axis=1)
        xc, sc = x - mx[:, None], s - ms[:, None]
        m = pilot.shape[1]
        Cxx = np.einsum("nmk,nml->nkl", xc, xc) / (m - 1) + 1e-10 * np.eye(x.shape[2])
        Csx = np.einsum("nma,nmk->nak", sc, xc) / (m - 1)
        Css = np.einsum("nma,nmb->nab", sc, sc) / (m - 1)
        B = np.linalg.solve(Cxx, np.swapaxes(Csx, 1, 2)).swapaxes(1, 2)  # [n, a, kx] = Csx Cxx^-1
        cond = Css - np.einsum("nak,nbk->nab", B, Csx) + 1e-12 * np.eye(s.shape[2])
        self.B, self.mx, self.ms = B, mx, ms
        self.chol = np.linalg.cholesky(cond)
        self.log_det = np.sum(np.log(np.diagonal(self.chol, axis1=1, axis2=2)), axis=1)

    def _mean(self, psi: np.ndarray, rows: np.ndarray | slice) -> np.ndarray:
        return self.ms[rows][:, None, :] + np.einsum("nak,nmk->nma", self.B[rows], psi - self.mx[rows][:, None, :])

    def log_prob(self, phi: np.ndarray, rows: np.ndarray | slice = slice(None)) -> np.ndarray:
        """log r(s | psi) of full draws ``phi [n, M, k]`` of individuals ``rows``."""
        psi, s = phi[..., self.psi_index], phi[..., self.aux_index]
        r = s - self._mean(psi, rows)
        L = self.chol[rows]
        z = np.linalg.solve(L[:, None], r[..., None])[..., 0]
        a = s.shape[-1]
        return -0.5 * np.sum(z * z, axis=-1) - self.log_det[rows][:, None] - 0.5 * a * np.log(2 * np.pi)

    def sample(self, psi: np.ndarray, rows: np.ndarray | slice, rng: np.random.Generator) -> np.ndarray:
        """s ~ r(s | psi) for psi draws ``[n, M, kx]`` of individuals ``rows``."""
        mean = self._mean(psi, rows)
        eps = rng.standard_normal(mean.shape)
        return mean + np.einsum("nab,nmb->nma", self.chol[rows], eps)

    def complete(self, psi: np.ndarray, rows: np.ndarray | slice, rng: np.random.Generator, k: int) -> np.ndarray:
        """Full parameter vectors ``[n, M, k]`` from psi draws, the auxiliary coordinates drawn from r."""
        out = np.empty((*psi.shape[:2], k))
        out[..., self.psi_index] = psi
        out[..., self.aux_index] = self.sample(psi, rows, rng)
        return out


def individual_loglik(model: IndividualModel, phi: np.ndarray, observations: np.ndarray, design: Design
                      ) -> np.ndarray:
    """log p(y_i | phi_ij) for draws ``phi [n, M, k]`` -> ``[n, M]`` (the model's own likelihood, its residual sds
    among the parameters), batched over individuals; non-finite values (overflow far in the tails) become -inf."""
    n, M, k = phi.shape
    per = max(1, PREDICTION_BATCH // max(1, M * observations.shape[1] * observations.shape[2]))
    out = np.empty((n, M))
    for start in range(0, n, per):
        stop = min(start + per, n)
        rows = np.repeat(np.arange(start, stop), M)
        ll = model.log_likelihood(phi[start:stop].reshape(-1, k), observations[rows], take_design(design, rows))
        out[start:stop] = np.asarray(ll, dtype=np.float64).reshape(stop - start, M)
    return np.where(np.isfinite(out), out, -np.inf)


def residual_statistics(model: IndividualModel, phi: np.ndarray, observations: np.ndarray, design: Design,
                        kind: str, rows: np.ndarray | None = None) -> tuple[ErrorStatistics, np.ndarray]:
    """Residual statistics of full draws ``phi [n, M, k]`` (of individuals ``rows`` of the data; default all) for a
    population-level residual error of ``kind``; also a ``[n, M]`` mask of draws whose prediction failed
    (non-finite: those draws get weight 0)."""
    rows = np.arange(observations.shape[0]) if rows is None else np.asarray(rows)
    obs, des = observations[rows], take_design(design, rows)
    y, observed, censored = model.observation_points(obs, des)
    n, M, k = phi.shape
    P = y.shape[1]
    pointwise = kind == "combined" or bool(censored.any())
    if pointwise and n * M * P > MAX_POINTWISE_VALUES:
        raise ConfigError(f"the {kind} residual error{' with censored observations' if censored.any() else ''} "
                          f"keeps every draw's predictions: {n} individuals x {M} draws x {P} points is too many; "
                          "use fewer --draws or an additive/proportional error")
    per = max(1, PREDICTION_BATCH // max(1, M * P))
    parts, failed = [], np.zeros((n, M), dtype=bool)
    for a in range(0, n, per):
        b = min(a + per, n)
        idx = np.repeat(np.arange(a, b), M)
        f = np.asarray(model.predict(phi[a:b].reshape(-1, k), take_design(des, idx)), dtype=np.float64)
        f = f.reshape(b - a, M, -1)
        bad = ~np.all(np.isfinite(f) | ~observed[a:b, None, :], axis=2)
        failed[a:b] = bad
        f = np.where(np.isfinite(f), f, 0.0)
        parts.append(error_statistics(kind, f, y[a:b], observed[a:b], censored[a:b], force_pointwise=pointwise))
    return _stack_individuals(parts), failed


def _stack_individuals(parts: list[ErrorStatistics]) -> ErrorStatistics:
    first = parts[0]
    if len(parts) == 1:
        return first
    if first.mode == "sufficient":
        return ErrorStatistics(first.kind, "sufficient", n_obs=np.concatenate([p.n_obs for p in parts]),
                               ssr=np.concatenate([p.ssr for p in parts]),
                               sum_log_f=np.concatenate([p.sum_log_f for p in parts]))
    return ErrorStatistics(first.kind, "pointwise", y=np.concatenate([p.y for p in parts]),
                           observed=np.concatenate([p.observed for p in parts]),
                           censored=np.concatenate([p.censored for p in parts]),
                           f=np.concatenate([p.f for p in parts]))


def exact_drawset(plan: WeightPlan, model: IndividualModel, phi: np.ndarray, log_g: np.ndarray,
                  observations: np.ndarray, design: Design, ids, aux: AuxiliaryConditional | None = None,
                  rows: np.ndarray | None = None) -> DrawSet:
    """Draws ``phi [n, M, k]`` from proposals with log densities ``log_g [n, M]`` as a draw set with exact weights
    (individuals ``rows`` of the data; default all)."""
    phi = np.asarray(phi, dtype=np.float64)
    rows_ = np.arange(observations.shape[0]) if rows is None else np.asarray(rows)
    if plan.residual is None:
        ll = individual_loglik(model, phi, observations[rows_], take_design(design, rows_))
        denominator = np.asarray(log_g, dtype=np.float64) - ll
        errors = None
    else:
        denominator = np.asarray(log_g, dtype=np.float64).copy()
        if plan.aux_index.size:
            if aux is None:
                raise ValueError("auxiliary coordinates need their conditional r(s | psi)")
            denominator -= aux.log_prob(phi, rows_)
        errors, failed = residual_statistics(model, phi, observations, design, plan.residual.kind, rows_)
        denominator[failed] = np.inf
    denominator = np.where(np.isfinite(denominator) | (denominator == np.inf), denominator, np.inf)
    return DrawSet(phi[..., plan.psi_index], plan.prior(model), ids, log_prior=denominator, kind="likelihood",
                   errors=errors)


def amortized_drawset(model: IndividualModel, phi: np.ndarray, ids, observations: np.ndarray | None = None,
                      design: Design | None = None) -> DrawSet:
    """Draws with the amortized weights 1 / p(phi) (the training prior; for models whose estimator works on
    normalised parameters, the prior at the normalised draws, an approximation the result states)."""
    phi = np.asarray(phi, dtype=np.float64)
    shift = None if observations is None else model.parameter_shift(observations, design)
    prior = model.prior if observations is None else model.data_prior(observations, design)
    log_prior = None if shift is None else model.prior.log_prob(phi + shift[:, None, :])
    return DrawSet(phi, prior, ids=list(ids), log_prior=log_prior)
