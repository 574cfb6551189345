"""Recovery of known population parameters on simulated data with a shipped estimator, through the whole inference
stage (data file -> draws -> fit -> results folder)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from amortized_nlme.infer import InferenceOptions, run_inference
from simulators import get_model

REPO = Path(__file__).resolve().parent.parent
ESTIMATOR = REPO / "trained_models" / "pk_oral_1cmt"
TRUTH = {"ka": 1.5, "ke": 0.09, "V": 32.0, "sigma_add": 0.5}
OMEGA = {"ka": 0.5, "ke": 0.2, "V": 0.15}
TIMES = np.array([0.25, 0.5, 1, 2, 3.5, 5, 7, 9, 12, 24.0])


def simulated_study(path: Path, n: int, seed: int) -> None:
    """A theophylline-like study (theo_saemix.csv layout) from a known population."""
    model = get_model("pk_oral_1cmt")
    rng = np.random.default_rng(seed)
    phi = np.log([TRUTH["ka"], TRUTH["ke"], TRUTH["V"], TRUTH["sigma_add"]]) * np.ones((n, 4))
    for j, p in enumerate(("ka", "ke", "V")):
        phi[:, j] += OMEGA[p] * rng.standard_normal(n)
    weight = rng.normal(70, 10, n)
    dose = 4.0 * weight
    T = TIMES.size
    design = {"times": np.zeros((n, 15)), "mask": np.zeros((n, 15), dtype=bool), "dose": dose}
    design["times"][:, :T] = TIMES
    design["mask"][:, :T] = True
    y = model.simulate(phi, design, rng)[:, :T, 0]
    rows = [(i + 1, dose[i], TIMES[t], y[i, t], weight[i], int(i % 2)) for i in range(n) for t in range(T)]
    pd.DataFrame(rows, columns=["Id", "Dose", "Time", "Concentration", "Weight", "Sex"]).to_csv(path, index=False)


@pytest.mark.parametrize("likelihood", ["exact", "amortized"])
def test_population_recovered_with_shipped_pk_estimator(tmp_path: Path, likelihood: str) -> None:
    csv = tmp_path / "study.csv"
    simulated_study(csv, n=120, seed=3)
    out = run_inference(InferenceOptions(model="pk_oral_1cmt", data=str(csv), estimator=str(ESTIMATOR),
                                         out=str(tmp_path / "res"), n_draws=300, n_starts=4, profiles=False,
                                         mc_refits=0, marginal="off", likelihood=likelihood,
                                         cache_dir=str(tmp_path / "cache")))
    est = pd.read_csv(out / "estimates.csv").set_index("name")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["inputs"]["likelihood"] == likelihood
    tol = {"exact": 0.15, "amortized": 0.25}[likelihood]  # on the log scale (15% / 25%)
    for p in ("ka", "ke", "V"):
        assert abs(est.loc[f"beta_{p}", "estimate"] - np.log(TRUTH[p])) < tol, p
    if likelihood == "exact":
        # the amortized objective underestimates the residual sd here (0.34 for 0.5: its kernel for a parameter
        # without random effect meets an imperfect q); exact weights remove that bias, which is why `auto` uses them
        assert abs(est.loc["beta_sigma_add", "estimate"] - np.log(TRUTH["sigma_add"])) < tol
    for p in ("ka", "V"):  # omega_ke is weakly identified from 10 samples per subject at n = 120
        assert abs(est.loc[f"log_omega_{p}", "estimate"] - np.log(OMEGA[p])) < 0.35, p
