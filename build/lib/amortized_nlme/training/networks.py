"""Building the estimator: a BayesFlow 2 approximator (summary network over the model's encoded data + coupling
flow) from a workflow's ``[network]`` table. The parameters are standardized by the prior inside the approximator's
adapter and the observations go through the model's own encoder, so training and inference use the same transforms.
"""

from __future__ import annotations

from amortized_nlme.config import NetworkConfig
from amortized_nlme.errors import EstimatorError
from amortized_nlme.model import IndividualModel, NormalPrior
from amortized_nlme.posterior.estimator import PARAM_KEY, SUMMARY_KEY


def _bf():
    import bayesflow as bf

    return bf


def make_adapter(prior: NormalPrior):
    """Adapter: float32, parameters standardized by the prior (fixed, exact, invertible), encoded series as
    summary variables. Its log-Jacobian makes ``log_prob`` a density of the unstandardized log-parameters."""
    bf = _bf()
    return (
        bf.Adapter()
        .convert_dtype("float64", "float32")
        .standardize(PARAM_KEY, mean=prior.mean.tolist(), std=prior.std.tolist())
        .rename(PARAM_KEY, "inference_variables")
        .rename(SUMMARY_KEY, "summary_variables")
        .keep(["inference_variables", "summary_variables"])
    )


def build_summary_network(cfg: NetworkConfig):
    """The summary network named by ``cfg.summary``."""
    bf = _bf()
    if cfg.summary == "time_series":
        return bf.networks.TimeSeriesNetwork(
            summary_dim=cfg.summary_dim, filters=tuple(cfg.filters), kernel_sizes=tuple(cfg.kernel_sizes),
            strides=tuple(cfg.strides), recurrent_type=cfg.recurrent_type, recurrent_dim=cfg.recurrent_dim,
            bidirectional=cfg.bidirectional, skip_steps=cfg.skip_steps, dropout=cfg.dropout)
    if cfg.summary == "lstm":
        return bf.networks.RecurrentNetwork(
            summary_dim=cfg.summary_dim, hidden_dim=(cfg.recurrent_dim,), recurrent_type="lstm",
            bidirectional=cfg.bidirectional, dropout=cfg.dropout)
    if cfg.summary == "transformer":
        return bf.networks.TimeSeriesTransformer(
            summary_dim=cfg.summary_dim, embed_dims=(cfg.transformer_dim,) * cfg.transformer_layers,
            num_heads=(cfg.transformer_heads,) * cfg.transformer_layers,
            mlp_depths=(2,) * cfg.transformer_layers, mlp_widths=(cfg.transformer_dim * 2,) * cfg.transformer_layers,
            dropout=cfg.dropout)
    raise EstimatorError(f"unknown summary network {cfg.summary!r}: use 'time_series', 'lstm' or 'transformer'")


def build_approximator(model: IndividualModel, cfg: NetworkConfig):
    """A BayesFlow ``BasicEstimator``: summary network + coupling flow, no running-moment standardization."""
    bf = _bf()
    flow = bf.networks.CouplingFlow(depth=cfg.flow_depth, transform=cfg.flow_transform,
                                    subnet_kwargs={"widths": tuple(cfg.flow_widths),
                                                                   "dropout": cfg.flow_dropout})
    return bf.estimators.BasicEstimator(inference_network=flow, summary_network=build_summary_network(cfg),
                                        adapter=make_adapter(model.prior), standardize=None)
