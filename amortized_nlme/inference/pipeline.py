"""The inference stage: data + trained estimator + population model -> population estimates with uncertainty.

Posterior draws are made once per (data, estimator, number of draws, seed) and cached in HDF5, so that refitting with
another population model neither resamples nor retrains.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "jax")

import h5py  # noqa: E402
import numpy as np  # noqa: E402

import amortized_nlme  # noqa: E402
from amortized_nlme.config import WorkflowConfig, load_workflow  # noqa: E402
from amortized_nlme.data import Dataset, read_dataset, read_froehlich, read_theophylline  # noqa: E402
from amortized_nlme.errors import ConfigError  # noqa: E402
from amortized_nlme.estimator import TrainedEstimator, load_estimator  # noqa: E402
from amortized_nlme.model import Design, IndividualModel  # noqa: E402
from amortized_nlme.objective import DrawSet  # noqa: E402
from amortized_nlme.population import PopulationModel, dummy_columns  # noqa: E402

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
CACHE_DIR = "draws_cache"


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
    cache_dir: str | None = None
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
    population_config: dict[str, Any]
    likelihood: str = "amortized"
    timings: dict[str, float] = field(default_factory=dict)
    data_hash: str = ""
    cache: Path | None = None


# ------------------------------------------------------------------------------------------------------------------
# data


def read_data(path: str, workflow: WorkflowConfig) -> Dataset:
    """Read ``path`` with the reader named in the workflow's ``[data]`` section (generic CSV otherwise)."""
    opts = dict(workflow.data)
    reader = opts.pop("reader", "csv")
    if reader == "froehlich":
        return read_froehlich(path)
    if reader == "theophylline":
        return read_theophylline(path, drop_predose=bool(opts.get("drop_predose", False)))
    if reader == "csv":
        return read_dataset(path, **opts)
    raise ConfigError(f"workflow {workflow.model}: unknown data reader {reader!r} (froehlich, theophylline, csv)")


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
# population model configuration


def load_population_config(path: str | None, workflow: WorkflowConfig) -> dict[str, Any]:
    """The population model as a dict: from a TOML/JSON file, or the workflow's ``[population]`` section."""
    if path is None:
        if not workflow.population:
            raise ConfigError(f"no population model given (--pop) and workflows/{workflow.model}.toml has no "
                              "[population] section")
        return json.loads(json.dumps(workflow.population))
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"population model file {p} not found")
    try:
        return tomllib.loads(p.read_text()) if p.suffix.lower() == ".toml" else json.loads(p.read_text())
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{p}: cannot parse population model: {exc}") from None


def covariate_columns(data: Dataset, definitions: dict[str, Any], where: str) -> dict[str, np.ndarray]:
    """Transformed covariate columns from the data's covariates, as the population file defines them.

    Each entry ``name = {column = "Weight", transform = "log_ratio_mean" | "log_ratio_median" | "centered" |
    "identity" | "categorical", reference = <level>}``; a categorical covariate gives 0/1 columns ``name_<level>``.
    """
    cols: dict[str, np.ndarray] = {}
    for name, spec in definitions.items():
        if isinstance(spec, str):
            spec = {"column": spec}
        column = spec.get("column", name)
        if column not in data.covariates.columns:
            raise ConfigError(f"{where}: covariate {name!r} uses column {column!r}, which the data does not have "
                              f"(covariates read: {list(data.covariates.columns)})")
        values = data.covariates[column].to_numpy()
        transform = spec.get("transform", "identity")
        if transform == "categorical":
            cols.update(dummy_columns(values, name, spec.get("reference")))
            continue
        x = np.asarray(values, dtype=np.float64)
        if transform == "log_ratio_mean":
            x = np.log(x / np.mean(x))
        elif transform == "log_ratio_median":
            x = np.log(x / np.median(x))
        elif transform == "centered":
            x = x - np.mean(x)
        elif transform != "identity":
            raise ConfigError(f"{where}: covariate {name!r}: unknown transform {transform!r}")
        cols[name] = x
    return cols


def build_population(config: dict[str, Any], model: IndividualModel, data: Dataset, where: str
                     ) -> tuple[PopulationModel, dict[str, np.ndarray], np.ndarray | None]:
    """PopulationModel + covariate columns + group labels for ``data`` from a population config dict."""
    cfg = dict(config)
    definitions = cfg.pop("covariate_definitions", {})
    if cfg.get("fixed_std") == "auto":
        cfg.pop("fixed_std")  # resolved from the posterior draws once they exist
    groups_cfg = cfg.pop("groups", None)
    groups = None
    if isinstance(groups_cfg, dict):
        cfg["group_specific"] = groups_cfg.get("specific", [])
        cfg["group_column"] = groups_cfg.get("column")
        levels = groups_cfg.get("levels")
        if data.groups is None:
            raise ConfigError(f"{where}: the population model has groups, but the data has no group column")
        groups = np.asarray(data.groups).astype(str)
        cfg["groups"] = list(levels) if levels else sorted(set(groups.tolist()))
    elif groups_cfg is not None:
        cfg["groups"] = groups_cfg
        groups = None if data.groups is None else np.asarray(data.groups).astype(str)
    covariates = covariate_columns(data, definitions, where)
    try:
        pop = PopulationModel.from_dict(cfg, prior=model.prior)
        pop.design(data.n_individuals, covariates, groups)  # validates covariate columns and group labels now
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return pop, covariates, groups


