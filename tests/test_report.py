"""The results folder of a fit: files, values, atomicity, and a VPC that is right for data from the fitted population.

A small synthetic mrna_simple problem: individuals drawn from a known population (one group-specific mean, one
parameter without random effect), fake posterior draws = truth + small noise, fitted with ``amortized_nlme.population.fit``.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

import amortized_nlme.report.writer  # noqa: F401 - patched in a test
from amortized_nlme import report
from amortized_nlme.population import PopulationModel
from amortized_nlme.population.fit import fit
from amortized_nlme.population.objective import DrawSet
from simulators.mrna_simple import MrnaSimple

N, M = 60, 40
GROUPS = ("eGFP", "d2eGFP")
PLOTS = ("waterfall.png", "profiles.png", "gof_dv_vs_pred.png", "gof_residuals.png", "npde.png", "eta_covariates.png",
         "eta_distributions.png", "parameter_distributions.png", "vpc.png", "pcvpc.png", "individual_fits.png")
TABLES = ("estimates.csv", "random_effects.csv", "covariance.csv", "correlation.csv", "sdtab.csv", "patab.csv",
          "individual_estimates.csv")


def _population(model: MrnaSimple) -> PopulationModel:
    return PopulationModel(model.prior, random_effects=["delta", "gamma", "kms", "t0", "offset"],
                           group_specific=["kms"], groups=GROUPS, fixed_std=0.05)


def _theta_true(pop: PopulationModel) -> np.ndarray:
    values = {"beta_delta": np.log(0.3), "beta_gamma": np.log(0.05), "beta_kms[eGFP]": 5.0, "beta_kms[d2eGFP]": 5.8,
              "beta_t0": np.log(2.0), "beta_offset": 1.5, "beta_sigma": np.log(0.15)}
    return np.array([values.get(name, np.log(0.25)) for name in pop.parameter_names])


@pytest.fixture(scope="module")
def problem():
    model = MrnaSimple()
    pop = _population(model)
    rng = np.random.default_rng(11)
    groups = np.array([GROUPS[i % 2] for i in range(N)])
    covariates = {"wt": rng.normal(size=N)}
    phi = report.sample_population(pop, _theta_true(pop), N, None, groups, rng)[0]
    design = model.sample_design(N, rng)
    design = {"times": design["times"][:, ::3].copy(), "mask": design["mask"][:, ::3].copy()}
    obs = model.simulate(phi, design, rng)
    draws = phi[:, None, :] + 0.05 * rng.standard_normal((N, M, pop.k))
    fr = fit(pop, DrawSet(draws, model.prior), groups=groups, n_starts=2, seed=1, profile=[0])
    ids = [f"cell{i:03d}" for i in range(N)]
    inputs = {"data_hash": "abc123", "estimator_sha256": "f00d", "population_model": pop.to_dict(), "seed": 1,
              "n_draws": M, "versions": {"numpy": np.__version__}}
    return dict(model=model, pop=pop, fit=fr, obs=obs, design=design, draws=draws, ids=ids, groups=groups,
                covariates=covariates, inputs=inputs)


def _write(problem, out, **kw):
    p = problem
    return report.write_results(out, fit=p["fit"], model=p["model"], observations=p["obs"], design=p["design"],
                                draws=p["draws"], ids=p["ids"], covariates=p["covariates"], groups=p["groups"],
                                inputs=p["inputs"], **kw)


@pytest.fixture(scope="module")
def written(problem, tmp_path_factory):
    out = tmp_path_factory.mktemp("res") / "run1"
    extra = {"model_selection": {"bicc": 123.4, "log_marginal_likelihood": None}}
    return _write(problem, out, extra=extra)


def test_every_file_written(written) -> None:
    names = {p.name for p in written.iterdir()}
    expected = {report.SUMMARY_FILE, report.PYPESTO_FILE, report.REPORT_FILE, report.INDIVIDUAL_FITS_PDF, *TABLES,
                *PLOTS}
    assert expected <= names, expected - names
    assert "pcvpc_log.png" not in names  # log-scale observations: no log axis
    assert not any(p.name.startswith(".") for p in written.parent.iterdir())  # no temp folders left
    plain = written.parent / "plain"
    plain.mkdir()
    assert written.stat().st_mode == plain.stat().st_mode  # not the private mode of a temp folder
    for png in PLOTS:
        data = (written / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, png
    pdf = (written / report.INDIVIDUAL_FITS_PDF).read_bytes()
    assert pdf[:5] == b"%PDF-" and len(pdf) > 50_000
    assert pdf.count(b"/Type /Page\n") + pdf.count(b"/Type /Page ") + pdf.count(b"/Type/Page") >= 4  # 60 / 16
    md = (written / report.REPORT_FILE).read_text()
    assert "beta_kms[d2eGFP]" in md and all(f"]({png})" in md for png in PLOTS)
    assert all(f"]({f})" in md for f in (*TABLES, report.INDIVIDUAL_FITS_PDF))


def test_estimates_csv_matches_fit(written, problem) -> None:
    fr = problem["fit"]
    df = pd.read_csv(written / report.ESTIMATES_FILE)
    assert list(df["name"]) == list(fr.parameter_names)
    for col in ("estimate", "natural", "se", "wald95_lo", "wald95_hi", "profile80_lo", "profile95_hi", "mc_se",
                "at_bound", "natural_lo95"):
        assert col in df.columns, col
    np.testing.assert_array_equal(df["estimate"].to_numpy(), fr.estimate)
    np.testing.assert_array_equal(df["se"].to_numpy(), fr.se)
    np.testing.assert_array_equal(df[["wald95_lo", "wald95_hi"]].to_numpy(), fr.wald_ci[0.95])
    np.testing.assert_array_equal(df[["profile90_lo", "profile90_hi"]].to_numpy(), fr.profile_ci[0.9])
    np.testing.assert_array_equal(df["at_bound"].to_numpy(), fr.at_bound)
    assert df["mc_se"].isna().all()  # not computed in this fit
    nat = fr.natural()
    row = df.set_index("name")
    assert row.loc["beta_kms[eGFP]", "natural"] == pytest.approx(nat["natural_mean"]["kms[eGFP]"], rel=1e-12)
    assert row.loc["log_omega_t0", "natural"] == pytest.approx(nat["omega_sd"]["t0"], rel=1e-12)
    # profiled parameter: natural CI from the profile interval, the others from Wald
    assert row.loc["beta_delta", "ci95_method"] == "profile"
    assert row.loc["beta_delta", "natural_lo95"] == pytest.approx(math.exp(fr.profile_ci[0.95][0, 0]))
    assert row.loc["beta_gamma", "ci95_method"] == "wald"
    text = report.format_estimates(fr)
    assert all(name in text for name in fr.parameter_names)


def test_summary_json_round_trips(written, problem) -> None:
    fr, inputs = problem["fit"], problem["inputs"]
    s = json.loads((written / report.SUMMARY_FILE).read_text())
    assert s["inputs"] == json.loads(json.dumps(inputs))
    assert s["objective"]["value"] == fr.fval and s["objective"]["mc_se"] == fr.mc_se_fval
    assert s["information_criteria"]["aic_rel"] == pytest.approx(fr.information_criteria()["aic_rel"])
    assert s["model_selection"] == {"bicc": 123.4, "log_marginal_likelihood": None}
    assert s["multistart"]["n_starts"] == 2 and len(s["multistart"]["starts"]) == 2
    assert s["n_individuals"] == N and s["n_draws_per_individual"] == M
    assert s["ess"]["ess_median"] == pytest.approx(float(np.median(fr.diagnostics.ess)))
    assert set(PLOTS) == set(s["plots"])
    assert s["npde"]["n_simulations"] >= 200 and s["npde"]["n"] == N * 60
    assert s["vpc"]["stratified_by"] == "group" and s["subsampling"] == {}


def test_individual_estimates(written, problem) -> None:
    df = pd.read_csv(written / report.INDIVIDUAL_FILE)
    assert len(df) == N and list(df["id"]) == problem["ids"]
    assert list(df["group"]) == list(problem["groups"])
    np.testing.assert_allclose(df["wt"], problem["covariates"]["wt"])
    np.testing.assert_allclose(df["log_kms_median"], np.median(problem["draws"][:, :, 2], axis=1))
    assert np.all(df["log_t0_q05"] <= df["log_t0_median"]) and np.all(df["log_t0_median"] <= df["log_t0_q95"])
    fr = problem["fit"]
    mean, sd = fr.objective.conditional_moments(fr.estimate)
    np.testing.assert_allclose(df["log_kms_cond_mean"], mean[:, 2])
    np.testing.assert_allclose(df["log_kms_cond_sd"], sd[:, 2])
    summary = json.loads((written / report.SUMMARY_FILE).read_text())
    shrink = summary["shrinkage"]["eta_shrinkage"]
    assert set(shrink) == set(fr.model.random_effects)
    assert shrink == pytest.approx(fr.objective.shrinkage(fr.estimate))
    assert "eta shrinkage" in (written / report.REPORT_FILE).read_text()


def test_pypesto_result_readable(written, problem) -> None:
    import pypesto.store

    res = pypesto.store.read_result(written / report.PYPESTO_FILE, problem=True, optimize=True, profile=True)
    assert res.optimize_result.list[0].fval == pytest.approx(problem["fit"].fval)
    assert res.profile_result.list[0][0] is not None


def test_failure_leaves_no_final_folder(problem, tmp_path, monkeypatch) -> None:
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(report.writer, "plot_waterfall", boom)  # after the tables, before the other figures
    with pytest.raises(RuntimeError, match="disk full"):
        _write(problem, tmp_path / "new")
    assert not (tmp_path / "new").exists() and list(tmp_path.iterdir()) == []
    # an existing results folder survives a failed rewrite untouched
    old = tmp_path / "old"
    old.mkdir()
    (old / "estimates.csv").write_text("previous")
    with pytest.raises(RuntimeError, match="disk full"):
        _write(problem, old)
    assert (old / "estimates.csv").read_text() == "previous" and [p.name for p in tmp_path.iterdir()] == ["old"]
    monkeypatch.undo()
    _write(problem, old, plots=False)  # a successful rewrite replaces it as a whole
    assert (old / "estimates.csv").read_text() != "previous" and not (old / "vpc.png").exists()
    assert (old / report.SDTAB_FILE).exists() and not (old / report.INDIVIDUAL_FITS_PDF).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


def test_vpc_covers_data_from_the_fitted_population(problem) -> None:
    model, pop, fr = problem["model"], problem["pop"], problem["fit"]
    rng = np.random.default_rng(5)
    n = 400
    groups = np.array([GROUPS[i % 2] for i in range(n)])
    design = {"times": np.tile(problem["design"]["times"][0], (n, 1)), "mask": np.ones((n, 60), dtype=bool)}
    phi = report.sample_population(pop, fr.estimate, n, None, groups, rng)[0]
    obs = model.simulate(phi, design, rng)
    panels = report.visual_predictive_check(pop, fr.estimate, model, obs, design, None, groups, n_replicates=40,
                                            seed=2)
    assert [p.stratum for p in panels] == sorted(GROUPS)
    for p in panels:
        assert p.coverage() >= 0.7, (p.stratum, p.coverage())
        assert p.coverage(0) >= 0.6 and p.coverage(2) >= 0.6
    # and it has power: a population with 1 higher log kms does not cover the observed median
    wrong = fr.estimate.copy()
    for g in GROUPS:
        wrong[pop.parameter_names.index(f"beta_kms[{g}]")] += 1.0
    bad = report.visual_predictive_check(pop, wrong, model, obs, design, None, groups, n_replicates=40, seed=2)
    assert all(p.coverage() < 0.4 for p in bad)


def test_time_bins_irregular() -> None:
    rng = np.random.default_rng(0)
    times = np.sort(rng.uniform(0, 24, size=(200, 8)), axis=1)
    mask = np.ones_like(times, dtype=bool)
    mask[:, 6:] = False
    idx, reps = report.time_bins(times, mask, n_bins=10)
    assert reps.size == 10 and np.all(np.diff(reps) > 0)
    assert np.all(idx[~mask] == -1) and np.all((idx[mask] >= 0) & (idx[mask] < 10))
    counts = np.bincount(idx[mask])
    assert counts.min() > 0.5 * counts.mean()


def test_sdtab_and_patab(written, problem) -> None:
    """One row per observation and per individual; IPRED is the prediction at the conditional means of
    individual_estimates.csv, PRED at the typical individual of its group; IWRES uses each cell's sigma."""
    model, fr, design = problem["model"], problem["fit"], problem["design"]
    sd = pd.read_csv(written / report.SDTAB_FILE)
    assert list(sd.columns) == ["ID", "TIME", "GROUP", "DV", "PRED", "IPRED", "RES", "IRES", "IWRES", "EPRED", "NPDE",
                                "BLQ"]
    assert len(sd) == design["mask"].sum() and (sd["BLQ"] == 0).all()
    ind = pd.read_csv(written / report.INDIVIDUAL_FILE)
    cm = ind[[f"log_{p}_cond_mean" for p in model.param_names]].to_numpy()
    ipred = model.predict(cm, design)[..., 0][design["mask"]]
    np.testing.assert_allclose(sd["IPRED"], ipred, rtol=1e-10)
    mu = fr.model.design(N, None, problem["groups"]).mean(fr.estimate)
    np.testing.assert_allclose(sd["PRED"], model.predict(mu, design)[..., 0][design["mask"]], rtol=1e-10)
    sigma = np.exp(cm[:, 5])[np.nonzero(design["mask"])[0]]
    np.testing.assert_allclose(sd["IWRES"], (sd["DV"] - sd["IPRED"]) / sigma, rtol=1e-10)
    np.testing.assert_allclose(sd["RES"], sd["DV"] - sd["PRED"], rtol=1e-10)
    assert sd["NPDE"].notna().all() and abs(sd["NPDE"].mean()) < 0.15 and abs(sd["NPDE"].std() - 1) < 0.15
    pa = pd.read_csv(written / report.PATAB_FILE)
    assert len(pa) == N and list(pa["ID"]) == problem["ids"] and list(pa["GROUP"]) == list(problem["groups"])
    np.testing.assert_allclose(np.log(pa["kms"]), cm[:, 2])
    np.testing.assert_allclose(pa["ETA_kms"], cm[:, 2] - mu[:, 2])
    assert "ETA_sigma" not in pa  # no random effect
    np.testing.assert_allclose(pa["wt"], problem["covariates"]["wt"])


