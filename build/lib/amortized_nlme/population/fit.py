"""Fitting population models with pyPESTO: multistart L-BFGS-B, Wald and profile-likelihood intervals, Monte-Carlo
error of the estimates.

All starts of a fit use the same posterior draws (common random numbers), so the objective is a deterministic, smooth
function of theta and the multistart and profile machinery behave as on an ordinary likelihood. Monte-Carlo error is
reported separately: the delta-method SE of the objective at the optimum, and optionally the spread of the estimates
over refits on independent draw sets (:func:`mc_standard_errors`). BLAS is pinned to one thread while optimising so
that numpy, scipy's L-BFGS-B and the numba kernel do not compete for cores.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pypesto
import pypesto.optimize
import pypesto.profile
import pypesto.startpoint
from scipy import stats
from threadpoolctl import threadpool_limits

from amortized_nlme.population.model import PopulationModel
from amortized_nlme.population.objective import DrawSet, ObjectiveDiagnostics, PopulationObjective
from amortized_nlme.population.residual import residual_start

logger = logging.getLogger(__name__)

DEFAULT_LEVELS: tuple[float, ...] = (0.8, 0.9, 0.95)
#: L-BFGS-B settings: relative function tolerance tight enough that converged starts agree to << 0.1 in J
DEFAULT_OPTIMIZER_OPTIONS: dict[str, Any] = {"maxiter": 2000, "ftol": 1e-12, "gtol": 1e-6, "maxcor": 20}


@dataclass
class Pilot:
    """The multistart of the first round of :func:`fit_with_enough_draws`, kept when later rounds refitted on more
    draws from its distinct optima (its pyPESTO result holds the start results only, not the objective)."""

    n_draws: int
    n_starts: int
    n_converged: int
    fval: float
    result: pypesto.Result


@dataclass
class FitResult:
    """Outcome of :func:`fit`: the estimate, its uncertainty and the pyPESTO objects (store with
    ``pypesto.store.write_result(fit.result, path)``, plot with ``pypesto.visualize.waterfall(fit.result)``)."""

    model: PopulationModel
    objective: PopulationObjective
    problem: pypesto.Problem
    result: pypesto.Result
    parameter_names: tuple[str, ...]
    estimate: np.ndarray
    fval: float
    n_starts: int
    n_converged: int
    time_s: float
    diagnostics: ObjectiveDiagnostics
    hessian: np.ndarray | None = None
    se: np.ndarray | None = None
    wald_ci: dict[float, np.ndarray] = field(default_factory=dict)
    profile_ci: dict[float, np.ndarray] = field(default_factory=dict)
    mc_se: np.ndarray | None = None
    mc_bias: np.ndarray | None = None
    at_bound: np.ndarray | None = None
    pilot: Pilot | None = None

    @property
    def mc_se_fval(self) -> float:
        """Delta-method Monte-Carlo SE of the objective at the estimate."""
        return self.diagnostics.mc_se

    def natural(self) -> dict[str, Any]:
        """Readable estimates (natural-scale means, omega sds, correlations), see :meth:`PopulationModel.transform`."""
        return self.model.transform(self.estimate)

    def information_criteria(self) -> dict[str, float]:
        """-2LL, AIC and BIC (n = individuals), all up to one constant shared by every population model fitted to the
        same data and estimator, so differences between population models are exact."""
        n = self.objective.draws.n
        m2ll = 2.0 * self.fval
        p = len(self.estimate)
        return {"minus2ll_rel": m2ll, "aic_rel": m2ll + 2 * p, "bic_rel": m2ll + p * float(np.log(n)), "n_theta": p}

    def table(self) -> list[dict[str, Any]]:
        """One row per population parameter: estimate, Wald SE, Monte-Carlo SE and the intervals computed so far."""
        rows = []
        for i, name in enumerate(self.parameter_names):
            row: dict[str, Any] = {"name": name, "estimate": float(self.estimate[i])}
            if self.se is not None:
                row["se"] = float(self.se[i])
            if self.mc_se is not None:
                row["mc_se"] = float(self.mc_se[i])
            if self.mc_bias is not None:
                row["mc_bias"] = float(self.mc_bias[i])
            for level, ci in self.wald_ci.items():
                row[f"wald_{int(round(level * 100))}"] = (float(ci[i, 0]), float(ci[i, 1]))
            for level, ci in self.profile_ci.items():
                row[f"profile_{int(round(level * 100))}"] = (float(ci[i, 0]), float(ci[i, 1]))
            if self.at_bound is not None:
                row["at_bound"] = bool(self.at_bound[i])
            rows.append(row)
        return rows


def make_problem(
    objective: PopulationObjective, x_guesses: Sequence[np.ndarray] | np.ndarray | None = None, seed: int = 0
) -> pypesto.Problem:
    """A pyPESTO problem on ``objective`` with the population model's bounds, init box, names, start guesses and
    seeded uniform random starts (the objective is not copied: the draws can be large)."""
    model = objective.model
    lb, ub = model.bounds()
    lb_init, ub_init = model.init_bounds()
    pobj = pypesto.Objective(fun=objective.value_and_grad, grad=True, x_names=list(model.parameter_names))
    guesses = None if x_guesses is None else np.atleast_2d(np.asarray(x_guesses, dtype=np.float64))
    return pypesto.Problem(
        objective=pobj,
        lb=lb,
        ub=ub,
        lb_init=lb_init,
        ub_init=ub_init,
        x_guesses=guesses,
        x_names=list(model.parameter_names),
        copy_objective=False,
        startpoint_method=_uniform_starts(seed),
    )


def _optimizer(options: Mapping[str, Any] | None) -> pypesto.optimize.ScipyOptimizer:
    opts = dict(DEFAULT_OPTIMIZER_OPTIONS)
    opts.update(options or {})
    return pypesto.optimize.ScipyOptimizer(method="L-BFGS-B", options=opts)


def _uniform_starts(seed: int) -> pypesto.startpoint.FunctionStartpoints:
    """pyPESTO start points: the problem's x_guesses first, then uniform in the init box from a seeded generator."""
    rng = np.random.default_rng(seed)

    def sample(n_starts: int, lb: np.ndarray, ub: np.ndarray, **_: Any) -> np.ndarray:
        return rng.uniform(lb, ub, size=(n_starts, lb.size))

    return pypesto.startpoint.FunctionStartpoints(function=sample, use_guesses=True)


