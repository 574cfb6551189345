"""Marginal likelihood by importance sampling, BICc parameter counting and covariate selection, against exact answers.

Linear-Gaussian individual model: y_itd ~ N(phi_id, s^2), t = 1..T, d = 1..k (each observation type measures one
parameter), prior phi ~ N(m0, v0 I). The posterior is Gaussian (an exact stand-in for the trained estimator), and
under phi_i ~ N(mu_i, Sigma) the marginal likelihood is closed-form:
log p(y_i) = log N(ybar_i; mu_i, Sigma + s^2/T I) + sum_d [-(T-1)/2 log(2 pi s^2) - log(T)/2 - SSW_id / (2 s^2)].
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from amortized_nlme.population.marginal import (
    ImportanceSampler,
    count_observations,
    count_parameters,
    information_criteria,
    marginal_log_likelihood,
)
from amortized_nlme.model import NormalPrior
from amortized_nlme.population.objective import DrawSet
from amortized_nlme.population import PopulationModel
from amortized_nlme.population.selection import (
    build_model,
    covariate_columns,
    plot_selection,
    select_covariates,
    transfer_estimate,
    write_selection,
)

S_NOISE = 0.5
T_OBS = 4
NAMES = ("a", "b", "c")
PRIOR = NormalPrior(NAMES, np.zeros(3), np.full(3, 4.0))


class LinearGaussianModel:
    """Duck-typed individual model with the exact likelihood."""

    prior = PRIOR

    def log_likelihood(self, phi: np.ndarray, observations: np.ndarray, design: dict) -> np.ndarray:
        r = observations - phi[:, None, :]
        pt = -0.5 * (r / S_NOISE) ** 2 - math.log(S_NOISE) - 0.5 * math.log(2 * math.pi)
        return np.sum(np.where(design["mask"][..., None], pt, 0.0), axis=(1, 2))


class ExactPosterior:
    """Stand-in estimator: the exact Gaussian posterior, optionally widened and shifted (an imperfect q)."""

    def __init__(self, widen: float = 1.0, shift: float = 0.0) -> None:
        self.widen, self.shift = widen, shift

    def _moments(self, observations: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ybar = observations.mean(axis=1)
        var = 1.0 / (1.0 / PRIOR.variance + T_OBS / S_NOISE**2)
        mean = var * (PRIOR.mean / PRIOR.variance + T_OBS * ybar / S_NOISE**2)
        sd = np.sqrt(var) * self.widen
        return mean + self.shift * np.sqrt(var), np.broadcast_to(sd, mean.shape)

    def sample(self, observations, design, n_draws, *, seed=None):
        m, sd = self._moments(observations)
        z = np.random.default_rng(seed).standard_normal((m.shape[0], n_draws, m.shape[1]))
        return m[:, None, :] + sd[:, None, :] * z

    def log_prob(self, phi, observations, design):
        m, sd = self._moments(observations)
        return np.sum(stats.norm.logpdf(phi, m[:, None, :], sd[:, None, :]), axis=-1)


def simulate(n: int, beta: np.ndarray, omega_sd: np.ndarray, effects: dict, seed: int, fixed_sd: float = 0.05):
    """Data from phi_i = beta + effects + b_i (c: sd ``fixed_sd``); covariates x (continuous) and sex (0/1)."""
    rng = np.random.default_rng(seed)
    cov = {"x": 0.6 * rng.standard_normal(n), "sex_1": (rng.random(n) < 0.5).astype(float)}
    phi = beta + np.concatenate([omega_sd, [fixed_sd]]) * rng.standard_normal((n, 3))
    for (p, c), v in effects.items():
        phi[:, NAMES.index(p)] += v * cov[c]
    obs = phi[:, None, :] + S_NOISE * rng.standard_normal((n, T_OBS, 3))
    design = {"times": np.tile(np.arange(T_OBS, dtype=float), (n, 1)), "mask": np.ones((n, T_OBS), dtype=bool)}
    return obs, design, cov


def exact_loglik(pop: PopulationModel, theta: np.ndarray, obs: np.ndarray, cov: dict) -> float:
    n = obs.shape[0]
    mu = pop.design(n, cov).mean(theta)
    L = pop.cholesky(theta)
    ybar = obs.mean(axis=1)
    C = L @ L.T + S_NOISE**2 / T_OBS * np.eye(3)
    ll = stats.multivariate_normal(np.zeros(3), C).logpdf(ybar - mu).sum()
    ssw = ((obs - ybar[:, None, :]) ** 2).sum()
    ll += n * 3 * (-(T_OBS - 1) / 2 * math.log(2 * math.pi * S_NOISE**2) - 0.5 * math.log(T_OBS))
    return float(ll - ssw / (2 * S_NOISE**2))


@pytest.mark.parametrize("widen,shift,covariance,c_off", [(1.0, 0.0, "full", 0.0), (1.4, 0.5, "diagonal", 0.0),
                                                          (1.0, 0.0, "diagonal", 0.5)])
def test_importance_sampling_matches_exact_marginal(widen: float, shift: float, covariance: str, c_off: float
                                                    ) -> None:
    """Exact q, a widened and shifted q, and a theta whose fixed-effect mean sits 4 posterior sds away from the data
    (the narrow kernel of c is then in q's tail: the population and t components carry the estimate)."""
    obs, design, cov = simulate(60, np.array([0.5, -1.0, 0.3]), np.array([0.4, 0.6]), {("a", "x"): 0.3}, seed=1)
    pop = PopulationModel(PRIOR, random_effects=["a", "b"], covariance=covariance, covariates={"a": ["x"]},
                          fixed_std=0.05)
    theta = {"beta_a": 0.45, "beta_b": -0.9, "beta_c": 0.3 + c_off, "B_a_x": 0.25, "log_omega_a": math.log(0.4),
             "log_omega_b": math.log(0.6), "log_L_a": math.log(0.4), "log_L_b": math.log(0.5), "L_b_a": 0.2}
    th = np.array([theta[name] for name in pop.parameter_names])
    exact = exact_loglik(pop, th, obs, cov)
    est = ExactPosterior(widen, shift)
    res = marginal_log_likelihood(LinearGaussianModel(), est, obs, design, pop, th, cov, n_draws=2000, seed=3)
    assert res.se < 0.3
    assert abs(res.loglik - exact) < 4 * res.se + 0.02, (res.loglik, exact, res.se)
    # per individual too, and the delta-method SE is honest: standardized errors have about unit spread
    assert res.per_individual.shape == (60,)
    assert res.criteria["n_observations"] == 60 * T_OBS * 3
    assert res.ess.min() > 20


def test_sampler_reuses_posterior_draws_across_models() -> None:
    obs, design, cov = simulate(40, np.array([0.0, 0.5, -0.5]), np.array([0.3, 0.5]), {}, seed=2)
    counting = ExactPosterior()
    calls = {"sample": 0}
    orig = counting.sample

    def sample(*a, **kw):
        calls["sample"] += 1
        return orig(*a, **kw)

    counting.sample = sample
    sampler = ImportanceSampler(LinearGaussianModel(), counting, obs, design, n_draws=1500, seed=0)
    for cov_model in ({}, {"a": ["x"]}):
        pop = PopulationModel(PRIOR, random_effects=["a", "b"], covariates=cov_model)
        th = pop.initial_guess(counting.sample(obs, design, 300, seed=9), cov)
        res = sampler.evaluate(pop, th, cov)
        assert abs(res.loglik - exact_loglik(pop, th, obs, cov)) < 4 * res.se + 0.02
    assert calls["sample"] == 2 + 2  # q draws + pilot once, plus the two initial-guess calls above


def test_bicc_parameter_counting_by_hand() -> None:
    prior = NormalPrior(("ka", "ke", "V", "sigma"), np.zeros(4), np.ones(4))
    pop = PopulationModel(prior, random_effects=["ka", "ke", "V"], covariates={"V": ["lwt"], "ka": ["sex_1"],
                                                                              "sigma": ["lwt"]})
    cnt = count_parameters(pop)
    # log N: means of ka, ke, V; covariate effects on ka and V (they have random effects); 3 omegas
    assert set(cnt.random) == {"beta_ka", "beta_ke", "beta_V", "B_ka_sex_1", "B_V_lwt", "log_omega_ka",
                               "log_omega_ke", "log_omega_V"}
    # log N_tot: mean of the residual-error parameter (no random effect) and the covariate effect on it
    assert set(cnt.fixed) == {"beta_sigma", "B_sigma_lwt"}
    ic = information_criteria(-150.0, pop, n_individuals=12, n_observations=120)
    assert ic["minus2ll"] == 300.0
    assert ic["aic"] == pytest.approx(300.0 + 2 * 10)
    assert ic["bic"] == pytest.approx(300.0 + 10 * math.log(12))
    assert ic["bicc"] == pytest.approx(300.0 + 8 * math.log(12) + 2 * math.log(120))
    # full Omega over 3 random effects: 6 Cholesky entries, all log N
    full = pop.replace(covariance="full")
    assert len(count_parameters(full).random) == 5 + 6
    obs = np.zeros((12, 15, 1))
    assert count_observations(obs, {"mask": np.arange(15)[None, :] < np.full((12, 1), 10)}) == 120


def test_helpers() -> None:
    cols = covariate_columns(["x", "sex"], {"x": np.zeros(3), "sex_1": np.zeros(3)})
    assert cols == {"x": ("x",), "sex": ("sex_1",)}
    with pytest.raises(ValueError, match="not found"):
        covariate_columns(["age"], {"x": np.zeros(3)})
    base = PopulationModel(PRIOR, random_effects=["a", "b"])
    m = build_model(base, [("a", "x"), ("b", "sex")], cols)
    assert m.covariates == {"a": ("x",), "b": ("sex_1",)}
    th = np.arange(base.n_theta, dtype=float) * 0.1
    moved = transfer_estimate(base, th, m)
    named = dict(zip(m.parameter_names, moved))
    assert named["B_a_x"] == 0.0 and named["beta_b"] == pytest.approx(0.1)


@pytest.fixture(scope="module")
def covariate_problem():
    effects = {("a", "x"): 0.5, ("b", "sex"): 0.6}
    obs, design, cov = simulate(150, np.array([0.5, -1.0, 0.3]), np.array([0.3, 0.3]),
                                {("a", "x"): 0.5, ("b", "sex_1"): 0.6}, seed=5)
    est = ExactPosterior()
    draws = DrawSet(est.sample(obs, design, 300, seed=11), PRIOR)
    base = PopulationModel(PRIOR, random_effects=["a", "b"]).with_fixed_std_from_draws(draws.draws, 0.3)
    return obs, design, cov, est, draws, base, effects


def test_exhaustive_selection_recovers_effects(covariate_problem, tmp_path) -> None:
    obs, design, cov, est, draws, base, effects = covariate_problem
    sampler = ImportanceSampler(LinearGaussianModel(), est, obs, design, n_draws=1000, pilot_draws=draws.draws,
                                seed=1)
    res = select_covariates(base, draws, cov, ["x", "sex"], count_observations(obs, design), sampler=sampler,
                            top_k=2, seed=0)
    assert res.strategy == "exhaustive" and res.n_fits == 16
    assert set(res.selected.relations) == set(effects)
    # absolute criteria of the selected model agree with the exact likelihood at its estimate
    sel = res.selected
    exact = exact_loglik(sel.model, sel.estimate, obs, cov)
    assert abs(sel.marginal.loglik - exact) < 4 * sel.marginal.se + 0.05
    # J + log-likelihood is one constant for every model (J drops sum_i log p(y_i)), up to J's Monte-Carlo error
    done = [v for v in res.visited if v.marginal is not None]
    consts = [v.objective + exact_loglik(v.model, v.estimate, obs, cov) for v in done]
    assert len(done) >= 3 and np.ptp(consts) < 3 * max(v.objective_mc_se for v in done)
    out = write_selection(res, tmp_path)
    assert (out / "selection.png").stat().st_size > 1000 and "base" in (out / "selection.md").read_text()


def test_marginal_candidates_include_models_tied_within_monte_carlo_error() -> None:
    from amortized_nlme.population.selection import SelectionResult, VisitedModel, marginal_candidates

    def visited(label: str, bicc: float, se: float, order: int) -> VisitedModel:
        return VisitedModel(relations=((label, "x"),) if label != "base" else (), model=None, estimate=np.zeros(1),
                            objective=bicc / 2, objective_mc_se=se, bicc_rel=bicc, aic_rel=bicc, bic_rel=bicc,
                            n_theta=1, n_converged=1, n_starts=1, time_s=0.0, order=order)

    base = visited("base", 30.0, 0.5, 0)
    models = [base] + [visited(f"p{i}", b, se, i + 1) for i, (b, se) in
                       enumerate([(0.0, 0.5), (1.0, 0.5), (1.5, 0.5), (7.0, 0.5), (9.0, 2.0), (40.0, 2.0)])]
    res = SelectionResult(strategy="exhaustive", candidates={}, parameters=(), relations=(), visited=models,
                          selected=models[1], base=base, n_fits=len(models), time_s=0.0, n_individuals=10,
                          n_observations=100)
    labels = [v.label for v in marginal_candidates(res, top_k=2)]
    # top 2 + base, then p3 (gap 1.5 < 2 + 3 * 2 * 0.71), p5 (gap 9 < 2 + 3 * 2 * 2.06); not p4 (gap 7 > 6.2), p6
    assert labels == ["p0~x", "p1~x", "base", "p2~x", "p4~x"]
    assert len(marginal_candidates(res, top_k=2, max_models=3)) == 3


def test_stepwise_selection_recovers_effects(covariate_problem, tmp_path) -> None:
    obs, design, cov, est, draws, base, effects = covariate_problem
    res = select_covariates(base, draws, cov, ["x", "sex"], count_observations(obs, design), strategy="stepwise")
    assert set(res.selected.relations) == set(effects)
    assert res.n_fits < 16 and res.steps[0]["direction"] == "forward"
    plot_selection(res, tmp_path / "s.png")
