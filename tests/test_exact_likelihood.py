"""Exact-likelihood weights with residual-error sds as population parameters, against closed forms.

Model: y_it = psi_i + e_it, e_it ~ N(0, s_t^2), psi_i ~ N(beta, omega^2) with s_t = a (additive), b |f| (proportional
in the prediction f = psi) or sqrt(a^2 + b^2 f^2) (combined). The additive case has a closed-form marginal
likelihood (y_i is Gaussian with covariance a^2 I + omega^2 11^T); every other case is checked against 1-D numerical
integration over psi_i. The draws come from a deliberately poor but covering proposal q_i (wider than the posterior,
off-centre), so the test shows the exact weights p(y|psi)/q(psi|y) recover the likelihood whatever the proposal.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import integrate, optimize, stats

from amortized_nlme.model import NormalPrior
from amortized_nlme.population import DrawSet, PopulationModel, PopulationObjective, fit
from amortized_nlme.population.residual import ResidualError, error_statistics

BETA, OMEGA, A_SD, B_SD = 1.0, 0.5, 0.3, 0.15


def study(n: int, T: int, seed: int, kind: str = "additive", lloq: float | None = None):
    """Data ``y [n, T]`` (censored values replaced by the limit) and the censoring flags."""
    rng = np.random.default_rng(seed)
    psi = BETA + OMEGA * rng.standard_normal(n)
    f = np.broadcast_to(psi[:, None], (n, T))
    sd = {"additive": A_SD * np.ones_like(f), "proportional": B_SD * np.abs(f),
          "combined": np.sqrt(A_SD**2 + (B_SD * f) ** 2)}[kind]
    y = f + sd * rng.standard_normal((n, T))
    cens = np.zeros_like(y, dtype=bool) if lloq is None else y < lloq
    if lloq is not None:
        y = np.where(cens, lloq, y)
    return y, cens


def drawset(y: np.ndarray, cens: np.ndarray, kind: str, M: int, seed: int, force_pointwise: bool = False):
    """Draws from a covering proposal N(ybar + 0.2, (3 * posterior sd)^2) with exact weights."""
    rng = np.random.default_rng(seed)
    n, T = y.shape
    m = y.mean(axis=1) + 0.2
    s = 3.0 * 0.5 / np.sqrt(T)
    psi = m[:, None] + s * rng.standard_normal((n, M))
    log_q = stats.norm.logpdf(psi, m[:, None], s)
    observed = np.ones_like(y, dtype=bool)
    errors = error_statistics(kind, psi[:, :, None] * np.ones((1, 1, T)), y, observed, cens,
                              force_pointwise=force_pointwise)
    prior = NormalPrior(("psi",), np.zeros(1), np.ones(1) * 4.0)
    return DrawSet(psi[:, :, None], prior, log_prior=log_q, kind="likelihood", errors=errors), prior


def residual_spec(kind: str) -> ResidualError:
    names = {"additive": ("a",), "proportional": ("b",), "combined": ("a", "b")}[kind]
    return ResidualError(kind, names, tuple(np.log([0.3] * len(names))), (2.0,) * len(names))


def exact_additive_loglik(y: np.ndarray, beta: float, omega: float, a: float) -> float:
    """Closed form: y_i ~ N(beta 1, a^2 I + omega^2 1 1^T)."""
    n, T = y.shape
    r = y - beta
    denom = a * a + T * omega * omega
    quad = (np.sum(r * r, axis=1) - omega * omega * np.sum(r, axis=1) ** 2 / denom) / (a * a)
    logdet = 2 * (T - 1) * np.log(a) + np.log(denom)
    return float(np.sum(-0.5 * (quad + logdet + T * np.log(2 * np.pi))))


def numeric_loglik(y: np.ndarray, cens: np.ndarray, kind: str, beta: float, omega: float, a: float, b: float
                   ) -> float:
    """1-D integration over psi_i of prod_t p(y_it | psi_i) N(psi_i; beta, omega^2), censored points as P(y < L)."""
    total = 0.0
    for i in range(y.shape[0]):
        def integrand(psi: float, i: int = i) -> float:
            sd = {"additive": a, "proportional": b * abs(psi), "combined": np.sqrt(a * a + (b * psi) ** 2)}[kind]
            lp = np.where(cens[i], stats.norm.logcdf((y[i] - psi) / sd), stats.norm.logpdf(y[i], psi, sd))
            return float(np.exp(lp.sum() + stats.norm.logpdf(psi, beta, omega)))
        val, _ = integrate.quad(integrand, beta - 8 * omega, beta + 8 * omega, points=[float(np.mean(y[i]))],
                                limit=200, epsabs=0.0, epsrel=1e-10)
        total += np.log(val)
    return total


@pytest.mark.parametrize("pointwise", [False, True])
def test_objective_is_the_exact_likelihood_additive(pointwise: bool) -> None:
    y, cens = study(40, 6, seed=1)
    ds, prior = drawset(y, cens, "additive", M=4000, seed=2, force_pointwise=pointwise)
    pop = PopulationModel(prior, random_effects=["psi"], residual=residual_spec("additive"))
    obj = PopulationObjective(pop, ds)
    assert pop.parameter_names == ("beta_psi", "log_omega_psi", "log_a")
    for beta, omega, a in [(1.0, 0.5, 0.3), (0.8, 0.7, 0.25), (1.2, 0.3, 0.4)]:
        theta = np.array([beta, np.log(omega), np.log(a)])
        diag = obj.diagnostics(theta)
        exact = exact_additive_loglik(y, beta, omega, a)
        assert abs(-diag.value - exact) < 4 * diag.mc_se + 0.05, (beta, omega, a, -diag.value, exact, diag.mc_se)


@pytest.mark.parametrize("kind, lloq", [("proportional", None), ("combined", None), ("additive", 0.8),
                                        ("combined", 0.8)])
def test_objective_matches_numerical_integration(kind: str, lloq: float | None) -> None:
    y, cens = study(12, 5, seed=3, kind=kind, lloq=lloq)
    if lloq is not None:
        assert 0 < cens.sum() < cens.size
    ds, prior = drawset(y, cens, kind, M=20000, seed=4)
    assert ds.errors.mode == ("sufficient" if kind == "proportional" and lloq is None else "pointwise")
    pop = PopulationModel(prior, random_effects=["psi"], residual=residual_spec(kind))
    obj = PopulationObjective(pop, ds)
    theta = np.array([BETA, np.log(OMEGA)] + [np.log(v) for v in {"additive": [A_SD], "proportional": [B_SD],
                                                                   "combined": [A_SD, B_SD]}[kind]])
    diag = obj.diagnostics(theta)
    exact = numeric_loglik(y, cens, kind, BETA, OMEGA, A_SD, B_SD)
    assert abs(-diag.value - exact) < 4 * diag.mc_se + 0.05, (-diag.value, exact, diag.mc_se)


@pytest.mark.parametrize("kind, lloq, pointwise", [("additive", None, False), ("proportional", None, False),
                                                   ("combined", None, True), ("additive", 0.8, True)])
def test_gradient_matches_finite_differences(kind: str, lloq: float | None, pointwise: bool) -> None:
    y, cens = study(15, 5, seed=5, kind=kind, lloq=lloq)
    ds, prior = drawset(y, cens, kind, M=300, seed=6, force_pointwise=pointwise)
    pop = PopulationModel(prior, random_effects=["psi"], residual=residual_spec(kind))
    obj = PopulationObjective(pop, ds)
    theta = np.array([0.9, np.log(0.6)] + [np.log(0.35)] * pop.residual.n)
    _, grad = obj.value_and_grad(theta)
    fd = optimize.approx_fprime(theta, obj.value, 1e-6)
    np.testing.assert_allclose(grad, fd, rtol=1e-4, atol=1e-4)


def test_fit_recovers_the_exact_mle_additive() -> None:
    y, cens = study(60, 6, seed=7)
    ds, prior = drawset(y, cens, "additive", M=2000, seed=8)
    pop = PopulationModel(prior, random_effects=["psi"], residual=residual_spec("additive"))
    fr = fit(pop, ds, n_starts=3, seed=0)

    def nll(t: np.ndarray) -> float:
        return -exact_additive_loglik(y, t[0], np.exp(t[1]), np.exp(t[2]))

    mle = optimize.minimize(nll, fr.estimate, method="Nelder-Mead", options={"xatol": 1e-8, "fatol": 1e-10}).x
    np.testing.assert_allclose(fr.estimate, mle, atol=0.5 * fr.se.max())
    assert np.all(np.abs(fr.estimate - mle) < 0.25 * fr.se)


def test_fixed_covariate_effect_is_an_offset_of_the_mean() -> None:
    """A covariate coefficient fixed at a known value (e.g. CL proportional to weight) shifts each individual's mean
    by coefficient x covariate and is not a parameter: the objective equals that of the model without it with the
    shift moved into the data's draws."""
    y, cens = study(30, 5, seed=9)
    ds, prior = drawset(y, cens, "additive", M=500, seed=10)
    x = np.random.default_rng(11).normal(0.0, 0.3, 30)
    fixed = PopulationModel(prior, random_effects=["psi"], residual=residual_spec("additive"),
                            fixed_covariate_effects={"psi": {"x": 0.7}})
    plain = PopulationModel(prior, random_effects=["psi"], residual=residual_spec("additive"))
    assert fixed.parameter_names == plain.parameter_names  # nothing estimated for it
    theta = np.array([0.9, np.log(0.5), np.log(0.3)])
    obj = PopulationObjective(fixed, ds, {"x": x})
    mu = obj.design.mean(theta)
    np.testing.assert_allclose(mu[:, 0], 0.9 + 0.7 * x)
    f1, g1 = obj.value_and_grad(theta)
    np.testing.assert_allclose(g1, optimize.approx_fprime(theta, obj.value, 1e-6), rtol=1e-4, atol=1e-4)
    # shifting every draw by -0.7 x (and keeping its weight denominator) gives the plain model the same objective
    shifted = DrawSet(ds.draws - 0.7 * x[:, None, None], prior, log_prior=ds.log_prior, kind="likelihood",
                      errors=ds.errors)
    assert PopulationObjective(plain, shifted).value(theta) == pytest.approx(f1, rel=1e-6)
