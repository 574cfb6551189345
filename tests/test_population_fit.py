"""Population models, the Monte-Carlo objective and the pyPESTO fit, checked against exact answers.

Linear-Gaussian individual model: ybar_i | phi_i ~ N(phi_i, e2 I) (the sufficient statistic of m observations with
noise sd s, e2 = s^2/m), broad prior phi ~ N(mu0, tau0^2). The posterior is Gaussian, so exact posterior draws are
available, and under phi_i ~ N(beta + B x_i, Omega) the marginal ybar_i ~ N(beta + B x_i, Omega + e2 I) gives the exact
MLE in closed form (equal designs) and the exact objective: J(theta) = -sum log N(ybar; ., Omega + e2) +
sum log N(ybar; mu0, tau0^2 + e2).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import optimize, stats

from amortized_nlme.population.fit import fit, hessian_fd, mc_standard_errors, reevaluate
from amortized_nlme.model import NormalPrior
from amortized_nlme.population.objective import DrawSet, PopulationObjective
from amortized_nlme.population import PopulationModel, dummy_columns

K = 2
N = 200
M = 2000
S_NOISE, M_OBS = 0.5, 4
E2 = S_NOISE**2 / M_OBS
MU0 = np.zeros(K)
TAU0 = np.full(K, 2.0)


class CountingPrior(NormalPrior):
    """NormalPrior that counts how often its density is evaluated (to prove draws are prepared once)."""

    calls = 0

    def log_prob(self, phi: np.ndarray) -> np.ndarray:
        CountingPrior.calls += 1
        return super().log_prob(phi)


class LinearGaussian:
    """Data, exact posterior draws and exact likelihood of the linear-Gaussian population problem."""

    def __init__(self, seed: int = 1) -> None:
        rng = np.random.default_rng(seed)
        self.x = 0.5 * rng.standard_normal(N)
        self.groups = np.where(rng.random(N) < 0.4, "g2", "g1")
        beta = np.array([0.5, -1.0])
        Om = np.array([[0.16, 0.6 * 0.4 * 0.6], [0.6 * 0.4 * 0.6, 0.36]])
        phi = beta + 0.3 * self.x[:, None] * np.array([1.0, 0.0]) + rng.multivariate_normal(np.zeros(K), Om, N)
        self.ybar = phi + np.sqrt(E2) * rng.standard_normal((N, K))
        self.post_var = 1.0 / (1.0 / TAU0**2 + 1.0 / E2)
        self.post_mean = self.post_var * (MU0 / TAU0**2 + self.ybar / E2)
        self.prior = CountingPrior(("a", "b"), MU0, TAU0**2)

    def draws(self, seed: int, M_draws: int = M) -> DrawSet:
        g = np.random.default_rng(1000 + seed)
        return DrawSet(self.post_mean[:, None, :] + np.sqrt(self.post_var) * g.standard_normal((N, M_draws, K)), self.prior)

    def exact_nll_diag(self, theta: np.ndarray) -> float:
        """Exact J for the diagonal model without covariates, theta = (beta, log omega)."""
        b, om = theta[:K], np.exp(theta[K:])
        return float(
            -stats.norm.logpdf(self.ybar, b, np.sqrt(om**2 + E2)).sum()
            + stats.norm.logpdf(self.ybar, MU0, np.sqrt(TAU0**2 + E2)).sum()
        )

    def exact_mle_diag(self) -> np.ndarray:
        return np.r_[self.ybar.mean(0), 0.5 * np.log(self.ybar.var(0) - E2)]

    def exact_profile_ci(self, p: int, level: float) -> tuple[float, float]:
        """Exact profile-likelihood interval for theta[p] of the diagonal model (closed-form inner maximisation)."""
        c = p % K
        y = self.ybar[:, c]

        def prof(v: float) -> float:
            if p < K:  # beta fixed: omega^2 = mean((y - b)^2) - e2
                var = max(np.mean((y - v) ** 2), E2 + 1e-12)
                return float(-stats.norm.logpdf(y, v, np.sqrt(var)).sum())
            return float(-stats.norm.logpdf(y, y.mean(), np.sqrt(np.exp(2 * v) + E2)).sum())

        th = self.exact_mle_diag()[p]
        fmin = prof(th)
        q = stats.chi2.ppf(level, 1)
        g = lambda v: 2 * (prof(v) - fmin) - q  # noqa: E731
        return optimize.brentq(g, th - 2.0, th), optimize.brentq(g, th, th + 2.0)


@pytest.fixture(scope="module")
def lg() -> LinearGaussian:
    return LinearGaussian()


@pytest.fixture(scope="module")
def lg_fit(lg: LinearGaussian):
    ds = lg.draws(0)
    fr = fit(PopulationModel(lg.prior), ds, n_starts=4, seed=3, profile=True)
    mc_se, _ = mc_standard_errors(fr, lambda r: lg.draws(r + 1), n_sets=4)
    return fr, mc_se


# ---------------------------------------------------------------- (a) exact MLE, objective value, profile CIs
def test_mle_matches_exact_within_mc_error(lg: LinearGaussian, lg_fit) -> None:
    fr, mc_se = lg_fit
    exact = lg.exact_mle_diag()
    assert fr.n_converged == fr.n_starts
    assert np.all(np.abs(fr.estimate - exact) < 5 * mc_se + 2e-3), (fr.estimate, exact, mc_se)
    # the Monte-Carlo error is small compared with the statistical error
    assert np.all(mc_se < 0.2 * fr.se)


def test_objective_value_and_mc_se(lg: LinearGaussian, lg_fit) -> None:
    fr, _ = lg_fit
    d = fr.diagnostics
    exact = lg.exact_nll_diag(fr.estimate)
    assert abs(fr.fval - d.jensen_bias - exact) < 4 * d.mc_se, (fr.fval, exact, d.mc_se)
    assert 0 < d.mc_se < 1.0
    assert d.low_ess == [] and np.median(d.ess) > 500


def test_profile_ci_match_exact_profiles(lg: LinearGaussian, lg_fit) -> None:
    fr, mc_se = lg_fit
    for level in (0.8, 0.9, 0.95):
        ci = fr.profile_ci[level]
        for p in range(2 * K):
            lo, hi = lg.exact_profile_ci(p, level)
            tol = 5 * mc_se[p] + 0.01 * (hi - lo) + 2e-3
            assert abs(ci[p, 0] - lo) < tol and abs(ci[p, 1] - hi) < tol, (level, p, ci[p], (lo, hi), tol)
    assert fr.result.profile_result.list[-1][0] is not None


def test_reevaluate_on_fresh_larger_draws(lg: LinearGaussian, lg_fit) -> None:
    fr, _ = lg_fit
    re = reevaluate(fr, lg.draws(99, M_draws=4000))
    assert re.diagnostics.mc_se < fr.diagnostics.mc_se
    assert abs(re.fval - fr.fval) < 4 * np.hypot(re.diagnostics.mc_se, fr.diagnostics.mc_se)


# ---------------------------------------------------------------- (d) Wald SE vs exact curvature
def test_wald_se_matches_exact_curvature(lg: LinearGaussian, lg_fit) -> None:
    fr, _ = lg_fit
    th = lg.exact_mle_diag()
    H = np.empty((2 * K, 2 * K))
    for i in range(2 * K):  # exact function, 4th-order central differences of the exact likelihood
        for j in range(2 * K):
            h = 1e-3
            ei, ej = np.eye(2 * K)[i] * h, np.eye(2 * K)[j] * h
            H[i, j] = (
                lg.exact_nll_diag(th + ei + ej) - lg.exact_nll_diag(th + ei - ej)
                - lg.exact_nll_diag(th - ei + ej) + lg.exact_nll_diag(th - ei - ej)
            ) / (4 * h * h)
    se_exact = np.sqrt(np.diag(np.linalg.inv(H)))
    np.testing.assert_allclose(fr.se, se_exact, rtol=0.05)
    lo, hi = fr.wald_ci[0.95].T
    np.testing.assert_allclose(hi - lo, 2 * 1.959964 * fr.se, rtol=1e-5)


# ---------------------------------------------------------------- (c) switching models on the same draws
def test_switching_models_reuses_draws_and_matches_exact(lg: LinearGaussian) -> None:
    calls0 = CountingPrior.calls
    ds = lg.draws(7)
    assert CountingPrior.calls == calls0 + 1
    log_prior, phi_t = ds.log_prior, ds.phi_t
    y = lg.ybar
    diag = PopulationModel(lg.prior)
    full = diag.replace(covariance="full")
    cov = diag.replace(covariates={"a": ["x"]})
    grp = diag.replace(group_specific=["b"], groups=["g1", "g2"])
    fits = {}
    for name, model in [("diag", diag), ("full", full), ("cov", cov), ("grp", grp)]:
        fits[name] = fit(model, ds, covariates={"x": lg.x}, groups=lg.groups, n_starts=2, wald=False)
        assert fits[name].objective.draws is ds
    assert ds.log_prior is log_prior and ds.phi_t is phi_t
    assert CountingPrior.calls == calls0 + 1 and ds.n_prior_evaluations == 1

    tol = 0.02  # several Monte-Carlo SEs at N=200, M=2000 (see test_mle_matches_exact_within_mc_error)
    # full Omega: ybar ~ N(beta, Omega + e2 I) -> Omega_hat = ML covariance of ybar - e2 I
    C = np.cov(y, rowvar=False, bias=True) - E2 * np.eye(K)
    np.testing.assert_allclose(fits["full"].estimate[:K], y.mean(0), atol=tol)
    np.testing.assert_allclose(full.covariance_matrix(fits["full"].estimate), C, atol=tol)
    corr = fits["full"].natural()["correlation"]["matrix"][0][1]
    assert abs(corr - C[0, 1] / np.sqrt(C[0, 0] * C[1, 1])) < 0.05
    # covariate on a (diagonal Omega): OLS is the exact MLE of the mean, omega^2 = residual variance - e2
    X = np.c_[np.ones(N), lg.x]
    coef = np.linalg.lstsq(X, y[:, 0], rcond=None)[0]
    resid = np.c_[y[:, 0] - X @ coef, y[:, 1] - y[:, 1].mean()]
    est = dict(zip(cov.parameter_names, fits["cov"].estimate))
    assert abs(est["beta_a"] - coef[0]) < tol and abs(est["B_a_x"] - coef[1]) < 2 * tol
    np.testing.assert_allclose(np.diag(cov.covariance_matrix(fits["cov"].estimate)), np.mean(resid**2, 0) - E2, atol=tol)
    assert fits["cov"].fval < fits["diag"].fval and fits["full"].fval < fits["diag"].fval  # nested, same draws
    # group-specific mean of b: per-group means
    est = dict(zip(grp.parameter_names, fits["grp"].estimate))
    for g in ("g1", "g2"):
        assert abs(est[f"beta_b[{g}]"] - y[lg.groups == g, 1].mean()) < tol


# ---------------------------------------------------------------- (b) analytic gradient vs finite differences
def _variants(prior: NormalPrior) -> dict[str, PopulationModel]:
    return {
        "diagonal": PopulationModel(prior),
        "full": PopulationModel(prior, covariance="full"),
        "no_random_effect_diag": PopulationModel(prior, random_effects=["a", "c"], fixed_std={"b": 0.2, "d": 0.3}),
        "no_random_effect_full": PopulationModel(prior, random_effects=["b", "c", "d"], covariance="full", fixed_std=0.25),
        "covariates": PopulationModel(prior, covariance="full", covariates={"a": ["wt", "sex_M"], "c": ["wt"], "d": ["site_2"]}),
        "groups": PopulationModel(prior, group_specific=["b", "d"], groups=["eGFP", "d2eGFP"], covariates={"b": ["wt"]}),
        "groups_full_fixed": PopulationModel(
            prior, group_specific=["a"], groups=["eGFP", "d2eGFP"], covariance="full", random_effects=["a", "b", "d"]
        ),
    }


VARIANTS = ["diagonal", "full", "no_random_effect_diag", "no_random_effect_full", "covariates", "groups", "groups_full_fixed"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradient_matches_finite_differences(variant: str) -> None:
    rng = np.random.default_rng(VARIANTS.index(variant))
    k, n, m = 4, 30, 25
    prior = NormalPrior(("a", "b", "c", "d"), np.array([0.0, -1.0, 1.0, 0.5]), np.array([1.0, 2.0, 0.5, 1.5]))
    draws = prior.mean + 0.7 * prior.std * rng.standard_normal((n, 1, k)) + 0.3 * rng.standard_normal((n, m, k))
    ds = DrawSet(draws, prior)
    covs = {"wt": 0.3 * rng.standard_normal(n), **dummy_columns(rng.choice(["F", "M"], n), "sex"),
            **dummy_columns(rng.integers(1, 4, n), "site", reference=1)}
    groups = rng.choice(["eGFP", "d2eGFP"], n)
    model = _variants(prior)[variant]
    obj = PopulationObjective(model, ds, covs, groups)
    lb, ub = model.init_bounds()
    for _ in range(2):
        th = rng.uniform(lb, ub)
        f, g = obj.value_and_grad(th)
        assert f == pytest.approx(obj.value(th), rel=1e-13)
        fd = np.empty_like(th)
        for i in range(th.size):
            h = 1e-5 * max(1.0, abs(th[i]))
            e = np.zeros_like(th)
            e[i] = h
            fd[i] = (obj.value(th + e) - obj.value(th - e)) / (2 * h)
        np.testing.assert_allclose(g, fd, rtol=1e-5, atol=1e-5 * np.max(np.abs(g)))


def test_hessian_fd_symmetric_positive_definite(lg: LinearGaussian, lg_fit) -> None:
    fr, _ = lg_fit
    H = hessian_fd(fr.objective, fr.estimate)
    assert np.allclose(H, H.T) and np.all(np.linalg.eigvalsh(H) > 0)


# ---------------------------------------------------------------- population model config and diagnostics
def test_config_round_trip_and_toml(tmp_path) -> None:
    prior = NormalPrior(("V", "CL", "ka"), np.zeros(3), np.ones(3))
    toml = tmp_path / "pop.toml"
    toml.write_text(
        'random_effects = ["V", "CL"]\ncovariance = "full"\n'
        '[covariates]\nV = ["wt"]\nCL = ["wt", "sex_F"]\n'
        '[groups]\ncolumn = "study"\nlevels = ["A", "B"]\nspecific = ["ka"]\n'
        "[fixed_std]\nka = 0.1\n"
    )
    model = PopulationModel.load(toml, prior)
    assert model.parameter_names == (
        "beta_V", "beta_CL", "beta_ka[A]", "beta_ka[B]", "B_V_wt", "B_CL_wt", "B_CL_sex_F",
        "log_L_V", "L_CL_V", "log_L_CL",
    )
    assert model.group_column == "study" and model.fixed_std == {"ka": 0.1}
    again = PopulationModel.from_dict(json.loads(json.dumps(model.to_dict())))
    assert again.parameter_names == model.parameter_names and again.to_dict() == model.to_dict()
    lb, ub = model.bounds()
    assert np.all(lb < ub)
    with pytest.raises(ValueError, match="unknown population model options"):
        PopulationModel.from_dict({"covariance": "full", "typo": 1}, prior)
    with pytest.raises(ValueError, match="covariate columns"):
        model.design(5, {}, ["A"] * 5)


def test_low_ess_individuals_are_reported(lg: LinearGaussian) -> None:
    model = PopulationModel(lg.prior)
    obj = PopulationObjective(model, lg.draws(5, M_draws=50))
    th = lg.exact_mle_diag()
    th[K:] = np.log(0.02)  # population far narrower than the posteriors: weights degenerate
    d = obj.diagnostics(th)
    assert len(d.low_ess) > N // 2 and d.ess.min() < 5
    transformed = model.transform(th)
    assert transformed["omega_sd"]["a"] == pytest.approx(0.02)
    assert transformed["natural_mean"]["a"] == pytest.approx(np.exp(th[0]))


def test_take_draws_keeps_the_kind_of_weights() -> None:
    """Disjoint draw subsets (Monte-Carlo error of the estimates) keep exact-likelihood weights when they had them."""
    from amortized_nlme.model import NormalPrior

    prior = NormalPrior(("a", "b"), np.zeros(2), np.ones(2))
    rng = np.random.default_rng(0)
    draws = rng.standard_normal((5, 12, 2))
    log_q, log_lik = rng.standard_normal((5, 12)), rng.standard_normal((5, 12))
    exact = DrawSet.with_likelihood(draws, prior, log_q, log_lik)
    sub = exact.take_draws(slice(1, None, 3))
    assert sub.kind == "likelihood" and sub.M == 4
    np.testing.assert_array_equal(sub.draws, draws[:, 1::3])
    np.testing.assert_allclose(sub.log_prior, (log_q - log_lik)[:, 1::3])
    amortized = DrawSet(draws, prior).take_draws(slice(0, None, 2))
    assert amortized.kind == "amortized"
    np.testing.assert_allclose(amortized.log_prior, prior.log_prob(draws[:, ::2]))


def test_concatenate_keeps_weights_and_refuses_mismatches() -> None:
    """Extending a draw set with fresh draws keeps both parts' weights (exact-likelihood ones included)."""
    from amortized_nlme.model import NormalPrior

    prior = NormalPrior(("a", "b"), np.zeros(2), np.ones(2))
    rng = np.random.default_rng(1)
    parts = [DrawSet.with_likelihood(d, prior, rng.standard_normal(d.shape[:2]), rng.standard_normal(d.shape[:2]))
             for d in (rng.standard_normal((4, 6, 2)), rng.standard_normal((4, 10, 2)))]
    both = DrawSet.concatenate(parts)
    assert both.kind == "likelihood" and both.M == 16
    np.testing.assert_array_equal(both.draws, np.concatenate([p.draws for p in parts], axis=1))
    np.testing.assert_array_equal(both.log_prior, np.concatenate([p.log_prior for p in parts], axis=1))
    with pytest.raises(ValueError, match="same individuals"):
        DrawSet.concatenate([parts[0], DrawSet(rng.standard_normal((4, 6, 2)), prior)])  # other weights
    three = DrawSet.with_likelihood(rng.standard_normal((3, 6, 2)), prior, np.zeros((3, 6)), np.zeros((3, 6)))
    with pytest.raises(ValueError, match="same individuals"):
        DrawSet.concatenate([parts[0], three])  # other individuals


