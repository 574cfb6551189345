"""Simulation stage throughput on Dask against the process pool: the same store (model, n, seed, chunk size) made by
one process, the process pool, and a Dask LocalCluster of 1 and 2 single-threaded workers, in one run.

Run as ``python benchmarks/dask_simulation.py [--model mrna_detailed] [--n 20000] [--chunk-size 1000]``; writes
``benchmarks/dask_simulation.json`` and prints a markdown table. Rates are simulations per wall-clock second of the
whole ``simulate_to_store`` call, start-up included (process spawn, cluster start, numba's cached code loaded in every
worker); for Dask the cluster start is also given on its own, and the rate without it. Every store is checked to hold
the same bytes as the one-process store. Wall-clock rates depend on whatever else runs on the machine: the load
average before and after is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amortized_nlme.simulation import DaskExecutor, compute_chunk, simulate_to_store  # noqa: E402
from amortized_nlme.simulation.simulate import available_cores  # noqa: E402
from simulators import get_model  # noqa: E402

HERE = Path(__file__).resolve().parent


def _contents(path: Path) -> dict[str, bytes]:
    """Every dataset's bytes."""
    out: dict[str, bytes] = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()].tobytes()) if isinstance(obj, h5py.Dataset)
                     else None)
    return out


def _timed_store(label: str, folder: Path, args: argparse.Namespace, **kwargs: Any) -> tuple[dict, Path]:
    """One full ``simulate_to_store`` call, timed."""
    path = folder / f"{label.replace(' ', '_')}.h5"
    t0 = time.perf_counter()
    simulate_to_store(get_model(args.model), args.n, path, seed=args.seed, chunk_size=args.chunk_size,
                      progress=False, **kwargs)
    wall = time.perf_counter() - t0
    return {"setup": label, "wall_s": round(wall, 3), "sims_per_s": round(args.n / wall, 1)}, path


def _dask_store(n_workers: int, folder: Path, args: argparse.Namespace) -> tuple[dict, Path]:
    """A LocalCluster of ``n_workers`` single-threaded workers, timed from the cluster start."""
    from distributed import Client, LocalCluster

    t0 = time.perf_counter()
    with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster, set_as_default=False) as client:
        startup = time.perf_counter() - t0
        executor = DaskExecutor(client, numba_threads=max(1, available_cores() // n_workers))
        row, path = _timed_store(f"Dask LocalCluster, {n_workers} worker{'s' if n_workers > 1 else ''}", folder,
                                 args, executor=executor)
    total = row["wall_s"] + startup
    row.update(wall_s=round(total, 3), sims_per_s=round(args.n / total, 1), cluster_start_s=round(startup, 3),
               sims_per_s_without_start=round(args.n / (total - startup), 1))
    return row, path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mrna_detailed", help="the most expensive simulator by default")
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--chunk-size", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pool-workers", type=int, default=max(2, available_cores()),
                        help="processes of the process pool (default: the cores, at least 2)")
    parser.add_argument("--json", default=str(HERE / "dask_simulation.json"))
    args = parser.parse_args()

    import dask
    import distributed
    import numba

    # compile (or load numba's cache) once here, so that no setup pays for compiling
    compute_chunk(get_model(args.model), args.seed, 0, 10, 10)
    load_before = os.getloadavg()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="dask-bench-") as tmp:
        folder = Path(tmp)
        row, reference = _timed_store("one process (numba threads on all cores)", folder, args)
        rows.append(row)
        row, path = _timed_store(f"process pool, {args.pool_workers} processes", folder, args,
                                 workers=args.pool_workers)
        rows.append(row)
        stores = [path]
        for n_workers in (1, 2):
            row, path = _dask_store(n_workers, folder, args)
            rows.append(row)
            stores.append(path)
        ref = _contents(reference)
        identical = all(_contents(p) == ref for p in stores)
    load_after = os.getloadavg()

    result = {
        "model": args.model, "n": args.n, "chunk_size": args.chunk_size, "seed": args.seed,
        "stores_identical": identical, "rows": rows,
        "machine": {"cores": available_cores(), "platform": platform.platform(), "processor": platform.processor(),
                    "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in load_after]},
        "versions": {"python": platform.python_version(), "numpy": np.__version__, "numba": numba.__version__,
                     "dask": dask.__version__, "distributed": distributed.__version__},
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")

    print(f"{args.model}, n = {args.n:,}, chunks of {args.chunk_size:,}, {available_cores()} cores, load average "
          f"{load_before[0]:.1f} before / {load_after[0]:.1f} after; stores identical: {identical}\n")
    print("| setup | wall s | sims/s | cluster start s | sims/s without start |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        start = f"{r['cluster_start_s']:.1f}" if "cluster_start_s" in r else "–"
        without = f"{r['sims_per_s_without_start']:,.0f}" if "sims_per_s_without_start" in r else "–"
        print(f"| {r['setup']} | {r['wall_s']:.1f} | {r['sims_per_s']:,.0f} | {start} | {without} |")
    if not identical:
        sys.exit("stores differ between setups")


if __name__ == "__main__":
    main()
