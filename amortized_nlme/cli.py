"""Command-line interface: ``amortized-nlme simulate | train | check | infer | select-covariates``.

Each stage reads the previous stage's artifact and writes the next one; logs go to stderr, results to files.
Bad input ends with a one-paragraph message and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from amortized_nlme.errors import ConfigError

EXIT_USAGE = 2
#: --strict: the fit ran but its status is not ok
EXIT_STRICT = 3


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("jax._src.xla_bridge", "absl", "h5py", "matplotlib", "pypesto.objective", "numba"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _workflow_and_model(name: str, config: str | None):
    from amortized_nlme.config import load_workflow
    from simulators import get_model

    cfg = load_workflow(config or name)
    if cfg.model != name:
        raise ConfigError(f"{config}: the workflow is for model {cfg.model!r}, not {name!r}")
    return cfg, get_model(cfg.model, **cfg.model_options)


def _default_estimator(name: str) -> Path:
    from amortized_nlme.resources import estimator_dir

    return estimator_dir(name)


def _count(minimum: int):
    """argparse type: an integer of at least ``minimum`` (refused with a message before anything runs)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {value}")
        return value

    return parse


def _minutes(text: str) -> float:
    """argparse type of ``--max-minutes``: a finite number of minutes, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of minutes, got {text!r}") from None
    if not (value >= 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number of minutes, 0 or more, not {text}")
    return value


def _seconds(text: str) -> float:
    """argparse type of ``--dask-timeout``: a positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (0 < value < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text}")
    return value


def _quiet_dask_logging() -> None:
    """distributed sets its own log levels when imported: INFO chatter from the scheduler, and tracebacks of its
    reconnection attempts when the scheduler goes away, which this command reports itself as one message."""
    try:
        import distributed  # noqa: F401 - imported here so that the levels below stick
    except ImportError:
        return  # DaskExecutor says which extra to install
    logging.getLogger("distributed").setLevel(logging.WARNING)
    logging.getLogger("distributed.client").setLevel(logging.CRITICAL)


def cmd_simulate(args: argparse.Namespace) -> int:
    from amortized_nlme.simulation import DaskExecutor, simulate_to_store
    from amortized_nlme.simulation.distributed import DEFAULT_CONNECT_TIMEOUT

    if args.dask_timeout is not None and not args.dask:
        raise ConfigError("--dask-timeout needs --dask")
    if args.dask and not args.verbose:
        _quiet_dask_logging()
    # a bad --dask address is refused before the workflow is read or anything is started
    executor = (DaskExecutor(args.dask, connect_timeout=args.dask_timeout or DEFAULT_CONNECT_TIMEOUT)
                if args.dask else None)
    cfg, model = _workflow_and_model(args.model, args.config)
    n = args.n or cfg.simulation.n
    out = Path(args.out or Path("simulations") / f"{args.model}.h5")
    out.parent.mkdir(parents=True, exist_ok=True)
    simulate_to_store(model, n, out, seed=args.seed if args.seed is not None else cfg.simulation.seed,
                      chunk_size=args.chunk_size or cfg.simulation.chunk_size, workers=args.workers,
                      overwrite=args.overwrite, executor=executor)
    print(out)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from amortized_nlme.training import train

    cfg, model = _workflow_and_model(args.model, args.config)
    if args.mode:
        cfg.training.mode = args.mode
    out = Path(args.out or _default_estimator(args.model))
    store = args.store or str(Path("simulations") / f"{args.model}.h5")
    finished = train(cfg, model, out, store_path=store, max_minutes=args.max_minutes, verbose=args.keras_verbose)
    if not finished:
        print(f"training paused at the time budget; run the same command again to resume ({out}/checkpoint)",
              file=sys.stderr)
        return 0
    print(out)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from amortized_nlme.posterior import load_estimator
    from amortized_nlme.training import run_check

    cfg, model = _workflow_and_model(args.model, args.config)
    est = load_estimator(args.estimator or _default_estimator(args.model), model)
    seed = args.seed if args.seed is not None else cfg.check.seed
    # the check at the workflow's seed is the estimator's recorded check (diagnostics in meta.json, plots); a check at
    # another seed is recorded compactly beside it (diagnostics.other_seeds)
    result = run_check(est, n_simulations=args.n_simulations or cfg.check.n_simulations,
                       n_draws=args.n_draws or cfg.check.n_draws, seed=seed, write_meta=not args.no_record,
                       plots=not args.no_record,
                       record_as="main" if seed == cfg.check.seed else "other")
    gate = result["gate"]
    width = max(len(n) for n in model.param_names)
    print(f"calibration check of {est.path} at seed {seed} ({result['n_simulations']} simulations x "
          f"{result['n_draws']} draws)")
    print(f"{'parameter':<{width}}  calib.err  in band  excursion  p-value  cov90  contraction  NRMSE    R2")
    for name in model.param_names:
        print(f"{name:<{width}}  {result['calibration_error'][name]:9.3f}  "
              f"{'yes' if gate['inside_band'][name] else 'NO':>7}  {gate['max_excursion'][name]:9.4f}  "
              f"{gate['p_value'][name]:7.4f}  {result['coverage_90'][name]:5.2f}  "
              f"{result['posterior_contraction'][name]:11.2f}  {result['nrmse'][name]:5.2f}  "
              f"{result['r2'][name]:5.2f}")
    if result.get("draws_redrawn_outside_support"):
        print(f"{result['draws_redrawn_outside_support']} of {result['n_simulations'] * result['n_draws']} draws were "
              "outside the prior's support and redrawn")
    proposal = result.get("proposal", {})
    if "skipped" in proposal:
        print(f"proposal quality: skipped, {proposal['skipped']}")
    elif proposal:
        print(f"proposal quality (importance weights p(y|phi) p(phi) / q(phi|y)): Pareto k-hat median "
              f"{proposal['khat_median']:.2f}, 90th percentile {proposal['khat_p90']:.2f}, "
              f"{100 * proposal['fraction_khat_above_0.7']:.1f}% of simulations above 0.7; ESS median "
              f"{100 * proposal['ess_fraction_median']:.1f}%, 10th percentile "
              f"{100 * proposal['ess_fraction_p10']:.1f}% of the draws")
    print(f"gate: every rank ECDF inside its simultaneous {100 * gate['per_parameter_level']:.2f}% band "
          f"(family-wise {100 * gate['family_level']:.0f}% over {gate['n_parameters']} parameters); "
          f"Bonferroni p-value {gate['family_p_value']:.4f}")
    print("calibration check", "PASSED" if result["passed"] else
          f"FAILED (worst: {gate['worst_parameter']}, excursion {gate['worst_excursion']:.4f})")
    return 0 if result["passed"] or not args.strict else 1


