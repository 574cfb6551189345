"""Shared test settings: JAX backend, one BLAS thread, where the example data lives."""

import os
import signal

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# Commands the tests start get Ctrl-C's default disposition, as in a terminal: a suite started in the background by a
# non-interactive shell has SIGINT ignored, children inherit an ignored signal, and Python then installs no handler
# (the Ctrl-C tests would see runs that never stop). A handled signal is reset to the default in a child.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_DATA = REPO / "amortized_nlme" / "example_data"


@pytest.fixture(scope="session")
def example_data() -> Path:
    return EXAMPLE_DATA
