"""Simulation throughput per core: the numba simulators against scipy's ``solve_ivp`` (LSODA, rtol 1e-6).

Run as ``python benchmarks/simulate.py [--quick]``. Numba runs single-threaded (``NUMBA_NUM_THREADS=1`` is set
before numba loads) and rates are simulations per CPU-second of this process, so that they are per core and do not
depend on other load on the machine (numba: best of 3 calls). The reference runs in the same process on a smaller
count. SDEs have no scipy
integrator: the reference for ``mrna_sde`` is Euler-Maruyama in numpy, vectorized over individuals (a strong
baseline, stronger than a Python loop per individual).
"""

from __future__ import annotations

import os

os.environ["NUMBA_NUM_THREADS"] = "1"

import argparse  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from scipy.integrate import solve_ivp  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simulators import get_model  # noqa: E402
from simulators.mrna_detailed import _jac as detailed_jac  # noqa: E402
from simulators.mrna_detailed import _natural  # noqa: E402
from simulators.mrna_detailed import _rhs as detailed_rhs  # noqa: E402
from simulators.mrna_sde import DT  # noqa: E402

TARGETS = {"mrna_detailed": 5_000.0, "mrna_sde": 20_000.0, "pk_oral_1cmt": None}


def _cpu_rate(fn, n: int, repeats: int = 1) -> tuple[float, float]:
    """(simulations per CPU-second, wall seconds) of ``fn()`` that simulates ``n`` individuals; the best of
    ``repeats`` calls (as ``timeit`` does: the others only add noise from the rest of the machine)."""
    best = (np.inf, np.inf)
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        best = min(best, (time.process_time() - c0, time.perf_counter() - w0))
    cpu, wall = best
    return n / max(cpu, 1e-9), wall


def _scipy_detailed(phi: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Reference: the detailed model's ODE with LSODA (analytic Jacobian), one solve per individual."""
    out = np.zeros((phi.shape[0], times.size))
    for i, row in enumerate(phi):
        p, y0, t0, k2m0scale, offset = _natural(row)
        after = times > t0

        def f(t, y, p=p):
            d = np.empty(4)
            detailed_rhs(t, y, p, d)
            return d

        def jac(t, y, p=p):
            J = np.empty((4, 4))
            detailed_jac(t, y, p, J)
            return J

        prot = np.zeros(times.size)
        if after.any():
            sol = solve_ivp(f, (t0, times[-1]), y0, method="LSODA", jac=jac, rtol=1e-6, atol=1e-10,
                            t_eval=times[after])
            if sol.success:
                prot[after] = k2m0scale * sol.y[3]
            else:
                prot[:] = np.nan
        out[i] = np.log(prot + offset)
    return out


def _numpy_sde(phi: np.ndarray, times: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Reference: Euler-Maruyama of the chemical Langevin equation in numpy, vectorized over individuals."""
    x = np.exp(phi)
    delta, gamma, k, m0, scale, t0, offset = (x[:, j] for j in range(7))
    n = phi.shape[0]
    m, p = m0.copy(), np.zeros(n)
    out = np.zeros((n, times.size))
    t, j = 0.0, 0
    started = np.zeros(n, bool)
    while j < times.size:
        h = min(DT, times[j] - t)
        active = t >= t0
        if not started.all():
            started |= active
        dm = -delta * m * h + np.sqrt(np.maximum(delta * m, 0) * h) * rng.standard_normal(n)
        dp = (k * m - gamma * p) * h + np.sqrt(np.maximum(k * m + gamma * p, 0) * h) * rng.standard_normal(n)
        m = np.where(active, np.maximum(m + dm, 0), m)
        p = np.where(active, np.maximum(p + dp, 0), p)
        t += h
        if abs(t - times[j]) < 1e-12:
            out[:, j] = np.log(scale * p + offset)
            j += 1
    return out


def _scipy_pk(phi: np.ndarray, design: dict) -> np.ndarray:
    """Reference: the oral one-compartment ODE (gut, central amount) with LSODA, one solve per individual."""
    out = np.zeros(design["times"].shape)
    for i, row in enumerate(phi):
        ka, ke, V = np.exp(row[:3])
        t = design["times"][i][design["mask"][i]]
        sol = solve_ivp(lambda _, y, ka=ka, ke=ke: [-ka * y[0], ka * y[0] - ke * y[1]], (0.0, max(t[-1], 1e-9)),
                        [design["dose"][i], 0.0], method="LSODA", rtol=1e-6, atol=1e-9, t_eval=t)
        out[i, : t.size] = sol.y[1] / V
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small counts (seconds), for smoke runs")
    args = parser.parse_args(argv)
    counts = {  # (numba, reference)
        "mrna_detailed": (500, 20) if args.quick else (5_000, 100),
        "mrna_sde": (1_000, 200) if args.quick else (20_000, 2_000),
        "pk_oral_1cmt": (10_000, 50) if args.quick else (200_000, 500),
    }
    rows = []
    for name, (n_fast, n_ref) in counts.items():
        model = get_model(name)
        rng = np.random.default_rng(0)
        phi = model.prior.sample(n_fast, rng)
        design = model.sample_design(n_fast, rng)
        w0 = time.perf_counter()
        model.simulate(phi[:2], {k: v[:2] for k, v in design.items()}, rng)  # compile or load from cache
        warmup = time.perf_counter() - w0
        holder: dict[str, np.ndarray] = {}
        rate, wall = _cpu_rate(lambda: holder.__setitem__("y", model.simulate(phi, design, rng)), n_fast, repeats=3)
        failed = float(np.isnan(holder["y"]).any(axis=(1, 2)).mean())
        sub = slice(0, n_ref)
        if name == "mrna_detailed":
            ref_rate, _ = _cpu_rate(lambda: _scipy_detailed(phi[sub], design["times"][0]), n_ref)
            ref_label = "solve_ivp LSODA"
        elif name == "mrna_sde":
            ref_rate, _ = _cpu_rate(lambda: _numpy_sde(phi[sub], design["times"][0], rng), n_ref)
            ref_label = "numpy EM (vectorized)"
        else:
            ref_rate, _ = _cpu_rate(lambda: _scipy_pk(phi[sub], {k: v[sub] for k, v in design.items()}), n_ref)
            ref_label = "solve_ivp LSODA"
        rows.append((name, n_fast, rate, failed, ref_label, n_ref, ref_rate, warmup))
        print(f"{name}: {rate:,.0f} sims/s/core (n={n_fast}, wall {wall:.2f} s, failed {failed:.1%}); "
              f"{ref_label}: {ref_rate:,.0f} sims/s (n={n_ref}); ratio {rate / ref_rate:,.0f}x; "
              f"first call {warmup:.1f} s", file=sys.stderr)

    print(f"\nMachine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs; "
          f"numba single-threaded; rates per CPU-second.\n")
    print("| model | numba sims/s/core | target | failed draws | reference | reference sims/s | ratio |")
    print("|---|---:|---:|---:|---|---:|---:|")
    for name, n_fast, rate, failed, ref_label, n_ref, ref_rate, _ in rows:
        target = TARGETS[name]
        target_s = f"≥ {target:,.0f}" if target else "–"
        print(f"| {name} | {rate:,.0f} | {target_s} | {failed:.1%} | {ref_label} (n={n_ref}) | {ref_rate:,.0f} | "
              f"{rate / ref_rate:,.0f}× |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
