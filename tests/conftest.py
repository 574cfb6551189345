"""Shared test settings: JAX backend, one BLAS thread, where the example data lives."""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_DATA = REPO / "amortized_nlme" / "example_data"


@pytest.fixture(scope="session")
def example_data() -> Path:
    return EXAMPLE_DATA
