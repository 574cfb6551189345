"""Theophylline case study: covariate selection by BICc with the amortized estimator, side by side with the literature.

Data: ``amortized_nlme/example_data/theo_saemix.csv`` (12 subjects, single oral dose, Weight and Sex). Model:
``pk_oral_1cmt`` (ka, ke, V log-normal with diagonal Omega, additive residual error without random effect).
Candidates: log(weight / mean weight) and sex on ka, ke and V (6 relations, 64 models, exhaustive), every fit on the
same posterior draws; the best models then get an importance-sampling -2LL, AIC, BIC and BICc.

Reference (Rohleff et al. 2025, VAE; COSSAC and SCM in Monolix agree): weight on V and on ka, sex on none;
ka 1.63 /h, ke 0.086 /h, V 31.97 L, omega (0.53, 0.15, 0.13), a 0.71 mg/L, -2LL about 331-332.

    python benchmarks/theophylline.py                         # trained_models/pk_oral_1cmt, writes theophylline.md
    python benchmarks/theophylline.py --tiny-train /tmp/tiny  # smoke test with an estimator trained in seconds
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from amortized_nlme.config import load_population  # noqa: E402
from amortized_nlme.data import read_dataset  # noqa: E402
from amortized_nlme.posterior import load_estimator  # noqa: E402
from amortized_nlme.population.fit import fit  # noqa: E402
from amortized_nlme.inference.weights import likelihood_drawset  # noqa: E402
from amortized_nlme.population.marginal import ImportanceSampler, count_observations  # noqa: E402
from amortized_nlme.population.objective import DrawSet  # noqa: E402
from amortized_nlme.population import PopulationModel, dummy_columns  # noqa: E402
from amortized_nlme.population.selection import build_model, covariate_columns, select_covariates, write_selection  # noqa: E402
from simulators import get_model  # noqa: E402

logger = logging.getLogger("theophylline")

DATA = REPO / "amortized_nlme" / "example_data" / "theo_saemix.csv"
REFERENCE = {
    "relations": {("V", "lwt"), ("ka", "lwt")},
    "ka": 1.63, "ke": 0.086, "V": 31.97, "omega_ka": 0.53, "omega_ke": 0.15, "omega_V": 0.13, "a": 0.71,
    "minus2ll": "331-332",
}


def tiny_estimator(out: Path, model) -> Path:
    """Train a throw-away estimator in seconds (tests the pipeline, not the numbers)."""
    from amortized_nlme.config import NetworkConfig, TrainingConfig, WorkflowConfig, load_workflow
    from amortized_nlme.training import train

    try:
        cfg = load_workflow("pk_oral_1cmt")
    except FileNotFoundError:
        cfg = WorkflowConfig(model="pk_oral_1cmt", network=NetworkConfig(strides=[1, 1]), training=TrainingConfig())
    cfg.network.summary_dim, cfg.network.recurrent_dim = 8, 8
    cfg.network.filters = [8] * len(cfg.network.kernel_sizes)
    cfg.network.flow_depth, cfg.network.flow_widths = 2, [16, 16]
    cfg.training.mode, cfg.training.epochs, cfg.training.steps_per_epoch = "online", 2, 4
    cfg.training.batch_size, cfg.training.validation_size = 64, 128
    if not (out / "meta.json").exists():
        train(cfg, model, out, verbose=0)
    return out


def covariates_of(data) -> dict[str, np.ndarray]:
    """Candidate covariate columns: lwt = log(weight / mean weight), sex as a 0/1 dummy (reference: lowest level)."""
    frame = data.covariates
    wt = np.asarray(frame["Weight"], dtype=np.float64)
    cov = {"lwt": np.log(wt / wt.mean())}
    cov.update(dummy_columns(np.asarray(frame["Sex"]).astype(int), "sex"))
    return cov


def natural(model: PopulationModel, theta: np.ndarray) -> dict[str, float]:
    """Typical values (at mean weight, reference sex), omega sds (log scale) and the additive residual sd."""
    t = model.transform(theta)
    out = {p: t["natural_mean"][p] for p in ("ka", "ke", "V")}
    out.update({f"omega_{p}": t["omega_sd"][p] for p in ("ka", "ke", "V")})
    out["a"] = t["natural_mean"]["sigma_add"]
    out.update(t["covariate_effects"])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--estimator", default=str(REPO / "trained_models" / "pk_oral_1cmt"))
    ap.add_argument("--tiny-train", metavar="DIR", help="train a tiny estimator into DIR and use it (smoke test)")
    ap.add_argument("--draws", type=int, default=4000, help="posterior draws per subject for the fits")
    ap.add_argument("--is-draws", type=int, default=4000, help="importance-sampling draws per subject")
    ap.add_argument("--starts", type=int, default=3)
    ap.add_argument("--top", type=int, default=8, help="models by the objective that get an importance-sampling BICc")
    ap.add_argument("--likelihood", choices=["exact", "amortized"], default="exact",
                    help="weights of the fitting draws: p(y|phi)/q(phi|y) (exact) or 1/p(phi) (amortized)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--md", help="markdown output (default benchmarks/theophylline.md; none for --tiny-train)")
    ap.add_argument("--out", help="folder for selection.{json,md,png} (default results/theophylline-covariates)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("amortized_nlme.population.fit", "amortized_nlme.population.objective", "pypesto", "jax", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    model = get_model("pk_oral_1cmt")
    est_dir = tiny_estimator(Path(args.tiny_train), model) if args.tiny_train else Path(args.estimator)
    if not (est_dir / "meta.json").exists():
        print(f"no trained estimator at {est_dir} (train it with `amortized-nlme train pk_oral_1cmt`)", file=sys.stderr)
        return 2
    estimator = load_estimator(est_dir, model)
    config = load_population(REPO / "workflows" / "populations" / "theo_saemix.toml")
    data = read_dataset(DATA, covariates=["Weight", "Sex"], **{**config.data.reader_options(), "categorical": []})
    obs, design = model.from_dataset(data)
    cov = covariates_of(data)
    n_obs = count_observations(obs, design)

    t0 = time.perf_counter()
    phi = estimator.sample(obs, design, args.draws, seed=args.seed)
    if args.likelihood == "exact":
        draws = likelihood_drawset(estimator, model, obs, design, phi, data.ids)
    else:
        draws = DrawSet(phi, model.prior, ids=data.ids)
    t_draws = time.perf_counter() - t0
    base = PopulationModel(model.prior, random_effects=["ka", "ke", "V"], covariance="diagonal")
    base = base.with_fixed_std_from_draws(draws.draws, fraction=0.2)
    t0 = time.perf_counter()
    sampler = ImportanceSampler(model, estimator, obs, design, n_draws=args.is_draws, pilot_draws=draws.draws,
                                seed=args.seed + 1)
    t_sampler = time.perf_counter() - t0
    result = select_covariates(base, draws, cov, ["lwt", "sex"], n_obs, parameters=["ka", "ke", "V"],
                               strategy="exhaustive", n_starts=args.starts, seed=args.seed, sampler=sampler, top_k=args.top)
    out_dir = Path(args.out) if args.out else REPO / "results" / "theophylline-covariates"
    write_selection(result, out_dir)

    # the reference covariate model, fitted and evaluated the same way (whether or not we selected it)
    ref_model = build_model(base, sorted(REFERENCE["relations"]), covariate_columns(["lwt", "sex"], cov))
    ref_fit = next((v for v in result.visited if set(v.relations) == REFERENCE["relations"]), None)
    if ref_fit is None:  # not possible in an exhaustive search, kept for other strategies
        ref_est = fit(ref_model, draws, cov, n_starts=args.starts, seed=args.seed, wald=False).estimate
    else:
        ref_est = ref_fit.estimate
    ref_ml = ref_fit.marginal if ref_fit is not None and ref_fit.marginal is not None else \
        sampler.evaluate(ref_model, ref_est, cov)

    sel = result.selected
    ours = natural(sel.model, sel.estimate)
    ours_ref = natural(ref_model, ref_est)
    c = sel.marginal.criteria
    rows = [
        ("selected relations", relabel(sel.relations), "V~weight + ka~weight",
         relabel(tuple(REFERENCE["relations"]))),
        ("ka (1/h)", f"{ours['ka']:.3f}", f"{REFERENCE['ka']}", f"{ours_ref['ka']:.3f}"),
        ("ke (1/h)", f"{ours['ke']:.4f}", f"{REFERENCE['ke']}", f"{ours_ref['ke']:.4f}"),
        ("V (L)", f"{ours['V']:.2f}", f"{REFERENCE['V']}", f"{ours_ref['V']:.2f}"),
        ("omega ka, ke, V", fmt3(ours, "omega"), "0.53, 0.15, 0.13", fmt3(ours_ref, "omega")),
        ("a (mg/L)", f"{ours['a']:.3f}", f"{REFERENCE['a']}", f"{ours_ref['a']:.3f}"),
        ("-2LL (importance sampling)", f"{sel.marginal.minus2ll:.2f} ± {sel.marginal.minus2ll_se:.2f}",
         REFERENCE["minus2ll"], f"{ref_ml.minus2ll:.2f} ± {ref_ml.minus2ll_se:.2f}"),
        ("BICc", f"{c['bicc']:.2f}", "", f"{ref_ml.criteria['bicc']:.2f}"),
    ]
    header = ["", "amortized (selected)", "Rohleff et al. 2025 / Monolix", "amortized, reference covariate model"]
    table = md_table(header, rows)
    print(table)
    timing = (f"{result.n_fits} fits ({args.starts} starts each) in {result.time_s:.1f} s on {os.cpu_count()} cores; "
              f"posterior draws {t_draws:.1f} s ({args.draws} per subject); importance sampling "
              f"{t_sampler + result.marginal_time_s:.1f} s ({args.is_draws} draws per subject)")
    print(timing)
    md_path = Path(args.md) if args.md else (None if args.tiny_train else REPO / "benchmarks" / "theophylline.md")
    if md_path is not None:
        md_path.write_text(report(result, table, timing, est_dir, estimator.sha256, base))
        print(md_path)
    return 0


def relabel(relations) -> str:
    names = {"lwt": "weight", "sex": "sex"}
    return " + ".join(f"{p}~{names.get(c, c)}" for p, c in sorted(relations)) or "none"


def fmt3(d: dict, key: str) -> str:
    return ", ".join(f"{d[f'{key}_{p}']:.2f}" for p in ("ka", "ke", "V"))


def md_table(header: list[str], rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def report(result, table: str, timing: str, est_dir: Path, sha: str, base: PopulationModel) -> str:
    """Markdown write-up: setup, side-by-side table, all models ranked, how BICc counts parameters."""
    h = ", ".join(f"{p} {v:.3f}" for p, v in base.fixed_std.items())
    return "\n".join([
        "# Theophylline: covariate selection by BICc",
        "",
        "Generated by `python benchmarks/theophylline.py` (do not edit by hand).",
        "",
        f"Data `theo_saemix.csv`: {result.n_individuals} subjects, {result.n_observations} concentrations. "
        f"Model `pk_oral_1cmt` (estimator `{est_dir.name}`, sha256 {sha[:12]}): ka, ke, V log-normal with diagonal "
        "Omega, additive error a without random effect (population kernel width on log a: "
        f"{h}). Candidates: log(weight/mean weight) and sex on ka, ke, V — 6 relations, {2 ** len(result.relations)} "
        "models, exhaustive, every fit on the same posterior draws.",
        "",
        table,
        "",
        timing + ".",
        "",
        "Typical values at mean weight (and the reference sex level). omega: standard deviations of the "
        "log-parameters.",
        "The reference values are those reported by Rohleff et al. (2025) for the model with weight on V and ka.",
        "",
        "## All models (best 10 and those with importance-sampling likelihoods)",
        "",
        result.markdown(),
        "",
        "ΔBICc from the amortized objective (2 J + penalty; J omits a constant shared by all models). -2LL by "
        "importance sampling with the estimator's posterior as proposal, defensively mixed with the population "
        "density and a t approximation of the individual conditional distribution; ± is the Monte-Carlo SE.",
        "",
        "BICc (Delattre, Lavielle and Poursat 2014) = -2LL + P_R log N + P_F log N_tot: P_R counts the means of ka, "
        "ke, V, the covariate coefficients on them and the Omega entries; P_F counts the mean of the residual-error "
        "parameter (no random effect). BIC uses log N for every parameter.",
        "",
    ])


if __name__ == "__main__":
    sys.exit(main())
