"""Replicate calibration of the exact-likelihood fit: do the 95% confidence intervals cover the truth 95% of the time?

Studies of a one-compartment oral PK model (theophylline-like: one oral dose, 10 samples over 24 h, additive error) are
simulated with code independent of the package (plain numpy closed form below, not ``simulators/``), written as
NONMEM data files, and fitted through the package's inference stage with its defaults (exact likelihood, residual sd
a population parameter, proposal refinement, adapted draws). Per replicate: the estimates, Wald 95% intervals and the
result status; pooled: coverage per parameter and overall, and the bias of each parameter in units of its SE.

    python benchmarks/exact_calibration.py --sizes 50 1000 --replicates 40

Results are in benchmarks/README.md ("Exact likelihood: replicate calibration").
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from amortized_nlme.inference import pipeline  # noqa: E402

MODEL = "pk_oral_1cmt"
TRUTH = {"beta_ka": np.log(1.5), "beta_ke": np.log(0.09), "beta_V": np.log(32.0), "log_omega_ka": np.log(0.5),
         "log_omega_ke": np.log(0.2), "log_omega_V": np.log(0.15), "log_sigma_add": np.log(0.7)}
TIMES = np.array([0.25, 0.5, 1.0, 2.0, 3.5, 5.0, 7.0, 9.0, 12.0, 24.0])


def simulate_study(n: int, rng: np.random.Generator) -> pd.DataFrame:
    """An independent simulation (numpy closed form) of n subjects in NONMEM layout."""
    ka = np.exp(TRUTH["beta_ka"] + np.exp(TRUTH["log_omega_ka"]) * rng.standard_normal(n))
    ke = np.exp(TRUTH["beta_ke"] + np.exp(TRUTH["log_omega_ke"]) * rng.standard_normal(n))
    V = np.exp(TRUTH["beta_V"] + np.exp(TRUTH["log_omega_V"]) * rng.standard_normal(n))
    dose = 4.0 * rng.normal(70.0, 10.0, n).clip(40, 110)
    t = TIMES[None, :]
    conc = dose[:, None] * ka[:, None] / (V[:, None] * (ka - ke)[:, None]) * (np.exp(-ke[:, None] * t)
                                                                               - np.exp(-ka[:, None] * t))
    y = conc + np.exp(TRUTH["log_sigma_add"]) * rng.standard_normal(conc.shape)
    rows = []
    for i in range(n):
        rows.append((i + 1, 0.0, dose[i], np.nan, 1))
        rows += [(i + 1, TIMES[j], np.nan, y[i, j], 0) for j in range(TIMES.size)]
    return pd.DataFrame(rows, columns=["ID", "TIME", "AMT", "DV", "EVID"])


def fit_study(csv: Path, seed: int, cache: Path) -> dict:
    """The package's default inference (no profiles, no report files) on one simulated study."""
    opts = pipeline.InferenceOptions(model=MODEL, data=str(csv), population=str(REPO / "workflows" / "populations" /
                                                                              "theophylline.toml"),
                                     seed=seed, profiles=False, cache_dir=str(cache))
    t0 = time.perf_counter()
    ctx = pipeline.prepare_inference(opts)
    fr, mc, proposal = pipeline.fit_population(ctx, False)
    names = list(fr.parameter_names)
    return {"names": names, "estimate": fr.estimate.tolist(), "se": fr.se.tolist(),
            "ci95": fr.wald_ci[0.95].tolist(), "mc_over_se_max": mc.get("max_mc_over_se"),
            "n_draws": int(ctx.drawset.M), "khat_above": proposal["n_khat_above_0.7"] if proposal else None,
            "n_refined": proposal["n_refined"] if proposal else None, "seconds": time.perf_counter() - t0}


def summarise(records: list[dict]) -> dict:
    names = records[0]["names"]
    est = np.array([r["estimate"] for r in records])
    se = np.array([r["se"] for r in records])
    ci = np.array([r["ci95"] for r in records])
    truth = np.array([TRUTH[n] for n in names])
    cover = (ci[:, :, 0] <= truth) & (truth <= ci[:, :, 1])
    z = (est - truth) / se
    return {"replicates": len(records), "coverage": dict(zip(names, cover.mean(axis=0).round(3).tolist())),
            "coverage_pooled": float(cover.mean()),
            "bias_over_se_mean": dict(zip(names, z.mean(axis=0).round(3).tolist())),
            "bias_over_se_se": dict(zip(names, (z.std(axis=0, ddof=1) / np.sqrt(len(records))).round(3).tolist())),
            "z_sd": dict(zip(names, z.std(axis=0, ddof=1).round(3).tolist())),
            "seconds_median": float(np.median([r["seconds"] for r in records])),
            "n_draws_median": float(np.median([r["n_draws"] for r in records])),
            "khat_above_0.7_total": int(sum(r["khat_above"] or 0 for r in records))}