def fit(
    model: PopulationModel,
    draws: DrawSet,
    covariates: Mapping[str, np.ndarray] | None = None,
    groups: np.ndarray | Sequence[Any] | None = None,
    n_starts: int = 10,
    seed: int = 0,
    x_guesses: Sequence[np.ndarray] | None = None,
    optimizer_options: Mapping[str, Any] | None = None,
    wald: bool = True,
    profile: bool | Sequence[int] = False,
    levels: Sequence[float] = DEFAULT_LEVELS,
    converge_tol: float = 0.1,
    progress_bar: bool = False,
    initial_guess: bool = True,
) -> FitResult:
    """Multistart L-BFGS-B fit of ``model`` on ``draws`` (first start: the posterior-median guess unless
    ``initial_guess`` is False, then ``x_guesses``, then uniform random starts); optionally Wald SEs/CIs and
    profile-likelihood CIs at the best point."""
    t0 = time.perf_counter()
    objective = PopulationObjective(model, draws, covariates, groups)
    start = None if model.residual is None else residual_start(draws.errors, model.residual.kind)
    guesses = [model.initial_guess(draws.draws, covariates, groups, residual_start=start)] if initial_guess else []
    guesses += [np.asarray(g, dtype=np.float64) for g in (x_guesses or [])]
    problem = make_problem(objective, guesses or None, seed)
    logger.info(
        "fitting %d population parameters on %d individuals x %d draws, %d starts",
        model.n_theta, draws.n, draws.M, n_starts,
    )
    with threadpool_limits(1):
        result = pypesto.optimize.minimize(
            problem,
            optimizer=_optimizer(optimizer_options),
            n_starts=n_starts,
            progress_bar=progress_bar,
        )
    best = result.optimize_result.list[0]
    fvals = np.array([r.fval for r in result.optimize_result.list], dtype=np.float64)
    n_conv = int(np.sum(np.isfinite(fvals) & (fvals - best.fval < converge_tol)))
    estimate = np.asarray(best.x, dtype=np.float64)
    diag = objective.diagnostics(estimate)
    lb, ub = problem.lb_full, problem.ub_full
    at_bound = (estimate - lb < 1e-6 * (ub - lb)) | (ub - estimate < 1e-6 * (ub - lb))
    if at_bound.any():
        logger.warning("estimate at a bound for %s", [model.parameter_names[i] for i in np.flatnonzero(at_bound)])
    fr = FitResult(
        model=model,
        objective=objective,
        problem=problem,
        result=result,
        parameter_names=model.parameter_names,
        estimate=estimate,
        fval=float(best.fval),
        n_starts=n_starts,
        n_converged=n_conv,
        time_s=0.0,
        diagnostics=diag,
        at_bound=at_bound,
    )
    logger.info(
        "best objective %.4f (MC SE %.3f), %d of %d starts within %.2g", fr.fval, diag.mc_se, n_conv, n_starts,
        converge_tol,
    )
    if wald:
        wald_intervals(fr, levels)
    if profile is not False:
        idx = None if profile is True else list(profile)
        profile_intervals(fr, idx, levels, optimizer_options=optimizer_options, progress_bar=progress_bar)
    fr.time_s = time.perf_counter() - t0
    return fr


