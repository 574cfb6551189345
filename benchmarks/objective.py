"""Benchmark: one objective+gradient evaluation and a 10-start fit versus the number of individuals.

Synthetic posterior draws (k = 6 log-parameters like ``mrna_simple``, Gaussian posteriors around individual parameters
drawn from a known population), M = 100 draws per individual by default. Prints a table; run with
``python benchmarks/objective.py [--n 100 1000 10000 100000] [--draws 100] [--starts 10] [--covariance diagonal]``.
Goal: n = 10,000 individuals, the whole 10-start fit in <= 10 s on 2 cores.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import numba
import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from amortized_nlme.population.fit import fit  # noqa: E402
from amortized_nlme.model import NormalPrior  # noqa: E402
from amortized_nlme.population.objective import DrawSet, PopulationObjective  # noqa: E402
from amortized_nlme.population import PopulationModel  # noqa: E402

NAMES = ("delta", "gamma", "kms", "t0", "offset", "sigma")
PRIOR = NormalPrior(NAMES, np.array([-3.0, -3.0, 5.0, 0.0, 0.0, 0.0]), np.full(6, 5.0))
BETA = np.array([-1.0, -3.5, 6.0, 0.5, 1.0, -1.0])
OMEGA = np.array([0.3, 0.5, 0.4, 0.2, 0.3, 0.1])
POST_SD = np.array([0.1, 0.2, 0.3, 0.1, 0.2, 0.05])


def synthetic_draws(n: int, M: int, seed: int = 0) -> np.ndarray:
    """Posterior draws ``[n, M, 6]``: individual parameters from the population, Gaussian posteriors around them."""
    rng = np.random.default_rng(seed)
    phi = BETA + OMEGA * rng.standard_normal((n, 6))
    centre = phi + POST_SD * rng.standard_normal((n, 6))
    return centre[:, None, :] + POST_SD * rng.standard_normal((n, M, 6))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[100, 1000, 10000, 100000])
    parser.add_argument("--draws", type=int, default=100)
    parser.add_argument("--starts", type=int, default=10)
    parser.add_argument("--covariance", choices=["diagonal", "full"], default="diagonal")
    parser.add_argument("--threads", type=int, default=None, help="numba threads (default: all)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.threads:
        numba.set_num_threads(args.threads)
    model = PopulationModel(PRIOR, covariance=args.covariance)
    # compile the kernel outside the timings
    warm = DrawSet(synthetic_draws(10, args.draws), PRIOR)
    PopulationObjective(model, warm).value_and_grad(model.initial_guess(warm.draws))

    print(f"# population objective, k=6, M={args.draws}, {args.covariance} Omega, {model.n_theta} parameters, "
          f"{numba.get_num_threads()} numba threads, {os.cpu_count()} cpus")
    print(f"{'n':>8} {'prepare s':>10} {'f+grad ms':>10} {'fit s':>8} {'evals':>6} {'conv':>5} {'max|err|':>9}")
    for n in args.n:
        draws = synthetic_draws(n, args.draws)
        t = time.perf_counter()
        ds = DrawSet(draws, PRIOR)
        t_prep = time.perf_counter() - t
        obj = PopulationObjective(model, ds)
        th = model.initial_guess(draws)
        reps = max(3, min(50, int(2e6 / (n * args.draws))))
        with threadpool_limits(1):  # as during the fit: BLAS threads would fight the numba threads
            obj.value_and_grad(th)
            t = time.perf_counter()
            for _ in range(reps):
                obj.value_and_grad(th)
            t_eval = (time.perf_counter() - t) / reps
        t = time.perf_counter()
        fr = fit(model, ds, n_starts=args.starts, wald=False)
        t_fit = time.perf_counter() - t
        n_eval = fr.objective.n_evaluations
        err = np.max(np.abs(fr.estimate[:6] - BETA))
        print(f"{n:>8} {t_prep:>10.3f} {1e3 * t_eval:>10.2f} {t_fit:>8.2f} {n_eval:>6} "
              f"{fr.n_converged:>2}/{fr.n_starts:<2} {err:>9.3f}", flush=True)
        del ds, obj, fr, draws


if __name__ == "__main__":
    main()