def cmd_infer(args: argparse.Namespace) -> int:
    from amortized_nlme.inference import InferenceOptions, run_inference

    opts = InferenceOptions(
        model=args.model, data=args.data, population=args.pop, estimator=args.estimator, out=args.out,
        config=args.config, n_draws=args.draws, n_starts=args.starts, profiles=not args.no_profiles,
        seed=args.seed, groups=args.groups, max_individuals=args.max_individuals, mc_refits=args.mc_refits,
        mc_target=args.mc_target, max_draws=args.max_draws,
        marginal=args.marginal, profile_parameters=args.profile, likelihood=args.likelihood,
        cache_dir=args.cache_dir)
    out = run_inference(opts)
    print(out)
    if args.strict and getattr(run_inference, "last_status", "ok") != "ok":
        print(f"amortized-nlme infer: status {run_inference.last_status} (--strict): see {out}/summary.json",
              file=sys.stderr)
        return EXIT_STRICT
    return 0


def cmd_select(args: argparse.Namespace) -> int:
    from amortized_nlme.inference import InferenceOptions, run_selection

    opts = InferenceOptions(model=args.model, data=args.data, population=args.pop, estimator=args.estimator,
                            out=args.out, config=args.config, n_draws=args.draws, seed=args.seed,
                            likelihood=args.likelihood, n_starts=args.starts, cache_dir=args.cache_dir)
    print(run_selection(opts, args.covariates, args.parameters, args.strategy, refit=not args.no_refit))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    print(describe_models())
    return 0


