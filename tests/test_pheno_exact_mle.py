"""The exact-ML reference benchmark for pheno (benchmarks/pheno_exact_mle.py): its adaptive Gauss-Hermite quadrature
against a brute-force scipy dblquad of an independently coded integrand, for one subject at NONMEM's estimates."""

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "pheno_exact_mle.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("pheno_exact_mle", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quadrature_matches_dblquad_for_one_subject(bench):
    data = bench.load_pheno()                       # also checks 59 subjects, 589 doses, 155 observations
    x = bench.to_estimation_scale(bench.NONMEM)
    subject_id = 25                                 # 6 observations, APGR 1 (the APGR < 5 factor is exercised)
    s = int(np.flatnonzero(data.ids == subject_id)[0])
    quad = bench.subject_loglik(x, data, n_nodes=25)
    assert quad.shape == (data.n_subjects,) and np.all(np.isfinite(quad))
    brute = bench.subject_loglik_dblquad(x, data, subject_id)
    assert math.exp(quad[s]) == pytest.approx(math.exp(brute), rel=1e-6)
