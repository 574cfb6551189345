"""How the posterior draws are weighted in the population objective: amortized weights 1/p(phi) (the seed paper's
objective, exact only when the estimator is the exact posterior) or exact weights p(y|phi)/q(phi|y) (the estimator as
an importance proposal for the model's own likelihood)."""

from __future__ import annotations

import logging
import time

import numpy as np

from amortized_nlme.errors import ConfigError
from amortized_nlme.model import Design, IndividualModel
from amortized_nlme.population.marginal import individual_loglik
from amortized_nlme.population.objective import DrawSet
from amortized_nlme.posterior import TrainedEstimator

logger = logging.getLogger(__name__)


#: "auto" tries exact likelihood weights when individuals x draws x time points stays below this
EXACT_AUTO_LIMIT = 20_000_000
#: ... and keeps them only when q is a good proposal: median effective sample size of p(y|phi) p(phi) / q(phi|y)
#: at least this fraction of the draws (and at least 20)
EXACT_MIN_ESS_FRACTION = 0.05


def has_likelihood(model: IndividualModel, observations: np.ndarray, design: Design) -> bool:
    """Whether the individual model has a tractable log p(y_i | phi) (SDE models do not)."""
    try:
        model.log_likelihood(model.prior.mean[None, :], observations[:1], {k: v[:1] for k, v in design.items()})
    except NotImplementedError:
        return False
    return True


def choose_likelihood(requested: str, model: IndividualModel, observations: np.ndarray, design: Design,
                      n_draws_total: int) -> str:
    """Resolve ``--likelihood`` before any weights are computed: "exact" is tried when the model has a likelihood
    and the data are not too large (the proposal-quality check follows in :func:`prepare_inference`)."""
    if requested not in ("auto", "amortized", "exact"):
        raise ConfigError(f"--likelihood must be auto, amortized or exact, not {requested!r}")
    tractable = has_likelihood(model, observations, design)
    if requested == "exact" and not tractable:
        raise ConfigError(f"{model.name} has no tractable individual likelihood: use --likelihood amortized")
    if requested == "auto":
        cost = n_draws_total * observations.shape[1]
        requested = "auto-exact" if tractable and cost <= EXACT_AUTO_LIMIT else "amortized"
    return requested


def proposal_ess(drawset: DrawSet, prior_log_prob: np.ndarray) -> np.ndarray:
    """Per-individual effective sample size of the draws as importance samples of the posterior under the training
    prior, weights p(y|phi) p(phi) / q(phi|y): near M when the estimator is accurate, near 1 when it is not."""
    logw = prior_log_prob - drawset.log_prior  # log p(phi) - (log q - log lik)
    logw = logw - logw.max(axis=1, keepdims=True)
    w = np.exp(logw)
    return w.sum(axis=1) ** 2 / np.sum(w * w, axis=1)


def likelihood_drawset(estimator: TrainedEstimator, model: IndividualModel, observations: np.ndarray,
                       design: Design, draws: np.ndarray, ids) -> DrawSet:
    """Draws weighted by p(y_i | phi) / q(phi | y_i): the objective becomes -log p(D | theta) itself (see
    :meth:`DrawSet.with_likelihood`); one pass of the flow's density and of the individual likelihood."""
    log_q = estimator.log_prob(draws, observations, design)
    log_lik = individual_loglik(model, draws, observations, design)
    return DrawSet.with_likelihood(draws, model.prior, log_q, log_lik, ids=list(ids))


def weighted_drawset(likelihood: str, estimator: TrainedEstimator, model: IndividualModel, observations: np.ndarray,
                     design: Design, draws: np.ndarray, ids, timings: dict[str, float] | None = None
                     ) -> tuple[DrawSet, str]:
    """The draws with the weights ``likelihood`` asks for (as resolved by :func:`choose_likelihood`): exact
    weights are kept under "auto-exact" only when the estimator is a good enough proposal (median ESS)."""
    amortized = DrawSet(np.asarray(draws, dtype=np.float64), model.prior, ids=list(ids))
    if likelihood not in ("exact", "auto-exact"):
        return amortized, "amortized"
    t0 = time.perf_counter()
    exact = likelihood_drawset(estimator, model, observations, design, amortized.draws, ids)
    if timings is not None:
        timings["likelihood_weights_s"] = time.perf_counter() - t0
    ess = proposal_ess(exact, amortized.log_prior)
    need = max(20.0, EXACT_MIN_ESS_FRACTION * exact.M)
    logger.info("estimator as importance proposal: median ESS %.0f of %d draws", float(np.median(ess)), exact.M)
    if likelihood == "auto-exact" and np.median(ess) < need:
        logger.info("median ESS below %.0f: the estimator is not a good enough proposal for exact weights here; "
                    "using the amortized objective", need)
        return amortized, "amortized"
    if np.median(ess) < need:
        logger.warning("exact weights with a median ESS of %.0f: expect a large Monte-Carlo error",
                       float(np.median(ess)))
    return exact, "exact"
