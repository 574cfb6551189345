"""The exceptions that mean "bad input or request": the command line shows them as a one-paragraph message and a
non-zero exit, never a traceback. This module imports nothing from the package, so every stage can raise them."""

from __future__ import annotations


class AmortizedNlmeError(Exception):
    """Base class of every error the user can act on (the message names the file, key, row or option)."""


class ConfigError(AmortizedNlmeError, ValueError):
    """A workflow, population-model or data-reader configuration (or a command-line option) is invalid."""


class DataError(AmortizedNlmeError, ValueError):
    """Bad input data; the message names the file, row and column and what was expected."""


class SimulationError(AmortizedNlmeError, RuntimeError):
    """A simulation cannot be run as asked (e.g. the simulator fails for almost every prior draw)."""


class StoreError(AmortizedNlmeError, RuntimeError):
    """A simulation store is missing, belongs to another model or configuration, or is damaged."""


class DaskError(AmortizedNlmeError, RuntimeError):
    """Simulating on Dask is not possible as asked: dask.distributed is not installed, the scheduler cannot be reached,
    the workers cannot run the package, or a worker died (the store stays resumable)."""


class EstimatorError(AmortizedNlmeError, RuntimeError):
    """An estimator cannot be built, trained, loaded or used as asked (missing, damaged, tampered with, or made
    for another model)."""


#: what the command line reports as a message rather than a traceback
USER_ERRORS: tuple[type[BaseException], ...] = (AmortizedNlmeError, FileNotFoundError, KeyError, ValueError)
