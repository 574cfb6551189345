"""The trained estimator as inference uses it: loading (integrity-checked), posterior draws and densities for batches
of individuals, and the cache of posterior draws.

Public API: :func:`load_estimator`, :class:`TrainedEstimator`, :func:`posterior_draws` (cached).
"""

from amortized_nlme.errors import EstimatorError
from amortized_nlme.posterior.cache import posterior_draws
from amortized_nlme.posterior.estimator import (
    APPROXIMATOR_FILE, META_FILE, SUPPORT_SD, TrainedEstimator, load_estimator, read_meta)

__all__ = ["APPROXIMATOR_FILE", "EstimatorError", "META_FILE", "SUPPORT_SD", "TrainedEstimator", "load_estimator",
           "posterior_draws", "read_meta"]
