"""The exceptions that mean "bad input or request" (shown to users as a message, not a traceback)."""

from __future__ import annotations

from amortized_nlme.data import DataError
from amortized_nlme.estimator import EstimatorError
from amortized_nlme.simulate import SimulationError
from amortized_nlme.store import StoreError


class ConfigError(ValueError):
    """A population model or workflow file is invalid (message names the file and key)."""


USER_ERRORS: tuple[type[BaseException], ...] = (
    DataError, EstimatorError, SimulationError, StoreError, ConfigError, FileNotFoundError, KeyError, ValueError,
)