def test_pcvpc_covers_data_from_the_fitted_population_and_has_power(problem) -> None:
    model, pop, fr = problem["model"], problem["pop"], problem["fit"]
    rng = np.random.default_rng(6)
    n = 200
    groups = np.array([GROUPS[i % 2] for i in range(n)])
    design = {"times": np.tile(problem["design"]["times"][0], (n, 1)), "mask": np.ones((n, 60), dtype=bool)}
    phi = report.sample_population(pop, fr.estimate, n, None, groups, rng)[0]
    obs = model.simulate(phi, design, rng)
    kw = dict(n_replicates=40, seed=3, prediction_corrected=True)
    panels = report.visual_predictive_check(pop, fr.estimate, model, obs, design, None, groups, **kw)
    assert all(p.prediction_corrected and p.log_dv for p in panels)  # log_fluorescence: additive correction
    assert all(p.coverage() >= 0.7 for p in panels), [p.coverage() for p in panels]
    wrong = fr.estimate.copy()
    wrong[pop.parameter_names.index("log_omega_kms")] += 1.0  # more variability than the data have
    bad = report.visual_predictive_check(pop, wrong, model, obs, design, None, groups, **kw)
    assert all(p.coverage(0) < 0.4 and p.coverage(2) < 0.4 for p in bad), [(p.coverage(0), p.coverage(2))
                                                                            for p in bad]
