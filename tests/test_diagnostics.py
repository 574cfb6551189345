"""The calibration check's gate, metrics and proposal diagnostics, and the README's estimator table.

The gate is what `amortized-nlme check` passes or fails an estimator on, so its error rates are measured here on
ranks whose distribution is known: exactly uniform (a perfectly calibrated estimator) and from an over-dispersed
posterior (a miscalibrated one)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import norm

from amortized_nlme.training.check import (
    BAND_SIMULATIONS,
    band_grid,
    calibration_gate,
    ecdf_band_check,
    ecdf_counts,
    importance_ess,
    minimal_coverage,
    pareto_khat,
    randomized_ranks,
    readme_table_block,
    render_estimator_table,
    simultaneous_band,
    update_readme_table,
)

REPO = Path(__file__).resolve().parent.parent
N_SIMS = 1000  # simulations per check, as in the shipped checks


def _failure_rate(k: int, replicates: int, seed: int, dispersion: float = 1.0) -> float:
    """Fraction of ``replicates`` checks of ``N_SIMS`` simulations that the gate fails; parameter 0's posterior is
    ``dispersion`` times as wide as the true one (1: calibrated; >1: over-dispersed, ranks pile up in the middle),
    the other k - 1 are calibrated."""
    rng = np.random.default_rng([seed, k])
    failed = 0
    for _ in range(replicates):
        ranks = rng.uniform(size=(N_SIMS, k))
        if dispersion != 1.0:
            ranks[:, 0] = norm.cdf(rng.standard_normal(N_SIMS) / dispersion)
        failed += not calibration_gate(ranks)["passed"]
    return failed / replicates


@pytest.mark.parametrize("k", [4, 6])
def test_gate_is_family_wise(k: int) -> None:
    """Exactly uniform ranks (a calibrated estimator), 1,000 replicate checks of 1,000 simulations each: the gate
    fails 3.6% of them for k = 4 and 4.4% for k = 6 (5,000 other replicates: 4.6% and 4.8%; the family-wise level
    is 5%). The former rule (each ECDF inside its own 95% band) fails 18.8% and 25.3% of such checks."""
    rate = _failure_rate(k, replicates=1000, seed=20250)
    assert rate <= 0.065, f"k = {k}: a calibrated estimator fails the gate in {rate:.1%} of checks"


@pytest.mark.parametrize("k", [4, 6])
def test_gate_catches_an_over_dispersed_posterior(k: int) -> None:
    """One parameter's posterior 15% too wide (its 50% intervals cover 56%, 90% intervals 94%): the gate fails
    97% of 100 checks for k = 4 and 96% for k = 6. (10% too wide, like mrna_simple's kms in its former check, is
    caught about half the time: 58% and 50% of 300 checks.)"""
    rate = _failure_rate(k, replicates=100, seed=7, dispersion=1.15)
    assert rate >= 0.85, f"k = {k}: the over-dispersed posterior passes {1 - rate:.0%} of checks"


def test_gate_result_records_its_definition() -> None:
    rng = np.random.default_rng(3)
    ranks = rng.uniform(size=(N_SIMS, 4))
    ranks[:, 2] = norm.cdf(rng.standard_normal(N_SIMS) / 1.4)
    gate = calibration_gate(ranks, ["a", "b", "c", "d"])
    assert not gate["passed"] and gate["worst_parameter"] == "c" and gate["worst_excursion"] > 0
    assert list(gate["inside_band"]) == ["a", "b", "c", "d"] and not gate["inside_band"]["c"]
    assert gate["family_level"] == 0.95 and gate["per_parameter_level"] == pytest.approx(1 - 0.05 / 4)
    assert gate["n_parameters"] == 4 and "Bonferroni" in gate["definition"]
    assert gate["family_p_value"] < 0.05 and gate["p_value"]["c"] < 0.05 / 4


def test_band_is_bayesflows_construction() -> None:
    """The statistic is BayesFlow's minimal coverage probability (same uniforms, same grid; n = 256 so that
    BayesFlow's n * ECDF is exact in floating point), and the gate is equivalent to the statistic's test: inside the
    band <=> p-value above 1 - level."""
    from bayesflow.utils.ecdf.minimal_coverage_probs import minimal_coverage_probs

    n = 256
    u = np.random.default_rng(1).uniform(size=(40, n))
    z = band_grid(n)
    assert np.allclose(minimal_coverage(ecdf_counts(u, z), n), minimal_coverage_probs(z, u), rtol=1e-10, atol=0)
    ranks = np.random.default_rng(2).uniform(size=(n, 30)) ** 1.05  # some inside, some outside at 90%
    res = ecdf_band_check(ranks, 0.9)
    assert 0 < sum(res["inside_band"]) < 30
    assert res["inside_band"] == [p > 0.1 for p in res["p_value"]]
    narrow, wide = simultaneous_band(n, 0.9), simultaneous_band(n, 0.99)
    assert np.all(wide["lower"] <= narrow["lower"]) and np.all(wide["upper"] >= narrow["upper"])
    assert wide["gamma"] < narrow["gamma"] and BAND_SIMULATIONS >= 10_000


def test_randomized_ranks_are_uniform_under_calibration() -> None:
    rng = np.random.default_rng(4)
    truth = rng.standard_normal((N_SIMS, 1))
    draws = rng.standard_normal((N_SIMS, 50, 1))  # the posterior is the prior: truth and draws exchangeable
    ranks = randomized_ranks(draws, truth, rng)
    assert calibration_gate(ranks)["passed"]
    assert abs(np.mean(ranks < 0.5) - 0.5) < 0.05


def test_pareto_khat_and_ess_of_known_weights() -> None:
    """q = N(0, 1) as proposal for p = N(0, s^2): k = 1 - 1/s^2 in theory (s = 1.5: 0.56), light tails for s < 1;
    ESS of equal weights is all the draws."""
    x = np.random.default_rng(5).standard_normal((40, 1000))

    def log_w(s: float) -> np.ndarray:
        return -0.5 * x**2 / s**2 - np.log(s) + 0.5 * x**2

    assert np.median(pareto_khat(log_w(1.5))) == pytest.approx(0.56, abs=0.12)
    assert np.median(pareto_khat(log_w(3.0))) > 0.7
    assert np.median(pareto_khat(log_w(0.8))) < 0
    assert np.all(pareto_khat(np.zeros((2, 100))) == -np.inf)
    assert importance_ess(np.zeros((1, 100)))[0] == pytest.approx(100)
    assert importance_ess(np.array([[0.0, -np.inf, -np.inf]]))[0] == pytest.approx(1)
    assert 0.4 < np.median(importance_ess(log_w(1.5))) / 1000 < 0.7


def test_readme_estimator_table_is_generated_from_meta() -> None:
    """The README's table of shipped estimators is `make estimator-table`'s output: it cannot go stale."""
    assert readme_table_block(REPO / "README.md") == render_estimator_table(REPO / "trained_models"), \
        "README.md's estimator table differs from trained_models/*/meta.json: run `make estimator-table`"


def test_update_readme_table(tmp_path: Path) -> None:
    trained = tmp_path / "trained_models"
    (trained / "toy").mkdir(parents=True)
    names = ["a", "b"]
    per = {n: 0.5 for n in names}
    gate = calibration_gate(np.random.default_rng(6).uniform(size=(N_SIMS, 2)), names)
    meta = {"param_names": names, "training": {"simulations_seen": 2_500_000, "train_time_s": 600.0},
            "diagnostics": {"seed": 11, "gate": gate, "passed": gate["passed"], "calibration_error": per,
                            "coverage_90": per, "r2": per, "posterior_contraction": per,
                            "proposal": {"skipped": "no likelihood"},
                            "other_seeds": {"12": {"passed": False, "worst_parameter": "b", "worst_excursion": 0.01}}}}
    (trained / "toy" / "meta.json").write_text(json.dumps(meta))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- estimator-table:start -->\nold\n<!-- estimator-table:end -->\nrest\n")
    assert update_readme_table(readme, trained)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("<!-- estimator-table:end -->\nrest\n")
    assert "`toy`: a, b | 2.5 M | 10 min | yes (seed 11: worst excursion 0; p = " in text and "12: no (b .010)" in text
    assert not update_readme_table(readme, trained)


def test_check_command_takes_a_seed(capsys: pytest.CaptureFixture) -> None:
    """`check --seed` runs the check at that seed (here small and without recording: meta.json stays as it is) and
    says which seed; the proposal quality is measured for a model with a likelihood."""
    from amortized_nlme.cli import main

    meta = REPO / "trained_models" / "pk_oral_1cmt" / "meta.json"
    before = meta.read_bytes()
    assert main(["check", "pk_oral_1cmt", "--config", str(REPO / "workflows" / "pk_oral_1cmt_phase2.toml"),
                 "--n-simulations", "60", "--n-draws", "100", "--seed", "5", "--no-record"]) == 0
    out = capsys.readouterr().out
    assert "at seed 5 (60 simulations x 100 draws)" in out and "Pareto k-hat median" in out
    assert "family-wise 95% over 4 parameters" in out
    assert meta.read_bytes() == before