def test_draws_factor_closed_form() -> None:
    """The predicted draw multiplier: pure variance needs (mc_se / (t se))^2, pure bias |bias| / (t se)."""
    from amortized_nlme.population.fit import MonteCarloError

    se = np.array([1.0, 2.0])
    var_only = MonteCarloError(100, 4, se=np.array([0.6, 0.0]), bias=np.zeros(2), estimates=np.zeros((4, 2)))
    assert var_only.draws_factor(se, 0.3) == pytest.approx((0.6 / 0.3) ** 2)
    bias_only = MonteCarloError(100, 4, se=np.zeros(2), bias=np.array([0.0, -1.2]), estimates=np.zeros((4, 2)))
    assert bias_only.draws_factor(se, 0.3) == pytest.approx(1.2 / 0.6)
    assert bias_only.draws_factor(se, 0.9) == 1.0  # already small enough
    np.testing.assert_allclose(bias_only.ratio(se), [0.0, 0.6])
    assert np.isnan(bias_only.ratio(np.array([np.nan, 2.0]))[0])


@pytest.fixture(scope="module")
def lg_large() -> LinearGaussian:
    """2,000 individuals: the statistical SE is small, so the O(1/M) Monte-Carlo bias of a few draws dominates."""
    global N
    saved, N = N, 2000
    try:
        return LinearGaussian(seed=4)
    finally:
        N = saved


