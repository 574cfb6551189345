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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "jax")

import numpy as np  # noqa: E402

from amortized_nlme.config import PopulationConfig, WorkflowConfig, load_population, load_workflow  # noqa: E402
from amortized_nlme.data import Dataset, read_dataset  # noqa: E402
from amortized_nlme.errors import ConfigError  # noqa: E402
from amortized_nlme.inference.weights import choose_likelihood, has_likelihood, weighted_drawset  # noqa: E402
from amortized_nlme.model import Design, IndividualModel  # noqa: E402
from amortized_nlme.population import DrawSet, PopulationModel, bind_population  # noqa: E402
from amortized_nlme.posterior import TrainedEstimator, load_estimator, posterior_draws  # noqa: E402
from amortized_nlme.provenance import package_versions, platform_description  # noqa: E402
from amortized_nlme.resources import estimator_dir, resolve_data_path, user_cache_dir  # noqa: E402

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


# ------------------------------------------------------------------------------------------------------------------
# inputs


def population_config(opts: InferenceOptions, workflow: WorkflowConfig) -> tuple[PopulationConfig, str]:
    """The population model to fit (``--pop`` file, else the workflow's ``[population]``) and where it came from."""
    if opts.population:
        return load_population(opts.population), str(opts.population)
    if workflow.population is None:
        raise ConfigError(f"no population model given (--pop) and the {workflow.model} workflow has no [population] "
                          "table")
    return workflow.population, f"the {workflow.model} workflow's [population]"


def read_data(path: str, workflow: WorkflowConfig, population: PopulationConfig) -> Dataset:
    """Read ``path`` with the generic reader: the workflow's ``[data]`` options overridden by the population file's
    ``[data]`` table; covariates are exactly the columns the population file's definitions use, groups the column
    of its ``[groups]``."""
    options = workflow.data.merged(population.data)
    kwargs = options.reader_options()
    categorical = list(dict.fromkeys([*kwargs.pop("categorical"), *population.categorical_data_columns()]))
    covariates = list(dict.fromkeys(population.covariate_data_columns() + categorical))
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
    """Read data, estimator and population model, lay the data out for the model and draw (or load) the
    posterior samples."""
    from simulators import get_model

    check_options(opts)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    workflow = load_workflow(opts.config or opts.model)
    model = get_model(workflow.model, **workflow.model_options)
    pop_cfg, where = population_config(opts, workflow)
    data = read_data(opts.data, workflow, pop_cfg)
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
    logger.info("data: %s", data.summary().replace("\n", "; "))
    observations, design = model.from_dataset(data)
    timings["read_data_s"] = time.perf_counter() - t0

    population, covariates, groups = bind_population(pop_cfg, model.prior, data.covariates, data.groups,
                                                     data.n_individuals, where)

    t1 = time.perf_counter()
    estimator = load_estimator(opts.estimator or estimator_dir(workflow.model), model)
    n_draws = opts.n_draws or default_n_draws(data.n_individuals)
    cache = Path(opts.cache_dir) if opts.cache_dir else user_cache_dir() / "draws"
    data_hash = data.content_hash()
    draws = posterior_draws(estimator, observations, design, n_draws, opts.seed, data_hash, cache)
    timings["posterior_draws_s"] = time.perf_counter() - t1
    likelihood = choose_likelihood(opts.likelihood, model, observations, design, draws.shape[0] * draws.shape[1])
    drawset, likelihood = weighted_drawset(likelihood, estimator, model, observations, design, draws, data.ids,
                                           timings)
    logger.info("population likelihood: %s", likelihood)
    if population.fixed_std and pop_cfg.fixed_std == "auto":
        # kernel width for parameters without random effect: a fifth of their typical posterior sd (see population.py)
        population = population.with_fixed_std_from_draws(drawset.draws, fraction=0.2)
        logger.info("kernel sd for parameters without random effect: %s",
                    {p: round(v, 4) for p, v in population.fixed_std.items()})
    return InferenceContext(opts, workflow, model, estimator, data, observations, design, draws, drawset,
                            covariates, groups, population, pop_cfg, likelihood, timings, data_hash, cache)


