"""Stage 3, infer: fit a population model to a data set with a trained estimator, and covariate selection.

Public API: :class:`InferenceOptions`, :func:`prepare_inference`, :func:`run_inference`, :func:`run_selection`.
"""

from amortized_nlme.inference.pipeline import (
    InferenceContext, InferenceOptions, prepare_inference, run_inference, run_selection)

__all__ = ["InferenceContext", "InferenceOptions", "prepare_inference", "run_inference", "run_selection"]