def test_jackknife_bias_matches_the_actual_monte_carlo_bias(lg_large: LinearGaussian) -> None:
    """With 32 exact posterior draws the fitted omegas are biased upwards (log of a Monte-Carlo mean); the jackknife
    from 4 disjoint subsets recovers most of that bias (averaged over draw sets), and none where there is none."""
    from amortized_nlme.population.fit import monte_carlo_error

    exact = lg_large.exact_mle_diag()
    devs, jack = [], []
    for seed in range(6):
        ds = DrawSet(lg_large.post_mean[:, None, :] + np.sqrt(lg_large.post_var)
                     * np.random.default_rng(50 + seed).standard_normal((lg_large.ybar.shape[0], 32, K)),
                     lg_large.prior)
        fr = fit(PopulationModel(lg_large.prior), ds, n_starts=1, seed=3)
        mce = monte_carlo_error(fr, ds, n_sets=4)
        assert fr.mc_bias is mce.bias and fr.mc_se is mce.se
        devs.append(fr.estimate - exact)
        jack.append(mce.bias)
    dev, jk = np.mean(devs, axis=0), np.mean(jack, axis=0)
    omegas = slice(K, 2 * K)
    assert np.all(dev[omegas] > 3 * np.std(devs, axis=0)[omegas] / np.sqrt(6))  # the bias is real ...
    assert np.all(jk[omegas] > 0.5 * dev[omegas]) and np.all(jk[omegas] < 1.5 * dev[omegas])  # ... and estimated
    assert np.all(np.abs(jk[:K]) < 0.2 * fr.se[:K])  # the means are unbiased: sample means of the draws
    corrected = np.mean(np.array(devs) - np.array(jack), axis=0)
    assert np.all(np.abs(corrected[omegas]) < 0.5 * dev[omegas])