# ------------------------------------------------------------------------------------------------------------------
# posterior draws with a cache


def _cache_key(data_hash: str, estimator_hash: str, n_draws: int, seed: int) -> str:
    return f"{data_hash[:16]}-{estimator_hash[:16]}-M{n_draws}-s{seed}"


def posterior_draws(estimator: TrainedEstimator, observations: np.ndarray, design: Design, n_draws: int, seed: int,
                    data_hash: str, cache_dir: Path | None) -> np.ndarray:
    """Draws ``[n, M, k]`` for every individual, read from the cache when the same data, estimator, M and seed were
    sampled before; written atomically (temp file, then rename)."""
    path = None
    if cache_dir is not None:
        path = cache_dir / f"{_cache_key(data_hash, estimator.sha256, n_draws, seed)}.h5"
        if path.exists():
            with h5py.File(path, "r") as fh:
                if fh.attrs.get("data_hash") == data_hash and fh.attrs.get("estimator_sha256") == estimator.sha256:
                    logger.info("posterior draws read from cache %s", path)
                    return fh["draws"][...]
    t0 = time.perf_counter()
    draws = estimator.sample(observations, design, n_draws, seed=seed, progress=True)
    logger.info("%d x %d posterior draws in %.1f s", draws.shape[0], n_draws, time.perf_counter() - t0)
    bad = ~np.all(np.isfinite(draws), axis=(1, 2))
    if bad.any():
        raise RuntimeError(f"the estimator returned non-finite draws for {int(bad.sum())} individuals")
    if path is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with h5py.File(tmp, "w") as fh:
            fh.create_dataset("draws", data=draws.astype(np.float32), compression="lzf")
            fh.attrs.update({"data_hash": data_hash, "estimator_sha256": estimator.sha256, "n_draws": n_draws,
                             "seed": seed, "model": estimator.model.name})
        os.replace(tmp, path)
        with h5py.File(path, "r") as fh:  # the cached (float32) draws, so a refit uses exactly the same numbers
            return fh["draws"][...]
    return draws.astype(np.float32)


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


def prepare_inference(opts: InferenceOptions) -> InferenceContext:
    """Read data, estimator and population model, lay the data out for the model and draw (or load) the
    posterior samples."""
    from simulators import get_model

    check_options(opts)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    workflow = load_workflow(opts.config or opts.model)
    model = get_model(workflow.model, **workflow.model_options)
    data = read_data(opts.data, workflow)
    if opts.groups:
        if data.groups is None:
            raise ConfigError(f"--groups given, but {opts.data} was read without a group column")
        keep = np.flatnonzero(np.isin(np.asarray(data.groups).astype(str), opts.groups))
        if keep.size == 0:
            raise ConfigError(f"no individuals in groups {opts.groups}; groups are {sorted(set(data.groups))}")
        data = data.subset(keep)
    if opts.max_individuals and opts.max_individuals < data.n_individuals:
        keep = np.sort(np.random.default_rng(opts.seed).choice(data.n_individuals, opts.max_individuals,
                                                               replace=False))
        data = data.subset(keep)
    logger.info("data: %s", data.summary().replace("\n", "; "))
    observations, design = model.from_dataset(data)
    timings["read_data_s"] = time.perf_counter() - t0

    pop_cfg = load_population_config(opts.population, workflow)
    where = opts.population or f"workflows/{workflow.model}.toml [population]"
    population, covariates, groups = build_population(pop_cfg, model, data, where)

    t1 = time.perf_counter()
    estimator = load_estimator(opts.estimator or REPO / "trained_models" / workflow.model, model)
    n_draws = opts.n_draws or default_n_draws(data.n_individuals)
    cache = Path(opts.cache_dir) if opts.cache_dir else (REPO / "results" / CACHE_DIR)
    data_hash = data.content_hash()
    draws = posterior_draws(estimator, observations, design, n_draws, opts.seed, data_hash, cache)
    timings["posterior_draws_s"] = time.perf_counter() - t1
    likelihood = choose_likelihood(opts.likelihood, model, observations, design, draws.shape[0] * draws.shape[1])
    drawset, likelihood = weighted_drawset(likelihood, estimator, model, observations, design, draws, data.ids,
                                           timings)
    logger.info("population likelihood: %s", likelihood)
    if population.fixed_std and pop_cfg.get("fixed_std", "auto") == "auto":
        # kernel width for parameters without random effect: a fifth of their typical posterior sd (see population.py)
        population = population.with_fixed_std_from_draws(drawset.draws, fraction=0.2)
        logger.info("kernel sd for parameters without random effect: %s",
                    {p: round(v, 4) for p, v in population.fixed_std.items()})
    return InferenceContext(opts, workflow, model, estimator, data, observations, design, draws, drawset,
                            covariates, groups, population, pop_cfg, likelihood, timings, data_hash, cache)