def draws_extender(ctx: InferenceContext):
    """``more(m, round)``: m fresh posterior draws per individual (own seed per round, cached like the first ones)
    with the context's kind of weights; appends them to ``ctx.draws`` and counts their time."""

    def more(m: int, round_: int) -> DrawSet:
        t0 = time.perf_counter()
        new = posterior_draws(ctx.estimator, ctx.observations, ctx.design, m, extension_seed(ctx.options.seed, round_),
                              ctx.data_hash, ctx.cache)
        ctx.timings["posterior_draws_s"] = ctx.timings.get("posterior_draws_s", 0.0) + time.perf_counter() - t0
        ds, _ = weighted_drawset("exact" if ctx.likelihood == "exact" else "amortized", ctx.estimator, ctx.model,
                                 ctx.observations, ctx.design, new, ctx.dataset.ids, None)
        ctx.draws = np.concatenate([ctx.draws, new], axis=1)
        return ds

    return more


def fit_population(ctx: InferenceContext, profile: bool | list[int]):
    """The fit of ``run_inference``: multistart with Wald SEs; with ``mc_refits`` >= 2 the Monte-Carlo error of the
    estimates, and (without ``--draws``) more draws until it is below ``mc_target`` x the statistical SE; then the
    profiles on the final draws. Returns the fit and the Monte-Carlo section of ``summary.json``."""
    from amortized_nlme.population import fit, fit_with_enough_draws, profile_intervals

    opts = ctx.options
    t0 = time.perf_counter()
    if opts.mc_refits < 2:
        fr = fit(ctx.population, ctx.drawset, ctx.covariates, ctx.groups, n_starts=opts.n_starts, seed=opts.seed,
                 wald=True, profile=profile, progress_bar=True)
        ctx.timings["fit_s"] = time.perf_counter() - t0
        return fr, {}
    adaptive = opts.n_draws is None
    start_m = ctx.drawset.M
    cap = opts.max_draws or draws_cap(ctx.dataset.n_individuals, ctx.model.n_params, start_m)
    fr, ctx.drawset, mce, rounds = fit_with_enough_draws(
        ctx.population, ctx.drawset, draws_extender(ctx) if adaptive else None, ctx.covariates, ctx.groups,
        n_starts=opts.n_starts, seed=opts.seed, n_sets=opts.mc_refits, target=opts.mc_target, max_draws=cap,
        progress_bar=True)
    ctx.timings["fit_s"] = sum(r.fit_s for r in rounds)
    ctx.timings["mc_refits_s"] = sum(r.mc_s for r in rounds)
    ratio = mce.ratio(fr.se)
    worst = rounds[-1].max_ratio if np.isfinite(rounds[-1].max_ratio) else None
    if not adaptive and worst is not None and worst > opts.mc_target:
        logger.warning("Monte-Carlo error is %.2f x the statistical SE of %s with %d draws: rerun with more --draws "
                       "(or leave --draws out to have them adapted)", worst, rounds[-1].worst_parameter,
                       ctx.drawset.M)
    if profile is not False:
        t1 = time.perf_counter()
        profile_intervals(fr, None if profile is True else list(profile), progress_bar=True)
        ctx.timings["profiles_s"] = time.perf_counter() - t1
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