def test_fit_with_enough_draws_adds_draws_until_the_target(lg_large: LinearGaussian) -> None:
    """Starting from 16 draws (Monte-Carlo error comparable to the statistical SE) the fit asks for fresh draws
    until every estimate's Monte-Carlo error is below the target; the estimate moves towards the exact MLE."""
    from amortized_nlme.population.fit import fit_with_enough_draws

    n = lg_large.ybar.shape[0]

    def exact_draws(m: int, seed: int) -> DrawSet:
        eps = np.random.default_rng(seed).standard_normal((n, m, K))
        return DrawSet(lg_large.post_mean[:, None, :] + np.sqrt(lg_large.post_var) * eps, lg_large.prior)

    asked: list[tuple[int, int]] = []

    def more(m: int, round_: int) -> DrawSet:
        asked.append((m, round_))
        return exact_draws(m, 1000 + round_)

    pop = PopulationModel(lg_large.prior)
    first = exact_draws(16, 7)
    fr, final, mce, rounds = fit_with_enough_draws(pop, first, more, n_starts=3, seed=1, target=0.3, max_draws=4000)
    exact = lg_large.exact_mle_diag()
    assert rounds[0].n_draws == 16 and rounds[0].max_ratio > 0.3
    assert asked and asked[0][1] == 1 and [r for _, r in asked] == list(range(1, len(asked) + 1))
    assert final.M == 16 + sum(m for m, _ in asked) == rounds[-1].n_draws
    assert rounds[-1].max_ratio <= 0.3 or final.M >= 4000
    np.testing.assert_array_equal(final.draws[:, :16], first.draws)  # extended, not replaced
    assert fr.pilot is not None and fr.pilot.n_draws == 16 and fr.pilot.n_starts == 3
    pilot_err = np.abs(fr.pilot.result.optimize_result.list[0].x - exact)
    assert np.max(np.abs(fr.estimate - exact) / fr.se) < np.max(pilot_err / fr.se)
    assert np.all(np.abs(fr.estimate - exact) < 4 * mce.rms + 0.5 * fr.se)
    # with enough draws from the start nothing is added and there is no pilot
    fr2, ds2, _, rounds2 = fit_with_enough_draws(pop, exact_draws(1500, 9), more, n_starts=2, seed=1)
    assert len(rounds2) == 1 and ds2.M == 1500 and fr2.pilot is None and rounds2[0].max_ratio <= 0.3