def describe_models() -> str:
    """A readable list of every registered model: what it is, its parameters, whether it has a likelihood (exact
    inference) and its shipped estimator with that estimator's training design and check."""
    from amortized_nlme.posterior import read_meta
    from amortized_nlme.resources import estimator_dir
    from simulators import MODELS, get_model

    blocks = []
    for name in sorted(MODELS):
        model = get_model(name)
        doc = (type(model).__doc__ or "").strip().splitlines()[0]
        lines = [f"{name} (version {model.version}): {doc}",
                 f"  parameters (log scale): {', '.join(model.param_names)}",
                 f"  likelihood: {'yes (exact inference)' if model.has_likelihood else 'no (amortized objective only)'}"]
        design = model.design_description()
        if design:
            lines.append(f"  training design: {design}")
        try:
            meta = read_meta(estimator_dir(name))
        except Exception:  # noqa: BLE001 - no shipped estimator, or not readable: say so
            lines.append("  shipped estimator: none")
        else:
            training = meta.get("training", {})
            diag = meta.get("diagnostics", {})
            seen = training.get("simulations_seen")
            check = "not checked" if not diag else ("passed" if diag.get("passed") else "FAILED (flagged)")
            lines.append(f"  shipped estimator: {estimator_dir(name)} ({seen:,} simulations; calibration check "
                         f"{check})" if seen else f"  shipped estimator: {estimator_dir(name)} (check {check})")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="amortized-nlme", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list the individual models, their parameters and shipped estimators")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("simulate", help="stage 1: simulate prior-predictive data into an HDF5 store")
    p.add_argument("model", help="individual model (see `amortized-nlme models`)")
    p.add_argument("-n", type=_count(1), help="number of simulations (default: workflow config)")
    p.add_argument("--out", help="store path (default simulations/<model>.h5)")
    p.add_argument("--seed", type=_count(0), help="seed of the store (default: the workflow's [simulation]); same "
                   "seed, same bytes")
    p.add_argument("--chunk-size", type=_count(1), help="simulations per chunk (unit of resumption and of parallel "
                   "work)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--workers", type=_count(1), default=None,
                       help="processes (default: one process, all numba threads)")
    where.add_argument("--dask", metavar="ADDRESS",
                       help="simulate the chunks on Dask: local or local:N (a local cluster of N single-threaded "
                            "worker processes, default 2) or a scheduler address such as tcp://host:8786; this "
                            "process writes the store (same bytes, same resume); needs the dask extra")
    p.add_argument("--dask-timeout", type=_seconds, metavar="SECONDS",
                   help="give up reaching the Dask scheduler after this many seconds (default 10)")
    p.add_argument("--overwrite", action="store_true", help="replace a store made with other settings")
    p.add_argument("--config", help="workflow TOML (default workflows/<model>.toml)")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("train", help="stage 2: train the estimator (resumes from its checkpoint)")
    p.add_argument("model", help="individual model (see `amortized-nlme models`)")
    p.add_argument("--config", help="workflow TOML (default workflows/<model>.toml)")
    p.add_argument("--store", help="simulation store for offline training (default simulations/<model>.h5)")
    p.add_argument("--mode", choices=["online", "offline"], help="override the workflow's training mode")
    p.add_argument("--out", help="estimator folder (default trained_models/<model>)")
    p.add_argument("--max-minutes", type=_minutes,
                   help="stop after the epoch that ends past this many minutes (checkpointed; run again to resume)")
    p.add_argument("--keras-verbose", type=int, choices=[0, 1, 2], default=0, help="Keras progress output (0, 1 or 2)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("check", help="calibration check (SBC, recovery, contraction) of a trained estimator")
    p.add_argument("model", help="individual model (see `amortized-nlme models`)")
    p.add_argument("--config", help="workflow TOML (default workflows/<model>.toml)")
    p.add_argument("--estimator", help="estimator folder (default trained_models/<model>)")
    p.add_argument("--n-simulations", type=int, help="held-out simulations (default: the workflow's [check])")
    p.add_argument("--n-draws", type=int, help="posterior draws per simulation (default: the workflow's [check])")
    p.add_argument("--seed", type=int, help="simulation and sampling seed (default: the workflow's [check] seed, whose "
                   "result is the estimator's recorded check; other seeds are recorded as diagnostics.other_seeds)")
    p.add_argument("--no-record", action="store_true", help="leave meta.json and the plots as they are")
    p.add_argument("--strict", action="store_true", help="exit 1 when the check fails")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("infer", help="stage 3: fit a population model to data")
    p.add_argument("model", help="individual model (see `amortized-nlme models`)")
    p.add_argument("--data", required=True, help="long-format CSV (ID, TIME, DV, ...)")
    p.add_argument("--pop", help="population model TOML/JSON (default: the workflow's [population])")
    p.add_argument("--estimator", help="estimator folder (default trained_models/<model>)")
    p.add_argument("--config", help="workflow TOML (default workflows/<model>.toml)")
    p.add_argument("--out", help="results folder (default results/<model>-<data>)")
    p.add_argument("--draws", type=int, help="posterior draws per individual, fixed (default: start from a number "
                   "chosen from the data size and add draws until the Monte-Carlo error is small, see --mc-target)")
    p.add_argument("--mc-target", type=float, default=0.3,
                   help="without --draws: add draws until every estimate's Monte-Carlo error (RMS of its MC SE and "
                        "jackknife bias) is at most this fraction of its statistical SE (default 0.3)")
    p.add_argument("--max-draws", type=int, help="without --draws: at most this many draws per individual "
                   "(default: 8 x the start, <= 10,000, within ~2 GB of draws)")
    p.add_argument("--starts", type=int, default=10, help="multistart count")
    p.add_argument("--no-profiles", action="store_true", help="skip profile likelihoods")
    p.add_argument("--seed", type=int, default=0, help="seed of the posterior draws, starts and plots (default 0)")
    p.add_argument("--groups", nargs="*", help="only these groups (e.g. eGFP d2eGFP)")
    p.add_argument("--max-individuals", type=int, help="random subset of this many individuals")
    p.add_argument("--mc-refits", type=int, default=4,
                   help="disjoint draw subsets refitted for the Monte-Carlo error (0: not measured, draws not adapted)")
    p.add_argument("--profile", nargs="+", metavar="PARAM", help="profile only these population parameters")
    p.add_argument("--likelihood", choices=["auto", "exact", "amortized"], default="auto",
                   help="exact: weights p(y|phi)/g(phi), the estimator (refined where it misses) only as importance "
                        "proposal for the model's own likelihood; amortized: weights 1/p(phi), the seed paper's "
                        "objective, right only if the estimator is; auto (default): exact whenever the model has a "
                        "likelihood, amortized for SDEs")
    p.add_argument("--marginal", choices=["auto", "on", "off"], default="auto",
                   help="-2LL/OFV/AIC/BIC/BICc by importance sampling on fresh draws (exact likelihood: always "
                        "unless off; amortized: auto = on unless the data set is large)")
    p.add_argument("--cache-dir", help="posterior-draw cache (default: the user cache directory, "
                                       "$AMORTIZED_NLME_CACHE or ~/.cache/amortized-nlme)")
    p.add_argument("--strict", action="store_true",
                   help="exit with code 3 when the result status is not ok (warnings or unreliable)")
    p.set_defaults(func=cmd_infer)

    p = sub.add_parser("select-covariates", help="covariate selection by BICc, every fit on the same draws, then a "
                                                 "full fit of the selected model")
    p.add_argument("model", help="individual model (see `amortized-nlme models`)")
    p.add_argument("--data", required=True, help="long-format CSV (NONMEM layout by default), or example:<name>")
    p.add_argument("--pop", help="base population model TOML/JSON whose [covariate_definitions] define the candidates")
    p.add_argument("--covariates", nargs="+", required=True, help="candidate covariates (names from the population "
                                                                  "file's [covariate_definitions])")
    p.add_argument("--parameters", nargs="+", help="parameters that may get covariates (default: random effects)")
    p.add_argument("--estimator", help="estimator folder (default: the shipped one)")
    p.add_argument("--config", help="workflow TOML (default workflows/<model>.toml)")
    p.add_argument("--out", help="results folder (default results/<model>-<data>-covariates)")
    p.add_argument("--draws", type=int, help="posterior draws per individual (default: from the data size)")
    p.add_argument("--starts", type=int, default=10, help="multistart count of the final fit")
    p.add_argument("--strategy", choices=["auto", "exhaustive", "stepwise"], default="auto",
                   help="exhaustive search up to 512 models, else stepwise (auto)")
    p.add_argument("--likelihood", choices=["auto", "exact", "amortized"], default="auto",
                   help="as for infer (auto: exact whenever the model has a likelihood)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws and starts")
    p.add_argument("--cache-dir", help="posterior-draw cache (default: the user cache directory)")
    p.add_argument("--no-refit", action="store_true", help="stop at the ranking (no full fit of the selected model)")
    p.set_defaults(func=cmd_select)
    return parser


def _enable_jax_compilation_cache() -> None:
    """Keep XLA's compiled programs between runs (``<user cache>/jax``, see
    :func:`amortized_nlme.resources.user_cache_dir`): loading an estimator and the first posterior sampling of a
    process otherwise spend seconds compiling ~100 small programs. ``AMORTIZED_NLME_JAX_CACHE=off`` disables it, a
    path moves it."""
    where = os.environ.get("AMORTIZED_NLME_JAX_CACHE", "")
    if where.lower() == "off" or os.environ.get("KERAS_BACKEND") != "jax":
        return
    try:
        import jax

        from amortized_nlme.resources import user_cache_dir

        folder = Path(where) if where else user_cache_dir() / "jax"
        folder.mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", str(folder))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    except (ImportError, OSError, AttributeError) as exc:  # a cache is an optimization, never a reason to fail
        logging.getLogger(__name__).debug("no JAX compilation cache: %s", exc)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    os.environ.setdefault("KERAS_BACKEND", "jax")
    _enable_jax_compilation_cache()
    from amortized_nlme.errors import USER_ERRORS

    try:
        return args.func(args)
    except USER_ERRORS as exc:
        if args.verbose:
            raise
        print(f"amortized-nlme {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        if args.command in ("train", "simulate"):
            hint = "run the same command again to resume from where it stopped"
        else:
            hint = "run it again (posterior draws already made are cached)"
        print(f"amortized-nlme {args.command}: interrupted; {hint}", file=sys.stderr)
        return 130
    except OSError as exc:  # the file system refused (permissions, disk full, a path that is a folder, ...)
        if args.verbose:
            raise
        where = f" ({exc.filename})" if exc.filename and str(exc.filename) not in str(exc) else ""
        print(f"amortized-nlme {args.command}: error: {exc}{where}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