def run_inference(opts: InferenceOptions) -> Path:
    """Fit the population model and write ``results/<run>/`` (estimates, uncertainty, plots, exact inputs)."""
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
    fr, mc = fit_population(ctx, profile)
    selection = marginal_likelihood_summary(ctx, fr, opts)
    inputs = {
        "command": " ".join(sys.argv),
        "options": asdict(opts),
        "model": ctx.model.identity(),
        "data": {"path": str(opts.data), "sha256": ctx.dataset.content_hash(), "n_individuals":
                 ctx.dataset.n_individuals, "n_observations": int(ctx.design["mask"].sum())},
        "estimator": {"path": str(ctx.estimator.path), "sha256": ctx.estimator.sha256},
        "population_model": ctx.population.to_dict(),
        "population_config": ctx.population_config.model_dump(mode="json"),
        "n_draws": int(ctx.draws.shape[1]),
        "likelihood": ctx.likelihood,
        "seed": opts.seed,
        "package_versions": package_versions(),
        "platform": platform_description(),
    }
    extra = {"monte_carlo": mc, "model_selection": selection,
             "timings_s": {k: round(v, 2) for k, v in ctx.timings.items()}}
    write_results(out, fit=fr, model=ctx.model, observations=ctx.observations, design=ctx.design, draws=ctx.draws,
                  ids=list(ctx.dataset.ids), covariates=ctx.covariates, groups=ctx.groups, inputs=inputs, extra=extra,
                  seed=opts.seed)
    print(format_estimates(fr))
    if selection.get("computed"):
        print(f"-2LL {selection['minus2ll']:.2f} (MC SE {selection['minus2ll_se']:.2f}), AIC {selection['aic']:.2f}, "
              f"BIC {selection['bic']:.2f}, BICc {selection['bicc']:.2f} (importance sampling)")
    logger.info("results written to %s (sampling %.1f s, fit %.1f s)", out, ctx.timings.get("posterior_draws_s", 0),
                ctx.timings["fit_s"])
    return out


#: "auto" computes the marginal likelihood when individuals x importance draws x time points stays below this
MARGINAL_AUTO_LIMIT = 20_000_000


def marginal_likelihood_summary(ctx: InferenceContext, fr, opts: InferenceOptions) -> dict[str, Any]:
    """-2LL, AIC, BIC and BICc by importance sampling at the estimate (comparable with NONMEM/Monolix/saemix), or
    the reason it was skipped."""
    from amortized_nlme.population import ImportanceSampler, count_observations

    n_is = max(1000, ctx.drawset.M)
    if opts.marginal == "off":
        return {"computed": False, "reason": "--marginal off"}
    cost = ctx.dataset.n_individuals * n_is * ctx.observations.shape[1]
    if opts.marginal == "auto" and cost > MARGINAL_AUTO_LIMIT:
        logger.info("importance-sampling likelihood skipped for %d individuals (use --marginal on)",
                    ctx.dataset.n_individuals)
        return {"computed": False, "reason": f"{ctx.dataset.n_individuals} individuals x {n_is} draws is above the "
                                             "automatic limit; rerun with --marginal on"}
    if not has_likelihood(ctx.model, ctx.observations, ctx.design):
        return {"computed": False, "reason": f"{ctx.model.name} has no tractable individual likelihood"}
    t0 = time.perf_counter()
    sampler = ImportanceSampler(ctx.model, ctx.estimator, ctx.observations, ctx.design, n_draws=n_is,
                                pilot_draws=ctx.drawset.draws, seed=opts.seed)
    ml = sampler.evaluate(fr.model, fr.estimate, ctx.covariates, ctx.groups)
    n_obs = count_observations(ctx.observations, ctx.design)
    ctx.timings["marginal_likelihood_s"] = time.perf_counter() - t0
    logger.info("-2LL %.2f (MC SE %.2f) by importance sampling with %d draws per individual", ml.minus2ll,
                ml.minus2ll_se, n_is)
    return {"computed": True, "n_observations": n_obs, **ml.summary()}


def run_selection(opts: InferenceOptions, candidates: list[str], parameters: list[str] | None, strategy: str) -> Path:
    """``amortized-nlme select-covariates``: covariate selection by BICc on the inference stage's draws; writes
    ``selection.{json,md,png}`` into the results folder and returns it."""
    from amortized_nlme.population import ImportanceSampler, count_observations, select_covariates, write_selection
    from amortized_nlme.population.marginal import count_parameters

    ctx = prepare_inference(opts)
    n_obs = count_observations(ctx.observations, ctx.design)
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
    return out
