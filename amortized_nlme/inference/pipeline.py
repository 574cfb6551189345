"""Stage 3, infer: data + trained estimator + population model -> population estimates with uncertainty, written to
``results/<run>/``. This module orchestrates the stages below it (data, posterior, population, report) and owns no
statistics of its own.

Posterior draws are made once per (data, estimator, number of draws, seed) and cached in the user cache directory,
so that refitting with another population model neither resamples nor retrains.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "jax")

import numpy as np  # noqa: E402

from amortized_nlme.config import PopulationConfig, WorkflowConfig, load_population, load_workflow  # noqa: E402
from amortized_nlme.data import Dataset, read_dataset  # noqa: E402
from amortized_nlme.errors import ConfigError  # noqa: E402
from amortized_nlme.inference.likelihood import (  # noqa: E402
    AuxiliaryConditional, WeightPlan, amortized_drawset, exact_drawset, plan_weights, resolve_likelihood)
from amortized_nlme.inference.proposal import ProposalSet, build_mixtures, diagnose  # noqa: E402
from amortized_nlme.inference.status import assess  # noqa: E402
from amortized_nlme.inference.support import check_support  # noqa: E402
from amortized_nlme.model import Design, IndividualModel, NormalPrior  # noqa: E402
from amortized_nlme.population import DrawSet, PopulationModel, bind_population  # noqa: E402
from amortized_nlme.posterior import TrainedEstimator, load_estimator, posterior_draws  # noqa: E402
from amortized_nlme.provenance import package_versions, platform_description  # noqa: E402
from amortized_nlme.resources import (  # noqa: E402
    estimator_dir, resolve_data_path, resolve_population_path, user_cache_dir)

logger = logging.getLogger(__name__)


@dataclass
class InferenceOptions:
    """What ``amortized-nlme infer`` was asked to do (recorded with the results)."""

    model: str
    data: str
    population: str | None = None
    estimator: str | None = None
    out: str | None = None
    config: str | None = None
    n_draws: int | None = None
    n_starts: int = 10
    profiles: bool = True
    seed: int = 0
    groups: list[str] | None = None
    max_individuals: int | None = None
    mc_refits: int = 4  # disjoint draw subsets for the Monte-Carlo error (0: not measured, draws not adapted)
    mc_target: float = 0.3  # with n_draws None: more draws until Monte-Carlo RMS error <= this x statistical SE
    max_draws: int | None = None  # cap on the adapted draws per individual (default: see draws_cap)
    cache_dir: str | None = None  # posterior-draw cache (default: the user cache directory)
    marginal: str = "auto"  # importance-sampling -2LL/AIC/BIC/BICc: "on", "off", or "auto" (on for small data)
    likelihood: str = "auto"  # "amortized" (weights 1/p(phi)), "exact" (p(y|phi)/q(phi|y)), "auto"
    profile_parameters: list[str] | None = None
    covariate_candidates: list[str] | None = None  # select-covariates: definitions to read besides the used ones


@dataclass
class InferenceContext:
    """Everything a population fit needs, prepared once: data laid out for the model, the estimator, the draws."""

    options: InferenceOptions
    workflow: WorkflowConfig
    model: IndividualModel
    estimator: TrainedEstimator
    dataset: Dataset
    observations: np.ndarray
    design: Design
    draws: np.ndarray
    drawset: DrawSet
    covariates: dict[str, np.ndarray]
    groups: np.ndarray | None
    population: PopulationModel
    population_config: PopulationConfig
    likelihood: str = "amortized"
    timings: dict[str, float] = field(default_factory=dict)
    data_hash: str = ""
    cache: Path | None = None
    plan: WeightPlan | None = None
    proposals: ProposalSet | None = None
    status: Any = None


# ------------------------------------------------------------------------------------------------------------------
# inputs


def population_config(opts: InferenceOptions, workflow: WorkflowConfig) -> tuple[PopulationConfig, str]:
    """The population model to fit (``--pop`` file, else the workflow's ``[population]``) and where it came from."""
    if opts.population:
        path = resolve_population_path(opts.population)
        return load_population(path), path
    if workflow.population is None:
        raise ConfigError(f"no population model given (--pop) and the {workflow.model} workflow has no [population] "
                          "table")
    return workflow.population, f"the {workflow.model} workflow's [population]"


def read_data(path: str, workflow: WorkflowConfig, population: PopulationConfig,
              candidates: list[str] | tuple[str, ...] = ()) -> Dataset:
    """Read ``path`` with the generic reader: the workflow's ``[data]`` options overridden by the population file's
    ``[data]`` table; covariates are exactly the columns the population file's definitions use, groups the column
    of its ``[groups]``."""
    options = workflow.data.merged(population.data)
    kwargs = options.reader_options()
    categorical = list(dict.fromkeys([*kwargs.pop("categorical"), *population.categorical_data_columns(candidates)]))
    covariates = list(dict.fromkeys(population.covariate_data_columns(candidates) + categorical))
    return read_dataset(resolve_data_path(path), covariates=covariates, categorical=categorical,
                        group=population.groups.column if population.groups else None, **kwargs)


def default_n_draws(n_individuals: int) -> int:
    """Posterior draws per individual to start with: Monte-Carlo bias of the summed log-likelihood grows like n / M,
    so M grows with the number of individuals (200 for small studies, 1000 from 10,000 individuals on); without
    ``--draws`` the fit then adds draws until the Monte-Carlo error is small (:func:`draws_cap` bounds it)."""
    return int(np.clip(round(n_individuals / 10, -1), 200, 1000))


#: the adapted draws stop growing at this many draw coordinates (individuals x draws x parameters): ~2 GB in float64
MAX_DRAW_COORDINATES = 240_000_000


def draws_cap(n_individuals: int, n_params: int, start: int) -> int:
    """Most draws per individual that the adapted draws (no ``--draws``) may grow to: 8 times the start, at most 10,000, and within
    :data:`MAX_DRAW_COORDINATES` (never below the start)."""
    by_memory = MAX_DRAW_COORDINATES // max(1, n_individuals * n_params)
    return int(max(start, min(8 * start, 10_000, by_memory)))


def extension_seed(seed: int, round_: int) -> int:
    """Seed of the ``round_``-th batch of extra posterior draws (independent of the first batch and of each other)."""
    return int(np.random.SeedSequence([int(seed) % (1 << 63), 0xD2A5, round_]).generate_state(1)[0])


# ------------------------------------------------------------------------------------------------------------------
# the stage


def check_options(opts: InferenceOptions) -> None:
    """Refuse option values that cannot work, before anything is read or sampled."""
    if opts.n_draws is not None and opts.n_draws < 2:
        raise ConfigError(f"--draws must be at least 2 posterior draws per individual, not {opts.n_draws}")
    if opts.mc_refits == 1 or opts.mc_refits < 0:
        raise ConfigError(f"--mc-refits must be 0 (no Monte-Carlo error) or at least 2, not {opts.mc_refits}")
    if opts.n_draws is not None and opts.mc_refits and opts.n_draws < 2 * opts.mc_refits:
        raise ConfigError(f"--draws {opts.n_draws} cannot be split into {opts.mc_refits} subsets of at least 2 "
                          "draws (--mc-refits)")
    if not opts.mc_target > 0:
        raise ConfigError(f"--mc-target must be a positive fraction of the statistical SE, not {opts.mc_target}")
    if opts.max_draws is not None and opts.max_draws < 2:
        raise ConfigError(f"--max-draws must be at least 2, not {opts.max_draws}")
    if opts.n_starts < 1:
        raise ConfigError(f"--starts must be at least 1, not {opts.n_starts}")
    if opts.max_individuals is not None and opts.max_individuals < 1:
        raise ConfigError(f"--max-individuals must be at least 1, not {opts.max_individuals}")
    if opts.seed < 0:
        raise ConfigError(f"--seed must be a non-negative integer, not {opts.seed}")
    if opts.marginal not in ("auto", "on", "off"):
        raise ConfigError(f"--marginal must be auto, on or off, not {opts.marginal!r}")
    if opts.likelihood not in ("auto", "amortized", "exact"):
        raise ConfigError(f"--likelihood must be auto, amortized or exact, not {opts.likelihood!r}")


def prepare_inference(opts: InferenceOptions) -> InferenceContext:
    """Read data, estimator and population model, lay the data out for the model, draw (or load) the posterior
    samples and weight them for the likelihood asked for (exact by default where the model has one)."""
    from simulators import get_model

    check_options(opts)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    workflow = load_workflow(opts.config or opts.model)
    model = get_model(workflow.model, **workflow.model_options)
    pop_cfg, where = population_config(opts, workflow)
    likelihood = resolve_likelihood(opts.likelihood, model)
    data = read_data(opts.data, workflow, pop_cfg, opts.covariate_candidates or ())
    if opts.groups:
        if data.groups is None:
            raise ConfigError(f"--groups given, but {opts.data} was read without a group column (set [groups] column "
                              "in the population file)")
        keep = np.flatnonzero(np.isin(np.asarray(data.groups).astype(str), opts.groups))
        if keep.size == 0:
            raise ConfigError(f"no individuals in groups {opts.groups}; groups are {sorted(set(data.groups))}")
        data = data.subset(keep)
    if opts.max_individuals is not None and opts.max_individuals < data.n_individuals:
        keep = np.sort(np.random.default_rng(opts.seed).choice(data.n_individuals, opts.max_individuals,
                                                               replace=False))
        data = data.subset(keep)
    if getattr(data, "n_censored", 0) and not model.supports_censoring:
        raise ConfigError(f"{opts.data} has {data.n_censored} censored (BLQ) observations, but {model.name} does not "
                          "model censoring; use a model that does (see `amortized-nlme models`) or remove the CENS/LLOQ "
                          "column to treat the limits as observed values")
    logger.info("data: %s", data.summary().replace("\n", "; "))
    observations, design = model.from_dataset(data)
    timings["read_data_s"] = time.perf_counter() - t0

    plan = plan_weights(likelihood, model, pop_cfg, observations, design)
    population, covariates, groups = bind_population(pop_cfg, plan.prior(model), data.covariates, data.groups,
                                                     data.n_individuals, where, residual=plan.residual,
                                                     candidates=opts.covariate_candidates or ())
    if opts.profile_parameters:
        unknown = [p for p in opts.profile_parameters if p not in population.parameter_names]
        if unknown:
            raise ConfigError(f"--profile: unknown population parameters {unknown}; they are "
                              f"{list(population.parameter_names)}")
    logger.info("population likelihood: %s%s", likelihood,
                f" (residual error {plan.residual.kind}, a population parameter)" if plan.residual else "")

    t1 = time.perf_counter()
    estimator = load_estimator(opts.estimator or estimator_dir(workflow.model), model)
    n_draws = opts.n_draws or default_n_draws(data.n_individuals)
    cache = Path(opts.cache_dir) if opts.cache_dir else user_cache_dir() / "draws"
    data_hash = data.content_hash()
    proposals = ProposalSet(estimator, model, plan, observations, design, data_hash, cache)
    if likelihood == "exact":
        phi, log_g = proposals.draw(n_draws, opts.seed)
        timings["posterior_draws_s"] = time.perf_counter() - t1
        if plan.aux_index.size:
            proposals.aux = AuxiliaryConditional(phi, plan.psi_index, plan.aux_index)
        t2 = time.perf_counter()
        drawset = exact_drawset(plan, model, phi, log_g, observations, design, data.ids, proposals.aux)
        timings["likelihood_weights_s"] = time.perf_counter() - t2
    else:
        phi = np.asarray(posterior_draws(estimator, observations, design, n_draws, opts.seed, data_hash, cache),
                         dtype=np.float64)
        timings["posterior_draws_s"] = time.perf_counter() - t1
        drawset = amortized_drawset(model, phi, data.ids, observations, design)
    if population.fixed_std and pop_cfg.fixed_std == "auto":
        # kernel width for parameters without random effect: a fifth of their typical posterior sd (see population.py)
        population = population.with_fixed_std_from_draws(drawset.draws, fraction=0.2)
    ctx = InferenceContext(opts, workflow, model, estimator, data, observations, design, phi, drawset, covariates,
                           groups, population, pop_cfg, likelihood, timings, data_hash, cache)
    ctx.plan, ctx.proposals = plan, proposals
    return ctx


def draws_extender(ctx: InferenceContext):
    """``more(m, round)``: m fresh draws per individual from the current proposals (own seed per round; the
    estimator's draws cached like the first ones) with the context's weights; appends them to ``ctx.draws``."""

    def more(m: int, round_: int) -> DrawSet:
        t0 = time.perf_counter()
        seed = extension_seed(ctx.options.seed, round_)
        if ctx.likelihood == "exact":
            phi, log_g = ctx.proposals.draw(m, seed)
            ds = exact_drawset(ctx.plan, ctx.model, phi, log_g, ctx.observations, ctx.design, ctx.dataset.ids,
                               ctx.proposals.aux)
        else:
            phi = np.asarray(posterior_draws(ctx.estimator, ctx.observations, ctx.design, m, seed, ctx.data_hash,
                                             ctx.cache), dtype=np.float64)
            ds = amortized_drawset(ctx.model, phi, ctx.dataset.ids, ctx.observations, ctx.design)
        ctx.draws = np.concatenate([ctx.draws, phi], axis=1)
        ctx.timings["posterior_draws_s"] = ctx.timings.get("posterior_draws_s", 0.0) + time.perf_counter() - t0
        return ds

    return more


#: rounds of proposal refinement (each: diagnose at the current estimate, refine flagged individuals, refit)
REFINE_ROUNDS = 4
#: scale inflation of the t components in successive refinement rounds
REFINE_INFLATION = (1.2, 1.4, 1.7)


def refine_proposals(ctx: InferenceContext, fr) -> tuple[Any, list[dict]]:
    """Adaptive importance sampling around the fit: every individual's proposal gains a component from the fitted
    population (a Student t at its population mean with the population covariance, so sparse individuals, whose
    posterior is close to the population, are covered however the estimator does there), and individuals whose
    weights have Pareto k̂ > 0.7 gain components at their posterior modes; all individuals are redrawn and the fit
    is repeated locally, up to :data:`REFINE_ROUNDS` rounds, until nothing is flagged and the estimate has settled.
    Components of earlier rounds are kept, so the proposals stay good wherever the fit has been. Returns the refitted
    result and one record per round."""
    from amortized_nlme.inference.proposal import population_components
    from amortized_nlme.population import fit

    records = []
    n = ctx.dataset.n_individuals
    settled = False
    for round_ in range(REFINE_ROUNDS):
        diag = diagnose(fr.objective, fr.estimate)
        flagged = diag.flagged
        records.append({"round": round_, "n_khat_above_0.7": int(flagged.size),
                        "khat_median": float(np.median(diag.khat)), "ess_median": float(np.median(diag.ess))})
        if round_ > 0 and flagged.size == 0 and settled:
            break
        t0 = time.perf_counter()
        logger.info("adapting the proposals at the estimate (round %d; %d individuals with Pareto k̂ > 0.7)",
                    round_ + 1, flagged.size)
        mixtures = population_components(fr.objective, fr.estimate, n)
        if flagged.size:
            modes = build_mixtures(fr.objective, fr.estimate, ctx.proposals, ctx.drawset, flagged,
                                   inflation=REFINE_INFLATION[min(round_, len(REFINE_INFLATION) - 1)])
            for i, mix in modes.items():
                mixtures[i] = mixtures[i].joined(mix)
        ctx.proposals.add_mixtures(mixtures)
        seed = int(np.random.SeedSequence([ctx.options.seed, 0x5EF1, round_]).generate_state(1)[0])
        phi, log_g = ctx.proposals.draw(ctx.drawset.M, seed, rows=np.arange(n))
        ctx.drawset = exact_drawset(ctx.plan, ctx.model, phi, log_g, ctx.observations, ctx.design, ctx.dataset.ids,
                                    ctx.proposals.aux)
        ctx.draws = phi
        previous = fr.estimate
        fr = fit(ctx.population, ctx.drawset, ctx.covariates, ctx.groups, n_starts=1, seed=ctx.options.seed,
                 x_guesses=[fr.estimate], initial_guess=False, wald=False)
        settled = bool(np.max(np.abs(fr.estimate - previous)) < SETTLED)
        records[-1]["seconds"] = round(time.perf_counter() - t0, 2)
        records[-1]["largest_change"] = float(np.max(np.abs(fr.estimate - previous)))
    return fr, records


#: the estimate has settled when no parameter moved more than this (log scale) in a refinement round
SETTLED = 0.02


#: fits again after refining the proposals at the fitted estimate (exact likelihood), at most this many times
REFIT_CYCLES = 2


def _fit_and_measure(ctx: InferenceContext, guesses: list[np.ndarray] | None, t0: float):
    """Multistart (with ``guesses``), Wald SEs and, with ``mc_refits`` >= 2, the Monte-Carlo error of the estimates
    with draws added until it meets the target (without ``--draws``); returns the fit and the ``monte_carlo``
    section of ``summary.json``."""
    from amortized_nlme.population import fit, fit_with_enough_draws

    opts = ctx.options
    if opts.mc_refits < 2:
        fr = fit(ctx.population, ctx.drawset, ctx.covariates, ctx.groups, n_starts=opts.n_starts, seed=opts.seed,
                 x_guesses=guesses, wald=True, progress_bar=True)
        ctx.timings["fit_s"] = time.perf_counter() - t0
        return fr, {}
    else:
        adaptive = opts.n_draws is None
        start_m = ctx.drawset.M
        cap = opts.max_draws or draws_cap(ctx.dataset.n_individuals, ctx.model.n_params, start_m)
        fr, ctx.drawset, mce, rounds = fit_with_enough_draws(
            ctx.population, ctx.drawset, draws_extender(ctx) if adaptive else None, ctx.covariates, ctx.groups,
            n_starts=opts.n_starts, seed=opts.seed, n_sets=opts.mc_refits, target=opts.mc_target, max_draws=cap,
            progress_bar=True, x_guesses=guesses)
        ctx.timings["fit_s"] = sum(r.fit_s for r in rounds) + ctx.timings.get("refine_s", 0.0)
        ctx.timings["mc_refits_s"] = sum(r.mc_s for r in rounds)
        ratio = mce.ratio(fr.se)
        worst = rounds[-1].max_ratio if np.isfinite(rounds[-1].max_ratio) else None
        if not adaptive and worst is not None and worst > opts.mc_target:
            logger.warning("Monte-Carlo error is %.2f x the statistical SE of %s with %d draws: rerun with more "
                           "--draws (or leave --draws out to have them adapted)", worst, rounds[-1].worst_parameter,
                           ctx.drawset.M)
        mc = {
            "method": f"local refits on {opts.mc_refits} disjoint subsets of the draws (M/{opts.mc_refits} each): "
                      "Monte-Carlo SE = SD / sqrt(K), jackknife bias = (mean of refits - estimate) / (K - 1)",
            "draws": "adapted" if adaptive else "fixed (--draws)",
            "target_mc_over_se": opts.mc_target,
            "n_draws_start": start_m, "n_draws_final": int(ctx.drawset.M), "n_draws_cap": cap if adaptive else None,
            "rounds": [r.summary() for r in rounds],
            "mc_se": dict(zip(fr.parameter_names, mce.se.tolist())),
            "mc_bias": dict(zip(fr.parameter_names, mce.bias.tolist())),
            "mc_over_se": dict(zip(fr.parameter_names, ratio.tolist())),
            "max_mc_over_se": worst,
        }
    return fr, mc


def fit_population(ctx: InferenceContext, profile: bool | list[int]):
    """The fit of ``run_inference``: multistart; with exact weights, proposal refinement where individuals' weights
    are unreliable; the Monte-Carlo error of the estimates with (without ``--draws``) more draws until it is below
    ``mc_target`` x the statistical SE; then profiles on the final draws. Returns the fit and the Monte-Carlo and
    proposal sections of ``summary.json``."""
    from amortized_nlme.population import fit, profile_intervals
    from amortized_nlme.population.fit import distinct_end_points

    opts = ctx.options
    t0 = time.perf_counter()
    pilot = None
    refinement: list[dict] = []
    guesses = None
    if ctx.likelihood == "exact":
        pilot = fit(ctx.population, ctx.drawset, ctx.covariates, ctx.groups, n_starts=opts.n_starts, seed=opts.seed,
                    wald=False, progress_bar=True)
        refined, refinement = refine_proposals(ctx, pilot)
        guesses = [refined.estimate]
        ctx.timings["refine_s"] = time.perf_counter() - t0
    mc: dict[str, Any] = {}
    for cycle in range(1 + REFIT_CYCLES * (ctx.likelihood == "exact")):
        fr, mc = _fit_and_measure(ctx, guesses, t0)
        if ctx.likelihood != "exact" or cycle == REFIT_CYCLES:
            break
        # the multistart may have moved where the proposals were not refined (a variance collapsing towards 0 can
        # look better on the fitting draws than it is): refine there and fit again, or stop when nothing is flagged
        flagged = diagnose(fr.objective, fr.estimate).flagged
        if flagged.size == 0:
            break
        t1 = time.perf_counter()
        logger.info("after the fit, %d individuals have Pareto k̂ > 0.7: refining there and fitting again",
                    flagged.size)
        refined, more = refine_proposals(ctx, fr)
        refinement += [{**r, "after_fit": cycle + 1} for r in more]
        guesses = [refined.estimate, *(guesses or [])]
        ctx.timings["refine_s"] = ctx.timings.get("refine_s", 0.0) + time.perf_counter() - t1
    validation = None
    if ctx.likelihood == "exact":
        candidates = [*distinct_end_points(fr)[:4], *(guesses or []), *([] if pilot is None else [pilot.estimate])]
        fr, mc, validation = validate_optimum(ctx, fr, mc, candidates)
    if profile is not False:
        t1 = time.perf_counter()
        profile_intervals(fr, None if profile is True else list(profile), progress_bar=True)
        ctx.timings["profiles_s"] = time.perf_counter() - t1
    proposal = None
    if ctx.likelihood == "exact":
        diag = diagnose(fr.objective, fr.estimate)
        proposal = diag.summary(ctx.dataset.ids)
        proposal["refinement_rounds"] = refinement
        proposal["n_refined"] = len(ctx.proposals.mixtures)
        proposal["optimum_validation"] = validation
    return fr, mc, proposal


def validate_optimum(ctx: InferenceContext, fr, mc: dict, candidates: list[np.ndarray]):
    """The multistart's choice checked on independent draws: the estimate and the other candidate optima (distinct
    end points, earlier estimates) are evaluated on one fresh batch from the final proposals. An optimizer can exploit
    the fitting draws' Monte-Carlo noise -- typically a variance collapsing to its bound, where the weights are most
    variable -- and that does not survive fresh draws: when another candidate is better there by more than twice the
    Monte-Carlo SE, the fit restarts from it on the fitting and fresh draws together."""
    from amortized_nlme.population import PopulationObjective, fit, monte_carlo_error

    unique: list[np.ndarray] = [fr.estimate]
    for c in candidates:
        c = np.clip(np.asarray(c, dtype=np.float64), *ctx.population.bounds())
        if all(np.max(np.abs(c - u)) > 1e-3 for u in unique):
            unique.append(c)
    if len(unique) == 1:
        return fr, mc, {"candidates": 1}
    t0 = time.perf_counter()
    phi, log_g = ctx.proposals.draw(ctx.drawset.M, extension_seed(ctx.options.seed, 96))
    fresh = exact_drawset(ctx.plan, ctx.model, phi, log_g, ctx.observations, ctx.design, ctx.dataset.ids,
                          ctx.proposals.aux)
    obj = PopulationObjective(ctx.population, fresh, ctx.covariates, ctx.groups)
    values = np.array([obj.value(c) for c in unique])
    best = int(np.argmin(values))
    se = obj.diagnostics(unique[best]).mc_se
    record = {"candidates": len(unique), "fresh_objective": values.tolist(), "mc_se": se, "chosen": 0}
    if best != 0 and values[0] - values[best] > 2.0 * se:
        logger.warning("the estimate is %.2f worse than another optimum on fresh draws (Monte-Carlo SE %.2f): it "
                       "exploited the fitting draws' noise; refitting from the other optimum on both draw sets",
                       values[0] - values[best], se)
        ctx.drawset = DrawSet.concatenate([ctx.drawset, fresh])
        ctx.draws = np.concatenate([ctx.draws, phi], axis=1)
        fr = fit(ctx.population, ctx.drawset, ctx.covariates, ctx.groups, n_starts=1, seed=ctx.options.seed,
                 x_guesses=[unique[best]], initial_guess=False, wald=True)
        if ctx.options.mc_refits >= 2:
            mce = monte_carlo_error(fr, ctx.drawset, ctx.options.mc_refits)
            ratio = mce.ratio(fr.se)
            mc = {**mc, "n_draws_final": int(ctx.drawset.M), "mc_se": dict(zip(fr.parameter_names, mce.se.tolist())),
                  "mc_bias": dict(zip(fr.parameter_names, mce.bias.tolist())),
                  "mc_over_se": dict(zip(fr.parameter_names, ratio.tolist())),
                  "max_mc_over_se": float(np.nanmax(ratio)) if np.isfinite(ratio).any() else None}
        record["chosen"] = best
    ctx.timings["validation_s"] = time.perf_counter() - t0
    return fr, mc, record


def kernel_bias(ctx: InferenceContext, fr) -> dict[str, Any] | None:
    """Bias of the narrow Gaussian kernel given to parameters without random effect, measured: refit with the kernel
    halved and extrapolate (the bias is O(h^2), so theta(h) - theta(0) ~ 4/3 (theta(h) - theta(h/2)))."""
    from amortized_nlme.population import fit

    if not ctx.population.fixed_std:
        return None
    half = ctx.population.replace(fixed_std={p: 0.5 * h for p, h in ctx.population.fixed_std.items()})
    refit = fit(half, ctx.drawset, ctx.covariates, ctx.groups, n_starts=1, seed=ctx.options.seed,
                x_guesses=[fr.estimate], initial_guess=False, wald=False)
    bias = (fr.estimate - refit.estimate) * 4.0 / 3.0
    se = fr.se if fr.se is not None else np.full_like(bias, np.nan)
    return {"kernel_sd": dict(ctx.population.fixed_std),
            "method": "refit with the kernel halved; bias = 4/3 (estimate(h) - estimate(h/2))",
            "bias": dict(zip(fr.parameter_names, bias.tolist())),
            "bias_over_se": dict(zip(fr.parameter_names, (bias / se).tolist()))}


def typical_values(names, estimate: np.ndarray) -> dict[str, float]:
    """Natural-scale typical individual parameters (exp of each ``beta_<name>``; group-specific ones left out) of a
    population estimate, at the covariates' reference values."""
    return {n[len("beta_"):]: float(np.exp(v)) for n, v in zip(names, estimate, strict=True)
            if n.startswith("beta_") and "[" not in n}


def run_inference(opts: InferenceOptions) -> Path:
    """Fit the population model and write ``results/<run>/`` (estimates, uncertainty, plots, exact inputs, status)."""
    from amortized_nlme.report import format_estimates, write_results

    ctx = prepare_inference(opts)
    out = Path(opts.out or Path("results") / f"{ctx.model.name}-{Path(opts.data).name.split('.')[0].split(':')[-1]}")
    profile: bool | list[int] = opts.profiles
    if opts.profiles and opts.profile_parameters:
        names = list(ctx.population.parameter_names)
        unknown = [p for p in opts.profile_parameters if p not in names]
        if unknown:
            raise ConfigError(f"--profile: unknown population parameters {unknown}; they are {names}")
        profile = [names.index(p) for p in opts.profile_parameters]
    fr, mc, proposal = fit_population(ctx, profile)
    selection = marginal_likelihood_summary(ctx, fr, opts)
    support = check_support(ctx.estimator, ctx.model, ctx.observations, ctx.design, user_cache_dir() / "support").summary(
        ctx.dataset.ids)
    kernel = kernel_bias(ctx, fr)
    at_bound = [] if fr.at_bound is None else [fr.parameter_names[i] for i in np.flatnonzero(fr.at_bound)]
    status = assess(likelihood=ctx.likelihood, has_likelihood=ctx.model.has_likelihood,
                    n_individuals=ctx.dataset.n_individuals, proposal=proposal, support=support, at_bound=at_bound,
                    mc_ratio=mc.get("max_mc_over_se") if mc else None, mc_target=opts.mc_target,
                    kernel_parameters=sorted(ctx.population.fixed_std),
                    se_undefined=[] if fr.se is None else [fr.parameter_names[i]
                                                           for i in np.flatnonzero(~np.isfinite(fr.se))],
                    model_warnings=ctx.model.typical_value_warnings(typical_values(fr.parameter_names, fr.estimate)))
    inputs = {
        "command": " ".join(sys.argv),
        "options": asdict(opts),
        "model": ctx.model.identity(),
        "data": {"path": str(opts.data), "sha256": ctx.dataset.content_hash(), "n_individuals":
                 ctx.dataset.n_individuals, "n_observations": int(np.asarray(ctx.design["mask"]).sum())},
        "estimator": {"path": str(ctx.estimator.path), "sha256": ctx.estimator.sha256},
        "population_model": ctx.population.to_dict(),
        "population_config": ctx.population_config.model_dump(mode="json"),
        "n_draws": int(ctx.draws.shape[1]),
        "likelihood": ctx.likelihood,
        "weights": ctx.plan.summary(),
        "seed": opts.seed,
        "package_versions": package_versions(),
        "platform": platform_description(),
    }
    extra = {"status": status.to_dict(), "monte_carlo": mc, "model_selection": selection,
             "proposal_diagnostics": proposal, "support": support, "kernel": kernel,
             "timings_s": {k: round(v, 2) for k, v in ctx.timings.items()}}
    report_model = population_space_model(ctx.model, fr.model, fr.estimate)
    draws = ctx.draws[..., [list(ctx.model.param_names).index(p) for p in fr.model.param_names_individual]]
    write_results(out, fit=fr, model=report_model, observations=ctx.observations, design=ctx.design, draws=draws,
                  ids=list(ctx.dataset.ids), covariates=ctx.covariates, groups=ctx.groups, inputs=inputs, extra=extra,
                  seed=opts.seed, residual=report_residual(fr), censoring=report_censoring(ctx))
    print(format_estimates(fr))
    if selection.get("computed"):
        print(f"-2LL {selection['minus2ll']:.2f} (MC SE {selection['minus2ll_se']:.2f}), OFV {selection['ofv']:.2f} "
              f"(NONMEM's: -2LL - N log 2pi), AIC {selection['aic']:.2f}, "
              f"BIC {selection['bic']:.2f}, BICc {selection['bicc']:.2f} ({selection['method']})")
    print(f"likelihood: {ctx.likelihood}" + (f", residual error {ctx.plan.residual.kind} (population parameter)"
                                            if ctx.plan.residual else ""))
    print("\n".join(status.lines()))
    logger.info("results written to %s (sampling %.1f s, fit %.1f s)", out, ctx.timings.get("posterior_draws_s", 0),
                ctx.timings["fit_s"])
    ctx.status = status
    run_inference.last_status = status.level  # type: ignore[attr-defined]
    return out


class PopulationSpaceModel(IndividualModel):
    """The individual model seen through the population model's parameters, for the report: its parameters are the
    population's individual parameters, and residual sds that the population estimates as population parameters are
    filled in at their estimates before the model predicts or simulates."""

    def __init__(self, model: IndividualModel, population: PopulationModel, theta: np.ndarray) -> None:
        self._model, self._population, self._theta = model, population, np.asarray(theta, dtype=np.float64)
        self.name, self.version = model.name, model.version
        self.param_names = tuple(population.param_names_individual)
        self.obs_names, self.n_obs_types = model.obs_names, model.n_obs_types
        self.max_time_points, self.time_unit = model.max_time_points, model.time_unit
        self.derived_parameters = getattr(model, "derived_parameters", ())

    @property
    def prior(self) -> NormalPrior:
        return self._population.prior

    def full(self, psi: np.ndarray) -> np.ndarray:
        """The individual model's parameter vectors for population-space ones ``psi [n, k_pop]``."""
        from amortized_nlme.report.vpc import full_parameters

        return full_parameters(self._model, self._population, self._theta, np.asarray(psi, dtype=np.float64))

    def sample_design(self, n: int, rng: np.random.Generator) -> Design:
        return self._model.sample_design(n, rng)

    def simulate(self, phi: np.ndarray, design: Design, rng: np.random.Generator) -> np.ndarray:
        return self._model.simulate(self.full(phi), design, rng)

    def predict(self, phi: np.ndarray, design: Design) -> np.ndarray:
        return self._model.predict(self.full(phi), design)

    def encode(self, observations: np.ndarray, design: Design) -> np.ndarray:
        return self._model.encode(observations, design)

    def from_dataset(self, data: Dataset) -> tuple[np.ndarray, Design]:
        return self._model.from_dataset(data)


def population_space_model(model: IndividualModel, population: PopulationModel, theta: np.ndarray
                           ) -> IndividualModel:
    """``model`` itself when the population covers all its parameters, else a :class:`PopulationSpaceModel`."""
    if tuple(population.param_names_individual) == tuple(model.param_names):
        return model
    return PopulationSpaceModel(model, population, theta)


def report_residual(fr):
    """The population-level residual error of the fit, as the report describes it (None: individual sds)."""
    from amortized_nlme.report.residuals import ResidualError as ReportResidual

    if fr.model.residual is None:
        return None
    a, b = fr.objective.residual_sds(fr.estimate)
    return ReportResidual(fr.model.residual.kind, add=a, prop=b)


def report_censoring(ctx: InferenceContext):
    """BLQ flags and limits ``[n, T, d]`` for the report (None without censored observations)."""
    from amortized_nlme.report.censoring import Censoring

    cens = ctx.design.get("censored")
    if cens is None or not np.asarray(cens).any():
        return None
    blq = np.asarray(cens, bool)[..., None] & np.asarray(ctx.design["mask"], bool)[..., None]
    return Censoring(blq=blq, lloq=np.where(blq, ctx.observations, np.nan))


#: "auto" computes the amortized objective's importance-sampling likelihood below this many individuals x draws x
#: time points (the exact likelihood's -2LL is always computed: it costs one more batch of draws)
MARGINAL_AUTO_LIMIT = 20_000_000


def fresh_likelihood(ctx: InferenceContext, fr, n_draws: int, seed: int):
    """log p(D | theta) at the estimate on a fresh, independent batch of draws from the final proposals (the draws
    the fit was optimised on would bias it upwards): value, Monte-Carlo SE, per-individual ESS."""
    from amortized_nlme.population import PopulationObjective

    phi, log_g = ctx.proposals.draw(n_draws, seed)
    ds = exact_drawset(ctx.plan, ctx.model, phi, log_g, ctx.observations, ctx.design, ctx.dataset.ids,
                       ctx.proposals.aux)
    return PopulationObjective(fr.model, ds, ctx.covariates, ctx.groups).diagnostics(fr.estimate)


def marginal_likelihood_summary(ctx: InferenceContext, fr, opts: InferenceOptions) -> dict[str, Any]:
    """-2LL, OFV (NONMEM's, without N log 2 pi), AIC, BIC and BICc at the estimate by importance sampling
    (comparable with NONMEM/Monolix/saemix), or the reason it was skipped."""
    from amortized_nlme.population import ImportanceSampler, count_observations, information_criteria

    n_obs = count_observations(ctx.observations, ctx.design)
    t0 = time.perf_counter()
    if ctx.likelihood == "exact":
        if opts.marginal == "off":
            return {"computed": False, "reason": "--marginal off"}
        diag = fresh_likelihood(ctx, fr, ctx.drawset.M, extension_seed(opts.seed, 97))
        crit = information_criteria(-diag.value, fr.model, ctx.dataset.n_individuals, n_obs)
        ctx.timings["marginal_likelihood_s"] = time.perf_counter() - t0
        return {"computed": True, "method": "exact importance sampling, fresh draws from the final proposals",
                "n_observations": n_obs, "loglik": -diag.value, "loglik_se": diag.mc_se,
                "minus2ll_se": 2.0 * diag.mc_se, "n_draws": ctx.drawset.M, "jensen_bias": diag.jensen_bias,
                "ofv": crit["minus2ll"] - n_obs * float(np.log(2 * np.pi)), **crit,
                "ess_median": float(np.median(diag.ess)), "ess_min": float(np.min(diag.ess))}
    n_is = max(1000, ctx.drawset.M)
    if opts.marginal == "off":
        return {"computed": False, "reason": "--marginal off"}
    cost = ctx.dataset.n_individuals * n_is * ctx.observations.shape[1]
    if opts.marginal == "auto" and cost > MARGINAL_AUTO_LIMIT:
        logger.info("importance-sampling likelihood skipped for %d individuals (use --marginal on)",
                    ctx.dataset.n_individuals)
        return {"computed": False, "reason": f"{ctx.dataset.n_individuals} individuals x {n_is} draws is above the "
                                             "automatic limit; rerun with --marginal on"}
    if not ctx.model.has_likelihood:
        return {"computed": False, "reason": f"{ctx.model.name} has no tractable individual likelihood"}
    sampler = ImportanceSampler(ctx.model, ctx.estimator, ctx.observations, ctx.design, n_draws=n_is,
                                pilot_draws=ctx.drawset.draws, seed=opts.seed)
    ml = sampler.evaluate(fr.model, fr.estimate, ctx.covariates, ctx.groups)
    ctx.timings["marginal_likelihood_s"] = time.perf_counter() - t0
    summary = ml.summary()
    return {"computed": True, "method": "importance sampling (defensive mixture proposal)", "n_observations": n_obs,
            "ofv": summary["minus2ll"] - n_obs * float(np.log(2 * np.pi)), **summary}


class FreshDrawsLikelihood:
    """The exact likelihood of any population model at any theta on one fresh batch of draws from the proposals
    (independent of the draws the models were fitted on), with the ``evaluate`` interface of
    :class:`~amortized_nlme.population.ImportanceSampler` for covariate selection."""

    def __init__(self, ctx: InferenceContext, n_draws: int, seed: int) -> None:
        phi, log_g = ctx.proposals.draw(n_draws, seed)
        self.drawset = exact_drawset(ctx.plan, ctx.model, phi, log_g, ctx.observations, ctx.design, ctx.dataset.ids,
                                     ctx.proposals.aux)
        from amortized_nlme.population import count_observations

        self.n_observations = count_observations(ctx.observations, ctx.design)

    def evaluate(self, population, theta, covariates=None, groups=None):
        from amortized_nlme.population import PopulationObjective, information_criteria
        from amortized_nlme.population.marginal import MarginalLikelihood

        obj = PopulationObjective(population, self.drawset, covariates, groups)
        ll, ess, var = obj.per_individual(np.asarray(theta, dtype=np.float64))
        total = float(ll.sum())
        res = MarginalLikelihood(loglik=total, se=float(np.sqrt(var.sum())), per_individual=ll,
                                 var_per_individual=var, ess=ess, n_draws=self.drawset.M,
                                 mixture={"proposals": 1.0}, jensen_bias=float(0.5 * var.sum()))
        res.criteria = information_criteria(total, population, self.drawset.n, self.n_observations)
        return res


def run_selection(opts: InferenceOptions, candidates: list[str], parameters: list[str] | None, strategy: str,
                  refit: bool = True) -> Path:
    """``amortized-nlme select-covariates``: covariate selection by BICc with the inference stage's likelihood
    (exact by default) on one draw set; every model within the objective's Monte-Carlo error of the best is
    re-evaluated on fresh draws, the lowest BICc wins; writes ``selection.{json,md,png}`` and, with ``refit``, a
    full fit of the selected model (``<out>/selected/``)."""
    from amortized_nlme.population import ImportanceSampler, count_observations, select_covariates, write_selection
    from amortized_nlme.population.marginal import count_parameters

    opts = replace(opts, covariate_candidates=list(candidates))
    ctx = prepare_inference(opts)
    n_obs = count_observations(ctx.observations, ctx.design)
    if ctx.likelihood == "exact":
        sampler = FreshDrawsLikelihood(ctx, max(1000, ctx.drawset.M), extension_seed(opts.seed, 98))
    else:
        sampler = ImportanceSampler(ctx.model, ctx.estimator, ctx.observations, ctx.design,
                                    n_draws=max(1000, ctx.drawset.M), pilot_draws=ctx.drawset.draws, seed=opts.seed)
    result = select_covariates(ctx.population, ctx.drawset, ctx.covariates, candidates, n_obs,
                               parameters=parameters, groups=ctx.groups, strategy=strategy, seed=opts.seed,
                               sampler=sampler)
    out = Path(opts.out) if opts.out else Path("results") / f"{opts.model}-{Path(opts.data).stem}-covariates"
    write_selection(result, out)
    c = count_parameters(result.selected.model)
    print(f"selected: {result.selected.label} ({len(c.random)} parameters x log N, {len(c.fixed)} x log N_tot)",
          flush=True)
    if refit:
        selected = write_selected_population(ctx.population_config, result.selected.model, out / "selected_population.toml")
        print(f"fitting the selected model ({selected})", flush=True)
        run_inference(replace(opts, population=str(selected), out=str(out / "selected"), covariate_candidates=None))
    return out


def write_selected_population(config: PopulationConfig, model: PopulationModel, path: Path) -> Path:
    """The base population file with the selected covariate relations, as TOML a user can edit and refit."""
    relations = {p: sorted({_definition_of(c, config) for c in cs}) for p, cs in model.covariates.items()}
    data = config.model_dump(mode="json", exclude_none=True)
    data["covariates"] = relations
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_to_toml(data, comment="population model chosen by `amortized-nlme select-covariates`"))
    return path


def _definition_of(column: str, config: PopulationConfig) -> str:
    """The covariate name behind a (dummy) column name: ``sex_1`` -> ``sex``."""
    for name in config.definitions():
        if column == name or column.startswith(f"{name}_"):
            return name
    return column


def _to_toml(data: dict[str, Any], comment: str = "") -> str:
    """A small TOML writer for the population schema (scalars, lists, nested tables, inline tables)."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        raise TypeError(f"cannot write {type(v).__name__} to TOML")

    lines = [f"# {comment}"] if comment else []
    tables = []
    for k, v in data.items():
        if isinstance(v, dict):
            tables.append((k, v))
        else:
            lines.append(f"{k} = {value(v)}")
    for name, table in tables:
        lines += ["", f"[{name}]"]
        for k, v in table.items():
            lines.append(f"{k} = {value(v)}")
    return "\n".join(lines) + "\n"