def test_conditional_moments_and_shrinkage_match_the_exact_posterior(lg: LinearGaussian) -> None:
    """Under phi_i ~ N(beta, omega^2) and ybar_i | phi_i ~ N(phi_i, e2) the conditional law of phi_i is Gaussian with
    variance v = 1 / (1/omega^2 + 1/e2) and mean v (beta/omega^2 + ybar_i/e2): the reweighted draws reproduce it, and
    eta shrinkage is exactly 1 - (v / e2) sd(ybar) / omega."""
    ds = lg.draws(11, 4000)
    pop = PopulationModel(lg.prior)
    theta = np.r_[0.4, -0.9, np.log(0.45), np.log(0.55)]
    beta, omega = theta[:K], np.exp(theta[K:])
    obj = PopulationObjective(pop, ds)
    mean, sd = obj.conditional_moments(theta, block=64)
    v = 1.0 / (1.0 / omega**2 + 1.0 / E2)
    exact_mean = v * (beta / omega**2 + lg.ybar / E2)
    w = obj.weights(theta)
    np.testing.assert_allclose(w.sum(axis=1), 1.0)
    tol = 5 * np.sqrt(v) / np.sqrt(1.0 / np.sum(w * w, axis=1))[:, None]  # 5 MC SEs from each individual's ESS
    assert np.all(np.abs(mean - exact_mean) < tol)
    np.testing.assert_allclose(np.median(sd, axis=0), np.sqrt(v), rtol=0.03)
    shrink = obj.shrinkage(theta, mean)
    exact_shrink = 1.0 - (v / E2) * np.std(lg.ybar, axis=0, ddof=1) / omega
    np.testing.assert_allclose([shrink["a"], shrink["b"]], exact_shrink, atol=0.01)
    assert obj.shrinkage(theta) == pytest.approx(shrink, abs=1e-9)
    # a parameter without random effect has no shrinkage
    assert set(PopulationObjective(PopulationModel(lg.prior, random_effects=["a"]), ds).shrinkage(theta[:3])) == {"a"}