#: "auto" tries exact likelihood weights when individuals x draws x time points stays below this
EXACT_AUTO_LIMIT = 20_000_000
#: ... and keeps them only when q is a good proposal: median effective sample size of p(y|phi) p(phi) / q(phi|y)
#: at least this fraction of the draws (and at least 20)
EXACT_MIN_ESS_FRACTION = 0.05


def has_likelihood(model: IndividualModel, observations: np.ndarray, design: Design) -> bool:
    """Whether the individual model has a tractable log p(y_i | phi) (SDE models do not)."""
    try:
        model.log_likelihood(model.prior.mean[None, :], observations[:1], {k: v[:1] for k, v in design.items()})
    except NotImplementedError:
        return False
    return True


def choose_likelihood(requested: str, model: IndividualModel, observations: np.ndarray, design: Design,
                      n_draws_total: int) -> str:
    """Resolve ``--likelihood`` before any weights are computed: "exact" is tried when the model has a likelihood
    and the data are not too large (the proposal-quality check follows in :func:`prepare_inference`)."""
    if requested not in ("auto", "amortized", "exact"):
        raise ConfigError(f"--likelihood must be auto, amortized or exact, not {requested!r}")
    tractable = has_likelihood(model, observations, design)
    if requested == "exact" and not tractable:
        raise ConfigError(f"{model.name} has no tractable individual likelihood: use --likelihood amortized")
    if requested == "auto":
        cost = n_draws_total * observations.shape[1]
        requested = "auto-exact" if tractable and cost <= EXACT_AUTO_LIMIT else "amortized"
    return requested


def proposal_ess(drawset: DrawSet, prior_log_prob: np.ndarray) -> np.ndarray:
    """Per-individual effective sample size of the draws as importance samples of the posterior under the training
    prior, weights p(y|phi) p(phi) / q(phi|y): near M when the estimator is accurate, near 1 when it is not."""
    logw = prior_log_prob - drawset.log_prior  # log p(phi) - (log q - log lik)
    logw = logw - logw.max(axis=1, keepdims=True)
    w = np.exp(logw)
    return w.sum(axis=1) ** 2 / np.sum(w * w, axis=1)


def likelihood_drawset(estimator: TrainedEstimator, model: IndividualModel, observations: np.ndarray,
                       design: Design, draws: np.ndarray, ids) -> DrawSet:
    """Draws weighted by p(y_i | phi) / q(phi | y_i): the objective becomes -log p(D | theta) itself (see
    :meth:`DrawSet.with_likelihood`); one pass of the flow's density and of the individual likelihood."""
    from amortized_nlme.marginal import individual_loglik

    log_q = estimator.log_prob(draws, observations, design)
    log_lik = individual_loglik(model, draws, observations, design)
    return DrawSet.with_likelihood(draws, model.prior, log_q, log_lik, ids=list(ids))


def weighted_drawset(likelihood: str, estimator: TrainedEstimator, model: IndividualModel, observations: np.ndarray,
                     design: Design, draws: np.ndarray, ids, timings: dict[str, float] | None = None
                     ) -> tuple[DrawSet, str]:
    """The draws with the weights ``likelihood`` asks for (as resolved by :func:`choose_likelihood`): exact
    weights are kept under "auto-exact" only when the estimator is a good enough proposal (median ESS)."""
    amortized = DrawSet(np.asarray(draws, dtype=np.float64), model.prior, ids=list(ids))
    if likelihood not in ("exact", "auto-exact"):
        return amortized, "amortized"
    t0 = time.perf_counter()
    exact = likelihood_drawset(estimator, model, observations, design, amortized.draws, ids)
    if timings is not None:
        timings["likelihood_weights_s"] = time.perf_counter() - t0
    ess = proposal_ess(exact, amortized.log_prior)
    need = max(20.0, EXACT_MIN_ESS_FRACTION * exact.M)
    logger.info("estimator as importance proposal: median ESS %.0f of %d draws", float(np.median(ess)), exact.M)
    if likelihood == "auto-exact" and np.median(ess) < need:
        logger.info("median ESS below %.0f: the estimator is not a good enough proposal for exact weights here; "
                    "using the amortized objective", need)
        return amortized, "amortized"
    if np.median(ess) < need:
        logger.warning("exact weights with a median ESS of %.0f: expect a large Monte-Carlo error",
                       float(np.median(ess)))
    return exact, "exact"


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
    from amortized_nlme.fit import fit, fit_with_enough_draws, profile_intervals

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
    out = Path(opts.out or REPO / "results" / f"{ctx.model.name}-{Path(opts.data).name.split('.')[0]}")
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
        "population_config": ctx.population_config,
        "n_draws": int(ctx.draws.shape[1]),
        "likelihood": ctx.likelihood,
        "seed": opts.seed,
        "package_versions": _versions(),
        "platform": platform.platform(),
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
    from amortized_nlme.marginal import ImportanceSampler, count_observations

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


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"amortized-nlme": amortized_nlme.__version__}
    for pkg in ("bayesflow", "keras", "jax", "pypesto", "numpy", "scipy", "numba"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out