def hessian_fd(objective: PopulationObjective, theta: np.ndarray, rel_step: float = 1e-4) -> np.ndarray:
    """Observed Fisher information: Hessian of J at ``theta`` by central differences of the analytic gradient,
    symmetrised."""
    theta = np.asarray(theta, dtype=np.float64)
    d = theta.size
    H = np.empty((d, d))
    with threadpool_limits(1):
        for i in range(d):
            h = rel_step * max(1.0, abs(theta[i]))
            e = np.zeros(d)
            e[i] = h
            H[:, i] = (objective.gradient(theta + e) - objective.gradient(theta - e)) / (2.0 * h)
    return 0.5 * (H + H.T)


def wald_intervals(fr: FitResult, levels: Sequence[float] = DEFAULT_LEVELS) -> None:
    """Fill ``fr.hessian``, ``fr.se`` (sqrt diag of the inverse observed Fisher information) and ``fr.wald_ci``."""
    H = hessian_fd(fr.objective, fr.estimate)
    fr.hessian = H
    try:
        cov = np.linalg.inv(H)
        se = np.sqrt(np.where(np.diag(cov) > 0, np.diag(cov), np.nan))
    except np.linalg.LinAlgError:
        logger.warning("observed Fisher information is singular; Wald standard errors unavailable")
        se = np.full(len(fr.estimate), np.nan)
    if np.any(~np.isfinite(se)):
        logger.warning("Hessian not positive definite at the estimate: some Wald SEs are undefined (non-identifiable?)")
    fr.se = se
    for level in levels:
        zq = stats.norm.ppf(0.5 + level / 2.0)
        fr.wald_ci[float(level)] = np.stack([fr.estimate - zq * se, fr.estimate + zq * se], axis=1)


def profile_intervals(
    fr: FitResult,
    indices: Sequence[int] | None = None,
    levels: Sequence[float] = DEFAULT_LEVELS,
    optimizer_options: Mapping[str, Any] | None = None,
    progress_bar: bool = False,
) -> None:
    """Profile likelihoods with ``pypesto.profile.parameter_profile`` (stored in ``fr.result``) and the chi2(1)-based
    intervals from them in ``fr.profile_ci`` (NaN for parameters not profiled)."""
    d = len(fr.estimate)
    indices = list(range(d)) if indices is None else list(indices)
    alpha_max = max(levels)
    # walk a little beyond the widest requested level so that its crossing is bracketed
    ratio_min = 0.5 * float(pypesto.profile.chi2_quantile_to_ratio(alpha_max))
    opts = pypesto.profile.ProfileOptions(ratio_min=ratio_min, whole_path=False)
    with threadpool_limits(1):
        pypesto.profile.parameter_profile(
            problem=fr.problem,
            result=fr.result,
            optimizer=_optimizer(optimizer_options),
            profile_index=indices,
            profile_options=opts,
            progress_bar=progress_bar,
        )
    profiles = fr.result.profile_result.list[-1]
    for level in levels:
        ci = np.full((d, 2), np.nan)
        thr = pypesto.profile.chi2_quantile_to_ratio(level)
        for i in indices:
            prof = profiles[i]
            if prof is None:
                continue
            xs = np.asarray(prof.x_path)[i]
            ratios = np.asarray(prof.ratio_path)
            ci[i] = pypesto.profile.calculate_approximate_ci(xs, ratios, thr)
        fr.profile_ci[float(level)] = ci
    for i in indices:
        xs = np.asarray(profiles[i].x_path)[i]
        lb, ub = fr.problem.lb_full[i], fr.problem.ub_full[i]
        if xs.min() <= lb + 1e-9 * (ub - lb) or xs.max() >= ub - 1e-9 * (ub - lb):
            logger.info("profile of %s reaches a bound: interval open on that side", fr.parameter_names[i])


