"""What exact weights cost: the model evaluations behind p(y_i | phi_ij) for 10,000 individuals, for every model with
a likelihood.

For each model: 10,000 individuals with designs from the model's training design and data simulated from its prior,
M draws per individual (from the prior: the cost does not depend on where the draws are), then the two steps the
exact objective takes, timed in this process:

* ``loglik``: log p(y_i | phi_ij) with the model's own residual sds (``individual_loglik``; the objective's path for
  an estimator whose parameters include the residual error and a population without residual_error), and
* ``residual``: the per-draw residual statistics when the residual error is a population parameter (the default for
  every model that has an error model; ``residual_statistics``: additive error, sufficient statistics).

Both run in batches of at most ``PREDICTION_BATCH`` model evaluations, so memory is bounded by the batch and by the
[n, M] result, not by n x M x time points. Peak memory (tracemalloc, numpy arrays included) is reported.

    python benchmarks/exact_weights_cost.py [--n 10000] [--draws 100] [--models ...]

Writes benchmarks/exact_weights_cost.json and prints a markdown table (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import tracemalloc
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from amortized_nlme.inference.likelihood import PREDICTION_BATCH, individual_loglik, residual_statistics
from simulators import MODELS, get_model


def population(model, n: int, draws: int, seed: int = 0):
    """Designs, observations simulated at one prior draw each, and ``draws`` further prior draws per individual."""
    rng = np.random.default_rng(seed)
    design = model.sample_design(n, rng)
    truth = model.prior.sample(n, rng)
    observations = np.asarray(model.simulate(truth, design, rng))
    phi = model.prior.sample(n * draws, rng).reshape(n, draws, -1)
    return design, observations, phi


def timed(fn, *args, **kwargs) -> tuple[float, float, object]:
    """(seconds, peak MiB above the start, result) of one call."""
    tracemalloc.start()
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return seconds, peak, result


def measure(name: str, n: int, draws: int) -> dict:
    model = get_model(name)
    design, observations, phi = population(model, n, draws)
    points = int(model.observation_points(observations, design)[1].sum())
    row: dict = {"model": name, "n": n, "draws": draws, "observations": points,
                 "evaluations": n * draws, "observation_points_x_draws": points * draws}
    small = slice(0, min(n, 50))  # compiles the numba code outside the timing
    individual_loglik(model, phi[small], observations[small], {k: v[small] for k, v in design.items()})
    seconds, peak, ll = timed(individual_loglik, model, phi, observations, design)
    row["loglik"] = {"seconds": seconds, "peak_mib": peak, "finite_share": float(np.isfinite(ll).mean())}
    kinds = model.residual_kinds()
    if "additive" in kinds:
        residual_statistics(model, phi[small], observations[small], {k: v[small] for k, v in design.items()},
                            "additive")
        seconds, peak, _ = timed(residual_statistics, model, phi, observations, design, "additive")
        row["residual"] = {"seconds": seconds, "peak_mib": peak}
    return row


def table(rows: list[dict]) -> str:
    lines = [f"| model | observations ({rows[0]['n']:,} individuals) | log p(y \\| phi): s | s per 10⁶ draws × points | "
             f"peak MiB | residual statistics: s | peak MiB |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        per = r["loglik"]["seconds"] / r["observation_points_x_draws"] * 1e6
        res = r.get("residual")
        residual = f"{res['seconds']:.1f} | {res['peak_mib']:.0f}" if res else "– | –"
        lines.append(f"| `{r['model']}` | {r['observations']:,} | {r['loglik']['seconds']:.1f} | {per:.3f} | "
                     f"{r['loglik']['peak_mib']:.0f} | {residual} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--draws", type=int, default=100)
    parser.add_argument("--models", nargs="+", default=[m for m in MODELS if get_model(m).has_likelihood])
    parser.add_argument("--json", default=str(REPO / "benchmarks" / "exact_weights_cost.json"))
    args = parser.parse_args()
    rows = []
    for name in args.models:
        rows.append(measure(name, args.n, args.draws))
        r = rows[-1]
        print(f"{name}: log-likelihood {r['loglik']['seconds']:.1f} s, peak {r['loglik']['peak_mib']:.0f} MiB; "
              f"residual statistics {r.get('residual', {}).get('seconds', float('nan')):.1f} s", flush=True)
    out = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs",
           "prediction_batch": PREDICTION_BATCH, "rows": rows}
    Path(args.json).write_text(json.dumps(out, indent=2))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