def code_version() -> str:
    """The commit the replicates were fitted with (a ``+`` when the work tree had changes)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+" if dirty else "")


def markdown_table(out: dict) -> str:
    """Coverage and bias per study size, for benchmarks/README.md."""
    sizes = sorted(out["sizes"], key=int)
    names = out["sizes"][sizes[0]]["records"][0]["names"]
    lines = [("Generated by `python benchmarks/exact_calibration.py` from `exact_calibration.json` (do not edit by "
              "hand). Coverage of the 95% Wald intervals; bias as the mean of (estimate − truth) / SE ± its standard "
              "error; z sd: the spread of those z-scores (1 when the SEs are right)."), "",
             "| n | replicates | code | " + " | ".join(f"`{n}`" for n in names) + " | pooled |",
             "|---:|---:|---|" + "---:|" * (len(names) + 1)]
    for n in sizes:
        block = out["sizes"][n]
        sm = block["summary"]
        code = ", ".join(block.get("code", ["unknown"]))
        lines.append(f"| {int(n):,} | {sm['replicates']} | {code} | "
                     + " | ".join(f"{sm['coverage'][p]:.3f}" for p in names) + f" | **{sm['coverage_pooled']:.3f}** |")
        lines.append("| | bias (SE) | | " + " | ".join(
            f"{sm['bias_over_se_mean'][p]:+.2f} ± {sm['bias_over_se_se'][p]:.2f}" for p in names) + " | |")
        lines.append("| | z sd | | " + " | ".join(f"{sm['z_sd'][p]:.2f}" for p in names) + " | |")
    lines.append("")
    for n in sizes:
        sm = out["sizes"][n]["summary"]
        lines.append(f"n = {int(n):,}: median {sm['seconds_median']:.0f} s per study (2 cores, shared), median "
                     f"{sm['n_draws_median']:.0f} draws per individual, {sm['khat_above_0.7_total']} individuals "
                     f"left with Pareto k̂ > 0.7 over all replicates.")
    return "\n".join(lines)


def update_readme(out: dict, readme: Path = REPO / "benchmarks" / "README.md") -> None:
    """Rewrite the table between the exact-calibration markers of benchmarks/README.md."""
    text = readme.read_text()
    block = f"<!-- exact-calibration:start -->\n{markdown_table(out)}\n<!-- exact-calibration:end -->"
    new, count = re.subn(r"<!-- exact-calibration:start -->.*?<!-- exact-calibration:end -->", lambda _: block, text,
                         flags=re.DOTALL)
    if count:
        readme.write_text(new)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 1000])
    parser.add_argument("--replicates", type=int, default=40)
    parser.add_argument("--json", default=str(REPO / "benchmarks" / "exact_calibration.json"))
    parser.add_argument("--rewrite", action="store_true", help="only rewrite the README table from the JSON")
    args = parser.parse_args()
    if args.rewrite:
        update_readme(json.loads(Path(args.json).read_text()))
        return 0
    logging.basicConfig(level=logging.WARNING)
    # one estimator for every replicate (loading and compiling it once)
    pipeline.load_estimator = functools.lru_cache(maxsize=2)(pipeline.load_estimator)
    out: dict = {"model": MODEL, "truth": TRUTH, "design": "one oral dose (4 mg/kg x weight), 10 samples over 24 h",
                 "sizes": {}}
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        out = json.loads(path.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            block = out["sizes"].setdefault(str(n), {"records": []})
            runs = block["records"]
            version = code_version()
            if args.replicates > len(runs) and version not in block.setdefault("code", []):
                block["code"].append(version)
            for r in range(len(runs), args.replicates):
                csv = Path(tmp) / f"study-{n}-{r}.csv"
                simulate_study(n, np.random.default_rng([2026, n, r])).to_csv(csv, index=False, na_rep=".")
                runs.append(fit_study(csv, seed=r, cache=Path(tmp) / "cache"))
                out["sizes"][str(n)]["summary"] = summarise(runs)
                path.write_text(json.dumps(out, indent=2))  # resumable: a rerun continues after the last replicate
                s = out["sizes"][str(n)]["summary"]
                print(f"n={n} replicate {r + 1}/{args.replicates}: {runs[-1]['seconds']:.1f} s; pooled coverage so "
                      f"far {s['coverage_pooled']:.3f}", flush=True)
    update_readme(out)
    for n, block in out["sizes"].items():
        print(f"n = {n}: {json.dumps(block['summary'], indent=1)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