@dataclass
class Reevaluation:
    """The objective at a point on a fresh draw set (and, if polished, the locally re-optimised point)."""

    fval: float
    diagnostics: ObjectiveDiagnostics
    estimate: np.ndarray
    fval_polished: float | None = None


def reevaluate(fr: FitResult, draws: DrawSet, polish: bool = False, optimizer_options: Mapping[str, Any] | None = None) -> Reevaluation:
    """Evaluate J at the best point on a fresh (typically larger) draw set supplied by the caller; with ``polish``,
    re-optimise locally from there on the new draws."""
    obj = PopulationObjective(fr.model, draws, fr.objective.covariates, fr.objective.groups)
    diag = obj.diagnostics(fr.estimate)
    est, fpol = fr.estimate.copy(), None
    if polish:
        est, fpol = _local_fit(obj, fr.estimate, optimizer_options)
        logger.info("polished on fresh draws: %.4f -> %.4f", diag.value, fpol)
    return Reevaluation(fval=diag.value, diagnostics=diag, estimate=est, fval_polished=fpol)


def _local_fit(
    objective: PopulationObjective, start: np.ndarray, optimizer_options: Mapping[str, Any] | None
) -> tuple[np.ndarray, float]:
    problem = make_problem(objective, [start])
    with threadpool_limits(1):
        res = pypesto.optimize.minimize(
            problem,
            optimizer=_optimizer(optimizer_options),
            n_starts=1,
            progress_bar=False,
        )
    best = res.optimize_result.list[0]
    return np.asarray(best.x, dtype=np.float64), float(best.fval)


