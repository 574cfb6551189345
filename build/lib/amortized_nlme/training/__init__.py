"""Stage 2, train: build a BayesFlow 2 estimator q(phi | y) for an individual model from its workflow, train it
(online or from the simulation store) with checkpoints that survive a kill, export it to ``trained_models/<model>/``
and check its calibration.

Public API: :func:`train`, :func:`build_approximator`, :func:`run_check`.
"""

from amortized_nlme.training.check import run_check
from amortized_nlme.training.networks import build_approximator
from amortized_nlme.training.trainer import CHECKPOINT_DIR, latest_checkpoint, train

__all__ = ["CHECKPOINT_DIR", "build_approximator", "latest_checkpoint", "run_check", "train"]
