"""Whole inference phase (posterior sampling + 10-start fit) for 100 .. 100,000 individuals with the shipped
mrna_simple estimator, on synthetic populations from the seed paper's true values.

    python benchmarks/inference.py [--sizes 100 1000 10000] [--draws 100] [--starts 10] [--estimator DIR]
    python benchmarks/inference.py --compare [--sizes 1000 10000]   # posterior draws and log_prob only: BayesFlow's
                                                                     # eager path against the compiled (jax.jit) one

Prints a table and appends nothing to files: copy the numbers into benchmarks/README.md with the machine named.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from mrna_paper import TRUTH  # noqa: E402 - the seed paper's true population values, shared with that benchmark
from mrna_paper import synthetic_population as paper_population  # noqa: E402

from amortized_nlme.posterior import load_estimator  # noqa: E402
from amortized_nlme.population.fit import fit  # noqa: E402
from amortized_nlme.population.objective import DrawSet  # noqa: E402
from amortized_nlme.population import PopulationModel  # noqa: E402
from simulators import get_model  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def synthetic_population(model, n: int, rng: np.random.Generator):
    """``n`` cells from the seed paper's simple-model population (Arruda et al. 2024)."""
    return paper_population(model, TRUTH["mrna_simple"], n, rng)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--draws", type=int, default=100)
    parser.add_argument("--starts", type=int, default=10)
    parser.add_argument("--estimator", default=str(REPO / "trained_models" / "mrna_simple"),
                        help="trained mrna_simple estimator folder")
    parser.add_argument("--compare", action="store_true",
                        help="time sampling and log_prob through BayesFlow and through the compiled path (no fit)")
    args = parser.parse_args()
    model = get_model("mrna_simple")
    est = load_estimator(args.estimator, model)
    t0 = time.perf_counter()
    est.sample(*synthetic_population(model, 8, np.random.default_rng(0))[1:], 10)  # compile once, not timed
    print(f"first call (compilation): {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    if args.compare:
        compare(est, model, args.sizes, args.draws)
        return
    pop = PopulationModel(model.prior, random_effects=["delta", "gamma", "kms", "t0"])
    rows = []
    for n in args.sizes:
        rng = np.random.default_rng(n)
        _, obs, design = synthetic_population(model, n, rng)
        t0 = time.perf_counter()
        draws = est.sample(obs, design, args.draws, seed=1)
        t_sample = time.perf_counter() - t0
        t1 = time.perf_counter()
        ds = DrawSet(draws, model.prior)
        fr = fit(pop.with_fixed_std_from_draws(draws), ds, n_starts=args.starts, wald=False)
        t_fit = time.perf_counter() - t1
        rows.append((n, t_sample, t_fit, fr.n_converged))
        print(f"n={n}: sampling {t_sample:.1f} s, fit {t_fit:.1f} s", file=sys.stderr, flush=True)
    print(f"\n| individuals | draws each | sampling (s) | {args.starts}-start fit (s) | total (s) | starts converged |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n, ts, tf, nc in rows:
        print(f"| {n:,} | {args.draws} | {ts:.1f} | {tf:.1f} | {ts + tf:.1f} | {nc}/{args.starts} |")


def compare(est, model, sizes: list[int], n_draws: int) -> None:
    """Posterior draws and their log densities, BayesFlow's eager path and the compiled one back to back (the same
    process and moment, so that a busy machine slows both alike)."""
    small = synthetic_population(model, 8, np.random.default_rng(0))[1:]
    for use_jit in (False, True):  # compile both, not timed
        est.use_jit = use_jit
        est.log_prob(est.sample(*small, 10, seed=0), *small)
    print("\n| individuals | draws each | path | sampling (s) | draws/s | log_prob (s) | log_prob/s |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    for n in sizes:
        _, obs, design = synthetic_population(model, n, np.random.default_rng(n))
        for use_jit in (False, True):
            est.use_jit = use_jit
            t0 = time.perf_counter()
            draws = est.sample(obs, design, n_draws, seed=1)
            t_sample = time.perf_counter() - t0
            t0 = time.perf_counter()
            est.log_prob(draws, obs, design)
            t_lp = time.perf_counter() - t0
            rate = n * n_draws
            print(f"| {n:,} | {n_draws} | {'jax.jit' if use_jit else 'BayesFlow'} | {t_sample:.2f} | "
                  f"{rate / t_sample:,.0f} | {t_lp:.2f} | {rate / t_lp:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
