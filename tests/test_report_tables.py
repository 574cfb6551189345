"""The report's tables against a linear-Gaussian individual model, where every quantity has a closed form.

y_ij = a_i + b_i t_ij + e_ij, e_ij ~ N(0, s^2) (additive error given to the report as a population-level
:class:`ResidualError`, the form the residual error will take); (a_i, b_i) ~ N(mu_i, Omega) with mu_i = (beta_a + B x_i,
beta_b). Exact posterior draws under the broad prior; then, at the fitted theta, PRED = X_i mu_i, IPRED = X_i m_i with
m_i the conjugate conditional mean, and the marginal y_i ~ N(X_i mu_i, X_i Omega X_i' + s^2 I), whose Cholesky-whitened
residuals are what NPDE estimates.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from amortized_nlme import report
from amortized_nlme.model import IndividualModel, NormalPrior
from amortized_nlme.population import PopulationModel
from amortized_nlme.population.fit import fit
from amortized_nlme.population.objective import DrawSet
from amortized_nlme.report.parameters import cv_percent, delta_method
from amortized_nlme.report.residuals import (
    ResidualError,
    monte_carlo_residual_sd,
    simulate_observations,
)

N, M, T = 160, 1500, 6
S_NOISE = 0.4
TIMES = np.array([0.0, 0.5, 1.0, 2.0, 3.0, 4.0])
MU0, TAU0 = np.zeros(2), np.array([3.0, 3.0])
TRUE = {"beta_a": 1.0, "beta_b": -0.5, "B_a_x": 0.3, "log_omega_a": np.log(0.5), "log_omega_b": np.log(0.3)}


class LinearModel(IndividualModel):
    """y = a + b t + N(0, S_NOISE^2): linear in its parameters."""

    name = "linear_test"
    version = "1"
    param_names = ("a", "b")
    obs_names = ("y",)
    max_time_points = T
    time_unit = "h"
    _PRIOR = NormalPrior(("a", "b"), MU0, TAU0**2)

    @property
    def prior(self) -> NormalPrior:
        return self._PRIOR

    def sample_design(self, n, rng):
        mask = np.ones((n, T), dtype=bool)
        mask[:, 4:] = rng.random((n, 2)) < 0.7  # 4 to 6 observations
        return {"times": np.tile(TIMES, (n, 1)), "mask": mask}

    def predict(self, phi, design):
        phi = self.check_phi(phi)
        return (phi[:, :1] + phi[:, 1:2] * design["times"])[..., None]

    def simulate(self, phi, design, rng):
        y = self.predict(phi, design) + S_NOISE * rng.standard_normal((phi.shape[0], design["times"].shape[1], 1))
        return np.where(design["mask"][..., None], y, 0.0)

    def encode(self, observations, design):  # pragma: no cover - not used
        return observations.astype(np.float32)

    def from_dataset(self, data):  # pragma: no cover - not used
        raise NotImplementedError


def design_matrix(mask_row: np.ndarray) -> np.ndarray:
    t = TIMES[mask_row]
    return np.stack([np.ones_like(t), t], axis=1)


@pytest.fixture(scope="module")
def lg(tmp_path_factory):
    model = LinearModel()
    rng = np.random.default_rng(7)
    x = rng.normal(size=N)
    pop = PopulationModel(model.prior, covariates={"a": ["x"]})
    theta_true = np.array([TRUE[nm] for nm in pop.parameter_names])
    phi = report.sample_population(pop, theta_true, N, {"x": x}, None, rng)[0]
    design = model.sample_design(N, rng)
    obs = model.simulate(phi, design, rng)
    # censor the lowest observations (about 10%)
    lloq = float(np.quantile(obs[design["mask"]], 0.1))
    blq = (obs[..., 0] < lloq) & design["mask"]
    obs_c = obs.copy()
    obs_c[..., 0] = np.where(blq, lloq, obs[..., 0])
    censoring = report.Censoring(blq[..., None], np.where(design["mask"], lloq, np.nan)[..., None])
    # exact posterior draws under the broad prior
    draws = np.empty((N, M, 2))
    for i in range(N):
        X = design_matrix(design["mask"][i])
        P = X.T @ X / S_NOISE**2 + np.diag(1.0 / TAU0**2)
        C = np.linalg.inv(P)
        m = C @ (X.T @ obs[i, design["mask"][i], 0] / S_NOISE**2 + MU0 / TAU0**2)
        draws[i] = m + rng.standard_normal((M, 2)) @ np.linalg.cholesky(C).T
    fr = fit(pop, DrawSet(draws, model.prior), covariates={"x": x}, n_starts=1, seed=0)
    residual = ResidualError("additive", S_NOISE)
    derived = [report.DerivedParameter("a_plus_b", lambda p: p["a"] + p["b"], "a + b (linear, exact delta method)"),
               report.DerivedParameter("exp_a", lambda p: np.exp(p["a"]), "exp(a)", "u")]
    out = tmp_path_factory.mktemp("lg") / "res"
    ids = [f"s{i}" for i in range(N)]
    report.write_results(out, fit=fr, model=model, observations=obs_c, design=design, draws=draws, ids=ids,
                         covariates={"x": x}, groups=None, inputs={"seed": 0}, plots=True, seed=3, residual=residual,
                         censoring=censoring, derived=derived, n_npde_simulations=2000,
                         extra={"model_selection": {"computed": True, "minus2ll": 812.3, "minus2ll_se": 0.2}})
    return dict(model=model, pop=pop, fit=fr, x=x, design=design, obs=obs, obs_c=obs_c, blq=blq, lloq=lloq,
                draws=draws, out=out, ids=ids, residual=residual, censoring=censoring)


def closed_form(lg):
    """mu_i, conditional means and sds, PRED, IPRED and whitened marginal residuals at the fitted theta."""
    fr, pop, design, obs = lg["fit"], lg["pop"], lg["design"], lg["obs"]
    mu = pop.design(N, {"x": lg["x"]}).mean(fr.estimate)
    Om = pop.covariance_matrix(fr.estimate)
    Oinv = np.linalg.inv(Om)
    cm, csd, z = np.empty((N, 2)), np.empty((N, 2)), []
    pred, ipred = np.full((N, T), np.nan), np.full((N, T), np.nan)
    for i in range(N):
        msk = design["mask"][i]
        X = design_matrix(msk)
        y = obs[i, msk, 0]
        C = np.linalg.inv(X.T @ X / S_NOISE**2 + Oinv)
        cm[i] = C @ (X.T @ y / S_NOISE**2 + Oinv @ mu[i])
        csd[i] = np.sqrt(np.diag(C))
        pred[i, msk], ipred[i, msk] = X @ mu[i], X @ cm[i]
        V = X @ Om @ X.T + S_NOISE**2 * np.eye(msk.sum())
        z.append(np.linalg.solve(np.linalg.cholesky(V), y - X @ mu[i]))
    return mu, cm, csd, pred, ipred, z


def test_sdtab_matches_closed_forms(lg) -> None:
    sd = pd.read_csv(lg["out"] / report.SDTAB_FILE)
    design, blq = lg["design"], lg["blq"]
    assert list(sd.columns) == ["ID", "TIME", "DV", "PRED", "IPRED", "RES", "IRES", "IWRES", "EPRED", "NPDE", "BLQ"]
    assert len(sd) == design["mask"].sum()
    ii, jj = np.nonzero(design["mask"])
    assert list(sd["ID"]) == [lg["ids"][i] for i in ii]
    np.testing.assert_array_equal(sd["BLQ"], blq[ii, jj].astype(int))
    mu, cm, csd, pred, ipred, z = closed_form(lg)
    np.testing.assert_allclose(sd["PRED"], pred[ii, jj], rtol=1e-10, atol=1e-10)  # no Monte-Carlo in PRED
    # IPRED from importance-reweighted exact posterior draws: Monte-Carlo error only
    err = sd["IPRED"].to_numpy() - ipred[ii, jj]
    assert np.abs(err).max() < 0.06 and np.abs(err).mean() < 0.015, (np.abs(err).max(), np.abs(err).mean())
    unc = blq[ii, jj] == 0
    dv = lg["obs_c"][ii, jj, 0]
    np.testing.assert_allclose(sd["RES"][unc], (dv - pred[ii, jj])[unc], atol=1e-10)
    np.testing.assert_allclose(sd["IWRES"][unc], ((dv - sd["IPRED"]) / S_NOISE)[unc], atol=1e-10)
    assert sd.loc[~unc, ["RES", "IRES", "IWRES"]].isna().all().all()
    # NPDE: the whitened marginal residuals up to Monte-Carlo error (uncensored observations)
    zc = np.concatenate(z)
    npde = sd["NPDE"].to_numpy()
    both = unc & np.isfinite(npde)
    assert np.corrcoef(npde[both], zc[both])[0, 1] > 0.95
    assert np.median(np.abs(npde[both] - zc[both])) < 0.12
    # EPRED: the mean of the simulations, X mu for a linear model
    np.testing.assert_allclose(sd["EPRED"], pred[ii, jj], atol=0.08)
    # every NPDE (censored ones imputed) ~ N(0, 1)
    assert np.isfinite(npde).all()
    assert abs(npde.mean()) < 0.1 and abs(npde.std() - 1.0) < 0.08
    assert stats.kstest(npde, "norm").pvalue > 0.001


def test_patab_matches_closed_forms(lg) -> None:
    pa = pd.read_csv(lg["out"] / report.PATAB_FILE)
    mu, cm, csd, *_ = closed_form(lg)
    assert list(pa.columns) == ["ID", "x", "a", "a_sd_log", "b", "b_sd_log", "a_plus_b", "exp_a", "ETA_a", "ETA_b"]
    np.testing.assert_allclose(np.log(pa["a"]), cm[:, 0], atol=0.03)
    np.testing.assert_allclose(np.log(pa["b"]), cm[:, 1], atol=0.03)
    np.testing.assert_allclose(pa["a_sd_log"], csd[:, 0], rtol=0.1)
    np.testing.assert_allclose(pa[["ETA_a", "ETA_b"]], cm - mu, atol=0.03)
    np.testing.assert_allclose(pa["a_plus_b"], np.log(pa["a"]) + np.log(pa["b"]), rtol=1e-12)
    np.testing.assert_allclose(pa["x"], lg["x"])
    # eta shrinkage against the closed form
    s = json.loads((lg["out"] / report.SUMMARY_FILE).read_text())
    om = np.sqrt(np.diag(lg["pop"].covariance_matrix(lg["fit"].estimate)))
    exact = 1.0 - np.std(cm - mu, axis=0, ddof=1) / om
    assert s["shrinkage"]["eta_shrinkage"]["a"] == pytest.approx(exact[0], abs=0.02)
    iw = pd.read_csv(lg["out"] / report.SDTAB_FILE)["IWRES"].dropna()
    assert s["shrinkage"]["epsilon_shrinkage"]["y"] == pytest.approx(1.0 - iw.std(), abs=1e-9)


def test_npde_of_data_from_the_fitted_model_is_standard_normal(lg) -> None:
    model, pop, fr = lg["model"], lg["pop"], lg["fit"]
    rng = np.random.default_rng(11)
    n = 300
    x = rng.normal(size=n)
    des = {"times": np.tile(TIMES, (n, 1)), "mask": np.ones((n, T), dtype=bool)}
    phi = report.sample_population(pop, fr.estimate, n, {"x": x}, None, rng)[0]
    y = simulate_observations(model, phi, des, rng, lg["residual"])
    nd, ep, bad = report.npde(model, pop, fr.estimate, y, des, {"x": x}, None, rng, 600, lg["residual"])
    v = nd.ravel()
    assert bad == 0 and np.isfinite(v).all()
    assert abs(v.mean()) < 4 / np.sqrt(v.size)
    assert abs(v.std() - 1.0) < 0.05
    assert stats.kstest(v, "norm").pvalue > 0.001
    # and it has power: a population with twice the residual sd gives NPDEs with sd ~ 1.3
    wide = ResidualError("additive", 2 * S_NOISE)
    y2 = simulate_observations(model, phi, des, rng, wide)
    nd2, *_ = report.npde(model, pop, fr.estimate, y2, des, {"x": x}, None, rng, 600, lg["residual"])
    assert nd2.std() > 1.2


def test_estimates_random_effects_and_covariance(lg) -> None:
    out, fr = lg["out"], lg["fit"]
    est = pd.read_csv(out / report.ESTIMATES_FILE).set_index("name")
    assert list(est.index) == list(fr.parameter_names)
    # natural scale only where meaningful; RSE on that scale
    assert est.loc["beta_a", "natural"] == pytest.approx(np.exp(fr.estimate[0]))
    assert est.loc["beta_a", "rse_pct"] == pytest.approx(100 * fr.se[0])
    assert np.isnan(est.loc["B_a_x", "natural"])
    assert est.loc["B_a_x", "fold_change_per_unit"] == pytest.approx(np.exp(est.loc["B_a_x", "estimate"]))
    assert est.loc["B_a_x", "rse_pct"] == pytest.approx(100 * est.loc["B_a_x", "se"] / abs(est.loc["B_a_x",
                                                                                                   "estimate"]))
    om = np.exp(est.loc["log_omega_b", "estimate"])
    assert est.loc["log_omega_b", "cv_pct"] == pytest.approx(100 * np.sqrt(np.exp(om**2) - 1))
    assert est.loc["B_a_x", "kind"] == "covariate effect" and est.loc["log_omega_a", "kind"] == "omega"
    # covariance of the estimates = inverse Hessian; correlation and condition number
    cov = pd.read_csv(out / report.COVARIANCE_FILE, index_col=0)
    corr = pd.read_csv(out / report.CORRELATION_FILE, index_col=0)
    assert list(cov.index) == list(fr.parameter_names) == list(cov.columns)
    np.testing.assert_allclose(cov.to_numpy(), np.linalg.inv(fr.hessian), rtol=1e-8)
    np.testing.assert_allclose(np.sqrt(np.diag(cov)), fr.se, rtol=1e-8)
    np.testing.assert_allclose(np.diag(corr), 1.0)
    s = json.loads((out / report.SUMMARY_FILE).read_text())
    eig = np.linalg.eigvalsh(corr.to_numpy())
    assert s["covariance_of_estimates"]["condition_number"] == pytest.approx(eig.max() / eig.min())
    # random effects: sd with delta-method SE (= omega * SE(log omega) for a diagonal Omega), CV%, shrinkage
    re = pd.read_csv(out / report.RANDOM_EFFECTS_FILE).set_index("name")
    assert re.loc["omega_b", "estimate"] == pytest.approx(om)
    assert re.loc["omega_b", "se"] == pytest.approx(om * est.loc["log_omega_b", "se"], rel=1e-4)
    assert re.loc["omega_b", "cv_pct"] == pytest.approx(float(cv_percent(om)))
    assert re.loc["omega_a", "shrinkage_pct"] == pytest.approx(100 * s["shrinkage"]["eta_shrinkage"]["a"])
    # derived parameters: delta method, exact for a linear function
    der = pd.read_csv(out / report.DERIVED_FILE).set_index("name")
    C = cov.to_numpy()
    g = np.zeros(len(fr.estimate))
    g[[0, 1]] = 1.0  # beta_a + beta_b (covariate at 0)
    assert der.loc["a_plus_b", "estimate"] == pytest.approx(fr.estimate[0] + fr.estimate[1])
    assert der.loc["a_plus_b", "se"] == pytest.approx(np.sqrt(g @ C @ g), rel=1e-5)
    assert der.loc["exp_a", "se"] == pytest.approx(np.exp(fr.estimate[0]) * fr.se[0], rel=1e-5)
    assert der.loc["exp_a", "unit"] == "u"


def test_correlation_se_by_delta_method_matches_simulation() -> None:
    """Full Omega: the delta-method SE of a correlation agrees with the spread of the correlation over theta drawn
    from N(theta-hat, cov) (small covariance, so the linearisation holds)."""
    prior = NormalPrior(("a", "b"), np.zeros(2), np.ones(2))
    pop = PopulationModel(prior, covariance="full")
    theta = np.array([0.0, 0.0, np.log(0.5), 0.2, np.log(0.4)])
    rng = np.random.default_rng(0)
    A = rng.normal(size=(5, 5))
    cov = 1e-4 * (A @ A.T + np.eye(5))

    def corr(th: np.ndarray) -> np.ndarray:
        Om = pop.covariance_matrix(th)
        return np.array([Om[1, 0] / np.sqrt(Om[0, 0] * Om[1, 1])])

    val, se = delta_method(corr, theta, cov)
    sims = np.array([corr(t)[0] for t in rng.multivariate_normal(theta, cov, 20000)])
    assert val[0] == pytest.approx(np.median(sims), abs=2e-3)
    assert se[0] == pytest.approx(sims.std(), rel=0.05)


def test_report_md_one_minus2ll_and_the_tables(lg) -> None:
    md = (lg["out"] / report.REPORT_FILE).read_text()
    m2 = [line for line in md.splitlines() if "−2LL" in line or "-2LL" in line]
    assert any("**−2LL = 812.30**" in line for line in m2)
    assert not any("-2LL" in line for line in m2)  # the relative objective is never called -2LL
    assert "objective (relative) 2J" in md
    for head in ("### Typical values", "### Covariate effects", "### Random effects", "### Derived parameters",
                 "### Covariance of the estimates", "NPDE from 2000 simulations"):
        assert head in md, head
    s = json.loads((lg["out"] / report.SUMMARY_FILE).read_text())
    assert s["npde"]["n_simulations"] == 2000 and s["n_blq"] == int(lg["blq"].sum())
    assert s["residual_error"]["kind"] == "additive" and s["residual_error"]["add"] == S_NOISE
    assert "minus2ll_rel" not in s["information_criteria"]


def test_blq_in_the_vpc(lg) -> None:
    model, pop, fr = lg["model"], lg["pop"], lg["fit"]
    panels = report.visual_predictive_check(pop, fr.estimate, model, lg["obs_c"], lg["design"], {"x": lg["x"]},
                                            None, n_replicates=100, censoring=lg["censoring"],
                                            residual=lg["residual"], prediction_corrected=True, seed=1)
    (p,) = panels
    assert p.has_blq and p.prediction_corrected
    ok = np.isfinite(p.blq_observed)
    inside = (p.blq_observed[ok] >= p.blq_sim_lo[ok] - 1e-12) & (p.blq_observed[ok] <= p.blq_sim_hi[ok] + 1e-12)
    assert inside.mean() >= 0.6
    assert p.coverage() >= 0.6
    # quantiles among the censored values are not drawn: the 5% quantile at the lowest bin is below the limit
    assert np.isnan(p.observed[:, 0]).any()


def test_residual_error_module() -> None:
    pred = np.array([[[1.0], [4.0]], [[2.0], [0.0]]])
    assert np.allclose(ResidualError("additive", 0.5).sd(pred), 0.5)
    assert np.allclose(ResidualError("proportional", 0.0, 0.1).sd(pred), 0.1 * np.abs(pred))
    assert np.allclose(ResidualError("combined", 0.5, 0.1).sd(pred), np.sqrt(0.25 + 0.01 * pred**2))
    assert np.allclose(ResidualError("combined1", 0.5, 0.1).sd(pred), 0.5 + 0.1 * np.abs(pred))
    ind = ResidualError("additive", np.array([0.1, 0.2]), individual=True)
    assert np.allclose(ind.sd(pred)[:, :, 0], [[0.1, 0.1], [0.2, 0.2]])
    r = ResidualError.from_population(["beta_ka", "log_sigma_add", "log_sigma_prop"], np.array([0.0, np.log(0.3),
                                                                                                  np.log(0.2)]))
    assert r.kind == "combined" and float(r.add) == pytest.approx(0.3) and float(r.prop) == pytest.approx(0.2)
    assert ResidualError.from_population(["beta_ka"], np.zeros(1)) is None
    # without a population residual error the model's own simulate is used; with one, prediction + its noise
    model = LinearModel()
    rng = np.random.default_rng(0)
    des = {"times": np.tile(TIMES, (4000, 1)), "mask": np.ones((4000, T), dtype=bool)}
    phi = np.zeros((4000, 2))
    assert simulate_observations(model, phi, des, rng).std() == pytest.approx(S_NOISE, rel=0.03)
    assert simulate_observations(model, phi, des, rng, ResidualError("additive", 1.0)).std() == pytest.approx(
        1.0, rel=0.03)
    # the generic fallback: residual sd estimated from the model's simulate
    sd = monte_carlo_residual_sd(model, phi[:50], {k: v[:50] for k, v in des.items()}, rng)
    assert np.abs(sd / S_NOISE - 1).max() < 0.25 and abs(sd.mean() / S_NOISE - 1) < 0.03


def test_kmeans_bins_follow_clustered_sampling_times() -> None:
    """A sparse design with nominal times and jitter: each bin holds one nominal time (quantile bins would merge
    early times and split the crowded late ones)."""
    rng = np.random.default_rng(0)
    nominal = np.array([0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 12.0, 24.0])
    n = 300
    pick = np.sort(np.stack([rng.choice(8, 3, replace=False) for _ in range(n)]), axis=1)
    times = nominal[pick] * np.exp(0.05 * rng.standard_normal(pick.shape))
    mask = np.ones_like(times, dtype=bool)
    idx, reps = report.time_bins(times, mask, n_bins=8, method="kmeans")
    assert reps.size == 8
    for b in range(8):
        members = pick[idx == b]
        assert np.unique(members).size == 1, (b, np.unique(members))
    np.testing.assert_allclose(reps, nominal, rtol=0.1)


class TwoOutputs(LinearModel):
    """Two observation types: a parent (exp of the linear predictor / 4) and a log-scale metabolite."""

    name = "two_outputs_test"
    n_obs_types = 2
    obs_names = ("parent", "log_metabolite")

    def predict(self, phi, design):
        p = super().predict(phi, design)
        return np.concatenate([np.exp(p / 4), p], axis=2)

    def simulate(self, phi, design, rng):
        y = self.predict(phi, design) + S_NOISE * rng.standard_normal((phi.shape[0], T, 2))
        return np.where(design["mask"][..., None], y, 0.0)


def test_two_observation_types_and_covariate_strata() -> None:
    from amortized_nlme.report.diagnostics import compute_diagnostics, sdtab_frame
    from amortized_nlme.report.vpc import stratum_labels

    model = TwoOutputs()
    pop = PopulationModel(model.prior)
    rng = np.random.default_rng(2)
    n = 60
    theta = np.array([1.0, -0.5, np.log(0.5), np.log(0.3)])
    phi = report.sample_population(pop, theta, n, None, None, rng)[0]
    design = model.sample_design(n, rng)
    obs = model.simulate(phi, design, rng)
    draws = phi[:, None] + 0.05 * rng.standard_normal((n, 100, 2))
    fr = fit(pop, DrawSet(draws, model.prior), n_starts=1)
    diag = compute_diagnostics(fr, model, obs, design, None, None, rng, residual=ResidualError("additive", S_NOISE))
    sd = sdtab_frame(diag, [str(i) for i in range(n)], None)
    assert len(sd) == 2 * design["mask"].sum()
    assert set(sd["DVID"]) == {1, 2} and set(sd["DVNAME"]) == {"parent", "log_metabolite"}
    assert sd["NPDE"].notna().all() and set(diag.epsilon_shrinkage) == {"parent", "log_metabolite"}
    # strata from a covariate: its levels when few, else a median split
    sex = (np.arange(n) % 2).astype(float)
    labels, what = stratum_labels("sex", None, {"sex": sex}, n)
    assert what == "sex" and set(labels) == {"sex=0", "sex=1"}
    labels, what = stratum_labels("wt", None, {"wt": rng.normal(size=n)}, n)
    assert what == "wt (median split)" and len(set(labels)) == 2
    assert stratum_labels("group", None, None, n) == (None, "none")
    panels = report.visual_predictive_check(pop, fr.estimate, model, obs, design, None, None, n_replicates=20,
                                            strata=np.where(sex > 0, "sex=1", "sex=0"), prediction_corrected=True,
                                            residual=ResidualError("additive", S_NOISE))
    assert [(p.stratum, p.obs_name, p.log_dv) for p in panels] == [
        ("sex=0", "parent", False), ("sex=0", "log_metabolite", True), ("sex=1", "parent", False),
        ("sex=1", "log_metabolite", True)]