def mc_standard_errors(
    fr: FitResult,
    draw_generator: Callable[[int], DrawSet],
    n_sets: int = 5,
    optimizer_options: Mapping[str, Any] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Monte-Carlo SE of the estimates: refit (locally, from the estimate) on ``n_sets`` independent draw sets
    ``draw_generator(r)``; returns the SD across refits (stored in ``fr.mc_se``) and the refitted estimates."""
    if n_sets < 2:
        raise ValueError("need at least 2 independent draw sets for a Monte-Carlo SE")
    ests = np.empty((n_sets, len(fr.estimate)))
    for r in range(n_sets):
        ds = draw_generator(r)
        obj = PopulationObjective(fr.model, ds, fr.objective.covariates, fr.objective.groups)
        ests[r], fval = _local_fit(obj, fr.estimate, optimizer_options)
        logger.info("Monte-Carlo refit %d/%d: objective %.4f", r + 1, n_sets, fval)
    fr.mc_se = ests.std(axis=0, ddof=1)
    return fr.mc_se, ests


# ----------------------------------------------------------------------------------------------------------------
# Monte-Carlo error of the estimates, and enough draws to make it small


@dataclass
class MonteCarloError:
    """Monte-Carlo error of the estimates at ``n_draws`` draws per individual, from local refits on ``n_sets``
    disjoint subsets of the draws (each ``n_draws / n_sets`` draws).

    ``se``: the spread of the refits scaled to all draws (SD / sqrt(K)). ``bias``: the jackknife estimate of the
    estimates' O(1/M) Monte-Carlo bias (the log of a Monte-Carlo mean is biased, so the fitted theta is too): with
    bias b/M, the subsets' estimates are off by K b/M on average and the full fit by b/M, hence
    bias = (mean of the refits - estimate) / (K - 1). Bias, not variance, is what too few draws costs at large n:
    the statistical SE shrinks like 1/sqrt(n), the bias does not.
    """

    n_draws: int
    n_sets: int
    se: np.ndarray
    bias: np.ndarray
    estimates: np.ndarray

    @property
    def rms(self) -> np.ndarray:
        """Root-mean-square Monte-Carlo error (variance and bias together)."""
        return np.hypot(self.se, self.bias)

    def ratio(self, statistical_se: np.ndarray) -> np.ndarray:
        """Monte-Carlo RMS error over the statistical SE, per parameter (NaN where the SE is undefined)."""
        se = np.asarray(statistical_se, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(np.isfinite(se) & (se > 0), self.rms / se, np.nan)

    def draws_factor(self, statistical_se: np.ndarray, target: float) -> float:
        """The smallest factor f by which to multiply the draws so that every parameter's predicted Monte-Carlo RMS
        error, sqrt(se^2 / f + bias^2 / f^2), is at most ``target`` times its statistical SE (1 when it is already)."""
        se = np.asarray(statistical_se, dtype=np.float64)
        ok = np.isfinite(se) & (se > 0)
        if not ok.any():
            return 1.0
        a, b, t2 = self.se[ok] ** 2, self.bias[ok] ** 2, (target * se[ok]) ** 2
        # a / f + b / f^2 <= t2  <=>  t2 f^2 - a f - b >= 0
        f = (a + np.sqrt(a * a + 4.0 * t2 * b)) / (2.0 * t2)
        return float(max(1.0, np.max(f)))


def monte_carlo_error(fr: FitResult, draws: DrawSet, n_sets: int = 4,
                      optimizer_options: Mapping[str, Any] | None = None) -> MonteCarloError:
    """Refit locally on ``n_sets`` disjoint subsets of ``draws`` (every K-th draw) and fill ``fr.mc_se`` and
    ``fr.mc_bias`` (see :class:`MonteCarloError`); no sampling needed."""
    sd, ests = mc_standard_errors(fr, lambda r: draws.take_draws(slice(r, None, n_sets)), n_sets=n_sets,
                                  optimizer_options=optimizer_options)
    mce = MonteCarloError(n_draws=draws.M, n_sets=n_sets, se=sd / np.sqrt(n_sets),
                          bias=(ests.mean(axis=0) - fr.estimate) / (n_sets - 1), estimates=ests)
    fr.mc_se, fr.mc_bias = mce.se, mce.bias
    return mce


def distinct_end_points(fr: FitResult, tol: float = 0.1) -> list[np.ndarray]:
    """The multistart's end points, best first, one per local optimum (end values closer than ``tol`` count as one):
    the starts of a refit on more draws, whose optima move only by Monte-Carlo error."""
    ends = sorted((r for r in fr.result.optimize_result.list if r.x is not None and r.fval is not None
                   and np.isfinite(r.fval)), key=lambda r: r.fval)
    kept: list[Any] = []
    for r in ends:
        if all(abs(r.fval - k.fval) >= tol for k in kept):
            kept.append(r)
    return [np.asarray(r.x, dtype=np.float64) for r in kept]


@dataclass
class DrawsRound:
    """One round of :func:`fit_with_enough_draws`: the draws it fitted on and the Monte-Carlo error it found."""

    n_draws: int
    fval: float
    max_ratio: float
    worst_parameter: str
    fit_s: float
    mc_s: float
    extend_s: float = 0.0  # fetching the next round's extra draws and joining them to these

    def summary(self) -> dict[str, Any]:
        return {"n_draws": self.n_draws, "objective": self.fval, "max_mc_over_se": self.max_ratio,
                "worst_parameter": self.worst_parameter, "fit_s": round(self.fit_s, 2), "mc_s": round(self.mc_s, 2),
                "extend_s": round(self.extend_s, 2)}


def fit_with_enough_draws(
    model: PopulationModel,
    draws: DrawSet,
    more_draws: Callable[[int, int], DrawSet] | None,
    covariates: Mapping[str, np.ndarray] | None = None,
    groups: np.ndarray | Sequence[Any] | None = None,
    *,
    n_starts: int = 10,
    seed: int = 0,
    n_sets: int = 4,
    target: float = 0.3,
    max_draws: int = 8000,
    max_rounds: int = 3,
    progress_bar: bool = False,
    x_guesses: Sequence[np.ndarray] | None = None,
) -> tuple[FitResult, DrawSet, MonteCarloError, list[DrawsRound]]:
    """Multistart fit with Wald SEs and the Monte-Carlo error of the estimates; while that error (RMS of Monte-Carlo
    SE and jackknife bias) exceeds ``target`` times the statistical SE of some parameter, more draws are fetched
    from ``more_draws(m, round)`` (m fresh draws per individual, same weights) and the fit is repeated from the
    previous fit's distinct optima (:func:`distinct_end_points`), up to ``max_draws`` per individual and
    ``max_rounds`` extensions. ``more_draws=None`` fits once and only measures the error. Returns the last fit, its
    draws, its error and every round's numbers."""
    if n_sets < 2:
        raise ValueError("the Monte-Carlo error needs at least 2 disjoint draw subsets")
    rounds: list[DrawsRound] = []
    starts: list[np.ndarray] | None = None
    pilot: Pilot | None = None
    while True:
        t0 = time.perf_counter()
        if starts is None:
            fr = fit(model, draws, covariates, groups, n_starts=n_starts, seed=seed, wald=True,
                     progress_bar=progress_bar, x_guesses=x_guesses)
        else:
            fr = fit(model, draws, covariates, groups, n_starts=len(starts), seed=seed, x_guesses=starts,
                     initial_guess=False, wald=True, progress_bar=progress_bar)
            fr.pilot = pilot
        t1 = time.perf_counter()
        mce = monte_carlo_error(fr, draws, n_sets)
        ratio = mce.ratio(fr.se)
        defined = np.isfinite(ratio).any()
        worst = int(np.nanargmax(ratio)) if defined else 0
        rounds.append(DrawsRound(draws.M, fr.fval, float(ratio[worst]) if defined else float("nan"),
                                 fr.parameter_names[worst], t1 - t0, time.perf_counter() - t1))
        logger.info("%d draws per individual: Monte-Carlo error up to %.2f x the statistical SE (%s)", draws.M,
                    rounds[-1].max_ratio, rounds[-1].worst_parameter)
        if more_draws is None or not rounds[-1].max_ratio > target:
            break
        if len(rounds) > max_rounds or draws.M >= max_draws:
            logger.warning("Monte-Carlo error still %.2f x the statistical SE of %s with %d draws per individual "
                           "(limit %d, median ESS %.1f): the draws are a poor importance sample for this population "
                           "model (a parameter without random effect that the individuals' data place differently, "
                           "or an estimator far from the posterior); treat the estimates with caution",
                           rounds[-1].max_ratio, rounds[-1].worst_parameter, draws.M, max_draws,
                           float(np.median(fr.diagnostics.ess)))
            break
        # 25 % beyond the predicted need (the error estimates are themselves noisy), at least doubling
        factor = max(2.0, 1.25 * mce.draws_factor(fr.se, target))
        target_m = int(min(max_draws, math.ceil(draws.M * factor / 50.0) * 50))
        logger.info("drawing %d more posterior draws per individual (%d -> %d)", target_m - draws.M, draws.M,
                    target_m)
        t2 = time.perf_counter()
        draws = DrawSet.concatenate([draws, more_draws(target_m - draws.M, len(rounds))])
        rounds[-1].extend_s = time.perf_counter() - t2
        starts = distinct_end_points(fr) or [fr.estimate]
        if pilot is None:
            pilot = Pilot(n_draws=fr.objective.draws.M, n_starts=fr.n_starts, n_converged=fr.n_converged,
                          fval=fr.fval, result=pypesto.Result(optimize_result=fr.result.optimize_result))
        del fr  # the previous round's objective and draws can go
    return fr, draws, mce, rounds
