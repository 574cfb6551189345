"""Side by side with the field's tools: amortized-nlme, R nlme (Lindstrom-Bates) and SAEM (pynlme, saemix-like) fit
the same simulated populations in one run, and the theophylline data.

    python benchmarks/peers/run.py                                     # sizes 100 1,000 10,000 (+ 100,000 ours alone)
    python benchmarks/peers/run.py --sizes 100 1000 --tools ours nlme  # a subset
    python benchmarks/peers/run.py --sizes 100 --tiny-estimator /tmp/tiny   # smoke test (estimator trained in s)

Populations: ``pk_oral_1cmt`` with known truth (ka 1.5 /h, ke 0.09 /h, V 32 L, omegas 0.5 / 0.2 / 0.15 on the log
scale, additive error 0.5 mg/L), theophylline design (11 samples over 24 h, 4 mg/kg doses, weight ~ N(70, 10) kg).
Peers run up to ``--peer-max-n`` (10,000) individuals; larger sizes are fitted by amortized-nlme alone. Missing peer
tools are installed by ``setup.sh`` (unless ``--no-setup``); a tool that still cannot run is reported as not
available, never estimated.

Writes ``benchmarks/peers/results.json`` (every record; a later run replaces the records it recomputes and keeps the
others unless ``--fresh``), ``time_vs_n.png``, ``error_vs_n.png`` and the section "Side by side with R nlme and SAEM"
of ``benchmarks/README.md``. Work files (data CSVs, tool outputs, logs) go to ``results/peers-bench/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


import peer_tools as pt  # noqa: E402

REPO = pt.REPO
THEO_CSV = REPO / "amortized_nlme" / "example_data" / "theo_saemix.csv"
README = REPO / "benchmarks" / "README.md"
SECTION = "## Side by side with R nlme and SAEM"
TOOLS = ("ours", "ours-exact", "ours-amortized", "nlme", "saem", "nuts")
DEFAULT_TOOLS = ("ours", "nlme", "saem")
LABELS = {"ours": "amortized-nlme", "ours-exact": "amortized-nlme, exact weights forced",
          "ours-amortized": "amortized-nlme, amortized weights forced", "nlme": "R nlme (LB)", "saem": "SAEM (pynlme)",
          "nuts": "NumPyro NUTS"}
OURS = ("ours", "ours-exact", "ours-amortized")
logger = logging.getLogger("peers")


# ------------------------------------------------------------------------------------------------------------------
# orchestration


def ensure_setup(tools: list[str], allow: bool) -> None:
    """Run ``setup.sh`` when a requested peer tool is missing (and ``allow``)."""
    missing = (("nlme" in tools and not pt.r_status()[0]) or ("saem" in tools and not pt.pynlme_status()[0])
               or ("nuts" in tools and not pt.nuts_status()[0]))
    if missing and allow:
        logger.info("installing missing peer tools with setup.sh")
        subprocess.run(["bash", str(HERE / "setup.sh"), sys.executable], cwd=REPO, check=False)


def fit_all(name: str, data_csv: Path, tools: list[str], work: Path, estimator: Path | None, timeout_s: float
            ) -> dict[str, pt.FitRecord]:
    """Every requested tool on one data set, one after the other (never concurrently: timings stay comparable)."""
    out: dict[str, pt.FitRecord] = {}
    for tool in tools:
        logger.info("[%s] %s ...", name, tool)
        w = work / tool
        if tool in OURS:
            if estimator is None or not (estimator / "meta.json").exists():
                rec = pt.unavailable(tool, f"no trained estimator at {estimator} (make train MODEL=pk_oral_1cmt)")
            else:
                # the -2LL by importance sampling only for the theophylline table (small; peers' timings have none)
                rec = pt.run_python_worker("ours", data_csv, w, timeout_s, estimator=estimator,
                                           marginal=name == "theophylline" and tool == "ours",
                                           likelihood=tool.split("-")[1] if "-" in tool else "auto")
        elif tool == "nlme":
            rec = pt.run_nlme(data_csv, w, timeout_s)
        elif tool in ("saem", "nuts"):
            rec = pt.run_python_worker(tool, data_csv, w, timeout_s)
        else:
            raise ValueError(f"unknown tool {tool!r} (choose from {TOOLS})")
        logger.info("[%s] %s: %s, fit %s s, process %s s %s", name, tool, "ok" if rec.ok else "FAILED",
                    _fmt(rec.fit_s, 3), _fmt(rec.process_s, 3), rec.message[:200])
        out[tool] = rec
    return out


def score(rec: pt.FitRecord, truth: dict[str, float], sample: dict[str, float] | None) -> dict[str, Any]:
    """Errors against the truth and the sample statistics, and which 95% intervals cover the truth."""
    if not rec.ok:
        return {}
    err_t = pt.log_errors(rec.estimate, truth)
    out: dict[str, Any] = {"error_vs_truth": err_t, "rms_vs_truth": pt.rms(err_t)}
    if sample is not None:
        err_s = pt.log_errors(rec.estimate, sample)
        out.update(error_vs_sample=err_s, rms_vs_sample=pt.rms(err_s))
    cover = {q: (None if not rec.ci95.get(q) else bool(rec.ci95[q][0] <= truth[q] <= rec.ci95[q][1]))
             for q in pt.QUANTITIES}
    out["ci_covers_truth"] = cover
    out["coverage"] = [sum(1 for v in cover.values() if v), sum(1 for v in cover.values() if v is not None)]
    return out


def tiny_estimator(out: Path) -> Path:
    """A throw-away estimator trained in seconds (tests the pipeline, not the numbers)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from theophylline import tiny_estimator as train_tiny  # the same recipe as the theophylline benchmark

    from simulators import get_model

    return train_tiny(out, get_model("pk_oral_1cmt"))


# ------------------------------------------------------------------------------------------------------------------
# results file, table, plots


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (platform.processor() is empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_results(path: Path, fresh: bool) -> dict[str, Any]:
    if fresh or not path.exists():
        return {"datasets": {}}
    return json.loads(path.read_text())


def _fmt(v: float | None, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}g}"


def _natural(rec: dict[str, Any], q: str) -> float | None:
    v = rec["estimate"].get(q)
    if v is None:
        return None
    return math.exp(v) if q.startswith("beta_") else v


def _wall(rec: dict[str, Any]) -> float | None:
    return rec.get("fit_s")


SYMBOL = {"beta_ka": "ka", "beta_ke": "ke", "beta_V": "V", "omega_ka": "ω_ka", "omega_ke": "ω_ke", "omega_V": "ω_V",
          "sigma": "σ"}


def _coverage_cell(s: dict[str, Any]) -> str:
    """"k/m", plus the quantities whose interval misses the truth."""
    cov = s.get("coverage")
    if not cov or not cov[1]:
        return "–"
    missed = [SYMBOL[q] for q, v in s.get("ci_covers_truth", {}).items() if v is False]
    return f"{cov[0]}/{cov[1]}" + (f" (misses {', '.join(missed)})" if missed else "")


def simulation_table(results: dict[str, Any]) -> str:
    """Markdown table of every simulated data set and tool."""
    t = pt.TRUTH
    head = ("| n | tool | fit time (s) | of which draws / population fit (s) | + training (s) | ka | ke | V | ω_ka | ω_ke "
            "| ω_V | σ | RMS log-error vs truth | vs sample stats | 95% CIs covering truth |\n"
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head, "| | **truth** | | | | " + " | ".join(_fmt(math.exp(t[q]) if q.startswith("beta_") else t[q])
                                                       for q in pt.QUANTITIES) + " | | | |"]
    train_s = results.get("ours_train_time_s")
    sims = sorted((d for d in results["datasets"].values() if d["kind"] == "simulated"), key=lambda d: d["n"])
    for d in sims:
        for tool in TOOLS:
            if tool not in d["fits"]:
                continue
            rec = d["fits"][tool]
            label = LABELS[tool]
            if not rec["available"] or not rec["ok"]:
                why = "not available" if not rec["available"] else "failed"
                lines.append(f"| {d['n']:,} | {label} | {why}: {rec['message'][:120]} |" + " |" * 12)
                continue
            s = rec.get("score", {})
            plus = _fmt(rec["fit_s"] + train_s, 3) if tool in OURS and train_s is not None else ""
            conv = "" if rec.get("converged") in (None, True) else " (not converged)"
            parts = ""
            if tool in OURS:
                mode = rec.get("details", {}).get("likelihood")
                label += f" [{mode} weights]" if mode and tool == "ours" else ""
                tm = rec.get("details", {}).get("timings_s", {})
                parts = f"{_fmt(tm.get('posterior_draws_s'))} / {_fmt(tm.get('fit_s'))}"
            lines.append(
                f"| {d['n']:,} | {label}{conv} | {_fmt(rec['fit_s'])} | {parts} | {plus} | "
                + " | ".join(_fmt(_natural(rec, q)) for q in pt.QUANTITIES)
                + f" | {_fmt(s.get('rms_vs_truth'), 2)} | {_fmt(s.get('rms_vs_sample'), 2)} | "
                + _coverage_cell(s) + " |")
    return "\n".join(lines)


def theophylline_table(results: dict[str, Any]) -> str:
    """Markdown table of the theophylline fits."""
    d = results["datasets"].get("theophylline")
    if not d:
        return "(theophylline not run)"
    common = d.get("common_minus2ll", {})
    lines = ["| tool | fit time (s) | ka | ke | V | ω_ka | ω_ke | ω_V | σ | −2LL (tool's own) | −2LL (common IS) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for tool in TOOLS:
        if tool not in d["fits"]:
            continue
        rec = d["fits"][tool]
        if not rec["available"] or not rec["ok"]:
            lines.append(f"| {LABELS[tool]} | {'not available' if not rec['available'] else 'failed'}: "
                         f"{rec['message'][:120]} |" + " |" * 9)
            continue
        cis = []
        for q in pt.QUANTITIES:
            v, ci = _natural(rec, q), rec["ci95"].get(q)
            if ci:
                lo, hi = (math.exp(c) for c in ci) if q.startswith("beta_") else ci
                cis.append(f"{_fmt(v)} ({_fmt(lo)}–{_fmt(hi)})")
            else:
                cis.append(_fmt(v))
        m2 = _fmt(rec.get("minus2ll"), 4) if rec.get("minus2ll") is not None else "–"
        c = common.get(tool)
        c2 = f"{c[0]:.1f} ± {c[1]:.1f}" if c else "–"
        lines.append(f"| {LABELS[tool]} | {_fmt(rec['fit_s'])} | " + " | ".join(cis) + f" | {m2} | {c2} |")
    return "\n".join(lines)


def plot(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """``time_vs_n.png`` (log-log) and ``error_vs_n.png`` (RMS log-error against truth and sample statistics)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sims = sorted((d for d in results["datasets"].values() if d["kind"] == "simulated"), key=lambda d: d["n"])
    colors = {"ours": "C0", "ours-exact": "C4", "ours-amortized": "C5", "nlme": "C1", "saem": "C2", "nuts": "C3"}
    series: dict[str, list[tuple[int, dict[str, Any]]]] = {t: [] for t in TOOLS}
    for d in sims:
        for tool, rec in d["fits"].items():
            if rec["available"] and rec["ok"]:
                series[tool].append((d["n"], rec))
    train_s = results.get("ours_train_time_s")

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for tool, pts in series.items():
        if not pts:
            continue
        n = [p[0] for p in pts]
        ax.plot(n, [p[1]["fit_s"] for p in pts], "o-", color=colors[tool], label=LABELS[tool])
        if tool == "ours" and train_s is not None:  # the variants share the same training
            ax.plot(n, [p[1]["fit_s"] + train_s for p in pts], "o--", color=colors[tool], alpha=0.6,
                    label=f"{LABELS[tool]} + one-off training ({train_s / 60:.0f} min)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("individuals")
    ax.set_ylabel("wall time of the fit (s)")
    ax.set_title("pk_oral_1cmt, theophylline design")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    p1 = out_dir / "time_vs_n.png"
    fig.savefig(p1, dpi=130)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, title in ((axes[0], "rms_vs_truth", "against the population truth"),
                           (axes[1], "rms_vs_sample", "against the sample statistics")):
        for tool, pts in series.items():
            vals = [(n, r.get("score", {}).get(key)) for n, r in pts]
            vals = [(n, v) for n, v in vals if v is not None and math.isfinite(v)]
            if vals:
                ax.plot(*zip(*vals), "o-", color=colors[tool], label=LABELS[tool])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("individuals")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("RMS error over the 7 parameters (log scale)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    p2 = out_dir / "error_vs_n.png"
    fig.savefig(p2, dpi=130)
    plt.close(fig)
    return [p1, p2]


def readme_section(results: dict[str, Any]) -> str:
    """The README section, regenerated from ``results.json``."""
    env = results.get("environment", {})
    train_s = results.get("ours_train_time_s")
    est = results.get("estimator", {})
    tiny = " **(a throw-away tiny estimator: pipeline test, not the shipped numbers)**" if est.get("tiny") else ""
    t = pt.TRUTH
    return f"""{SECTION}

`python benchmarks/peers/run.py [--sizes 100 1000 10000 100000] [--tools ours nlme saem]` (`make bench-peers`; not
in CI). `benchmarks/peers/setup.sh` installs what is missing: R with `nlme` (`apt-get install -y r-base-core
r-cran-nlme`) and `pynlme` from PyPI. Every tool fits the **same** simulated populations in one run, one tool at a
time, each in its own process:

- **amortized-nlme**: `run_inference` with the workflow's population model (random effects on ka, ke, V, diagonal
  Omega; additive sd without random effect), 10 starts, Wald CIs, no profiles, no importance-sampling −2LL
  (`marginal="off"`; on for the theophylline table only); posterior draws sampled afresh (no cache). Fit time = the
  whole `run_inference` call: loading the estimator (~10 s of JAX start-up and compilation at any n), posterior
  draws, multistart, Wald SEs, writing the results folder with its plots; the next column splits out the posterior
  draws (the only step that grows with n × draws through the network) and the population fit itself, which is all
  that a refit with another population model costs. With `likelihood="auto"` (the package default) the objective
  uses **exact weights** p(y|φ)/q(φ|y) (the estimator as importance proposal for the individual model's own
  likelihood) when individuals × draws × time points is small enough and the estimator is a good proposal, and the
  paper's **amortized weights** 1/p(φ) otherwise; the table says which one each fit used ("[exact weights]" /
  "[amortized weights]"). The rows "exact weights forced" / "amortized weights forced" (`--tools ours-exact
  ours-amortized`) refit some of the same data sets with the choice forced, to separate the two.
  "+ training" adds the one-off training time of the estimator
  (`train_time_s` in its `meta.json`: {_fmt(train_s)} s), paid once for every data set and population model.
- **R nlme** (Lindstrom–Bates; {env.get('R', 'R not available')}): `SSfol` reparameterised from (lKe, lKa, lCl) to
  (lKa, lKe, lV) with lCl = lV + lKe (SSfol's analytic gradient, chained), so that `pdDiag(lKa + lKe + lV ~ 1)` is
  exactly our population model; start from SSfol's self-start on the pooled data. Fit time (R's own clock) includes
  the self-start, `nlme()` and `intervals()` (95% CIs for fixed effects, random-effect sds and sigma).
- **NumPyro NUTS** (opt-in, `--tools ... nuts`, up to `--nuts-max-n` = 100 individuals; {env.get('numpyro', '')}):
  full Bayes, non-centred, the estimator's training prior N(prior mean, 1) on the typical log-values, half-normal(1)
  on omegas and sigma, 2 chains × (500 warm-up + 500 draws); posterior medians and 95% equal-tailed credible
  intervals. Fit time: `mcmc.run` including JAX compilation.
- **SAEM** ({env.get('pynlme', 'pynlme not available')}, a reimplementation of saemix/nlmefitsa; MIT) with saemix's
  defaults (300 + 100 iterations, one chain), start ka 1, ke 0.1, V 30; Wald CIs for the typical values from the
  linearised Fisher information. pynlme gives no standard errors for omega and sigma, so its coverage counts 3
  intervals, the others 7. Fit time: the `pynlme.fit` call (no importance-sampling likelihood).

Populations: `pk_oral_1cmt` with truth ka {math.exp(t['beta_ka']):g} /h, ke {math.exp(t['beta_ke']):g} /h,
V {math.exp(t['beta_V']):g} L, omegas ({t['omega_ka']:g}, {t['omega_ke']:g}, {t['omega_V']:g}) on the log scale,
additive error {t['sigma']:g} mg/L; theophylline design (samples at 0, 0.25, 0.5, 1, 2, 3.5, 5, 7, 9, 12, 24 h; dose
4 mg/kg, weight ~ N(70, 10) kg). Peers run up to 10,000 individuals; 100,000 is amortized-nlme alone.
Estimates are natural scale (typical values ka, ke, V; omegas are sds of the log-parameters; σ in mg/L). Errors are on
the log scale (log-mean differences; log ratios for omegas and σ), RMS over the seven; "vs sample stats" compares the
typical values and omegas with the mean and sd of the simulated individual log-parameters, which removes the
population-sampling noise that no estimator can beat. Coverage: how many 95% intervals contain the population truth.

Estimator: `{est.get('path', '?')}`{tiny}. Machine: {env.get('machine', '?')}; run {results.get('finished', '?')}.

{simulation_table(results)}

![time](peers/time_vs_n.png) ![error](peers/error_vs_n.png)

### Theophylline (12 subjects, `theo_saemix.csv`), no covariates

Natural-scale estimates with 95% CIs (typical values exponentiated from the log-scale interval). −2LL (tool's own):
nlme's (Lindstrom–Bates approximation) and amortized-nlme's importance-sampling estimate at its own estimates.
−2LL (common IS): every tool's estimate scored by the same yardstick, amortized-nlme's importance-sampling estimate
of the marginal likelihood (4,000 draws per individual, ± its Monte-Carlo SE; the additive sd with the narrow kernel of
our fit), so that lower is better across rows.

{theophylline_table(results)}

### Reading it

{findings(results)}

This model is closed-form: one evaluation of an individual's curve costs nanoseconds, which is the setting where
the classical tools are at their fastest (nlme's linearisation and SAEM's MCMC call the model many thousands of times
per individual). With the paper's amortized weights the method does not evaluate the model at inference time at
all (exact weights evaluate each individual's likelihood once per posterior draw), so its advantage grows with the
cost of one individual solve (stiff ODEs, SDEs): the paper reports 229 s per start at 10,000 cells for its
code against 22,134 s for Monolix SAEM on the simple mRNA model (our run of that experiment: "The seed paper's
synthetic mRNA experiments" above).
"""


def _ratio(x: float) -> str:
    return f"{x:,.0f}×" if x >= 10 else f"{x:.2g}×"


def findings(results: dict[str, Any]) -> str:
    """Computed statements: time ratios and errors at the largest population every tool fitted."""
    sims = sorted((d for d in results["datasets"].values() if d["kind"] == "simulated"), key=lambda d: d["n"])
    out = []
    for d in sims:
        ok = {t: r for t, r in d["fits"].items() if r["available"] and r["ok"]}
        if "ours" not in ok:
            continue
        if len(ok) == 1:  # a size only we fit (100,000)
            rec = ok["ours"]
            tm = rec.get("details", {}).get("timings_s", {})
            mode = rec.get("details", {}).get("likelihood")
            out.append(f"- n = {d['n']:,} (amortized-nlme alone){f' [{mode} weights]' if mode else ''}: "
                       f"{_fmt(rec['fit_s'])} s, of which posterior draws {_fmt(tm.get('posterior_draws_s'))} s and "
                       f"the 10-start fit {_fmt(tm.get('fit_s'))} s; RMS error vs truth "
                       f"{_fmt(rec['score'].get('rms_vs_truth'), 2)}.")
            continue
        ours = ok["ours"]
        parts = []
        for t, r in ok.items():
            if t in OURS or not r.get("fit_s"):
                continue
            parts.append(f"{LABELS[t]} {_fmt(r['fit_s'])} s (amortized-nlme takes "
                         f"{_ratio(ours['fit_s'] / r['fit_s'])} as long; RMS error vs truth "
                         f"{_fmt(r['score'].get('rms_vs_truth'), 2)})")
        variants = [f"{LABELS[t]} {_fmt(r['fit_s'])} s, RMS error {_fmt(r['score'].get('rms_vs_truth'), 2)}"
                    for t, r in ok.items() if t in OURS and t != "ours"]
        mode = ours.get("details", {}).get("likelihood")
        out.append(f"- n = {d['n']:,}: amortized-nlme{f' [{mode} weights]' if mode else ''} {_fmt(ours['fit_s'])} s "
                   f"(RMS error vs truth {_fmt(ours['score'].get('rms_vs_truth'), 2)}); " + "; ".join(parts)
                   + (f" (and {'; '.join(variants)})" if variants else "") + ".")
    for d in [results["datasets"].get("theophylline", {})] + sims:
        common = d.get("common_minus2ll") or {}
        if common:
            where = "theophylline" if d["kind"] == "theophylline" else f"n = {d['n']:,}"
            out.append(f"- {where}, every tool's estimate scored by the same importance-sampling −2LL (lower is "
                       "better): " + "; ".join(f"{LABELS[t]} {v[0]:.1f} ± {v[1]:.1f}" for t, v in common.items())
                       + ".")
    ours_runs = [(d["n"], d["fits"]["ours"]) for d in sims if d["fits"].get("ours", {}).get("ok")]
    if ours_runs and max(n for n, _ in ours_runs) < 100_000:
        n, rec = max(ours_runs, key=lambda x: x[0])
        tm, m = rec.get("details", {}).get("timings_s", {}), rec.get("details", {}).get("n_draws")
        if tm.get("posterior_draws_s") and m:
            rate = n * m / tm["posterior_draws_s"]
            out.append(f"- n = 100,000 (amortized-nlme alone) was not run here: at the {rate:,.0f} posterior draws/s "
                       f"measured at n = {n:,} on this machine, its 100,000 × 1,000 draws alone would take about "
                       f"{1e8 / rate / 60:.0f} min (a GPU should make this step much faster; not measured here).")
    for d in sims:
        missing = [f"{LABELS[t]}: {r['message'][:200]}" for t, r in d["fits"].items() if not (r["available"] and r["ok"])]
        if missing:
            out.append(f"- n = {d['n']:,}, not fitted: " + "; ".join(missing) + ".")
    return "\n".join(out) if out else "(no simulated data set with amortized-nlme and a peer)"


def write_readme(section: str) -> None:
    """Replace (or append) this benchmark's section of ``benchmarks/README.md``; other sections stay untouched."""
    text = README.read_text() if README.exists() else "# Benchmarks\n"
    start = text.find(SECTION)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        m = re.search(r"^## ", text[start + len(SECTION):], flags=re.M)
        end = start + len(SECTION) + m.start() if m else len(text)
        text = text[:start] + section.rstrip("\n") + "\n" + ("\n" + text[end:] if m else "")
    README.write_text(text)


# ------------------------------------------------------------------------------------------------------------------
# entry points


def worker(args: argparse.Namespace) -> int:
    """Child-process side: fit one tool on one CSV, write its record."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    data, work, record = Path(args.data), Path(args.work), Path(args.record)
    if args.worker == "ours":
        rec = pt.fit_ours(data, work, Path(args.estimator), marginal=args.marginal, likelihood=args.likelihood)
    elif args.worker == "saem":
        rec = pt.fit_saem(data)
    elif args.worker == "nuts":
        rec = pt.fit_nuts(data)
    else:  # is2ll: the estimates come in through the record file, the -2LLs go back through it
        estimates = json.loads(record.read_text())
        record.write_text(json.dumps(pt.common_minus2ll(data, work, Path(args.estimator), estimates)))
        return 0
    record.write_text(json.dumps(rec.to_dict(), indent=1, default=float))
    return 0


def common_minus2ll(data_csv: Path, fits: dict[str, pt.FitRecord], work: Path, estimator: Path, timeout_s: float
                    ) -> dict[str, list[float]]:
    """Every tool's estimate scored by the same importance-sampling -2LL (a child process; {} when it fails)."""
    estimates = {t: r.estimate for t, r in fits.items() if r.ok and len(r.estimate) == len(pt.QUANTITIES)}
    if not estimates or not (estimator / "meta.json").exists():
        return {}
    work.mkdir(parents=True, exist_ok=True)
    record = work / "is2ll.json"
    record.write_text(json.dumps(estimates))
    cmd = [sys.executable, str(HERE / "run.py"), "--worker", "is2ll", "--data", str(data_csv), "--work", str(work),
           "--record", str(record), "--estimator", str(estimator)]
    try:
        with open(work / "is2ll.log", "w") as fh:
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout_s, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {}
    if proc.returncode != 0:
        logger.warning("common -2LL failed, see %s", work / "is2ll.log")
        return {}
    out = json.loads(record.read_text())
    return out if isinstance(out, dict) and all(isinstance(v, list) for v in out.values()) else {}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="*", default=[100, 1000, 10000, 100000],
                    help="population sizes (none: the theophylline data only)")
    ap.add_argument("--tools", nargs="+", default=list(DEFAULT_TOOLS), choices=TOOLS,
                    help="default: ours nlme saem; nuts (NumPyro NUTS, full Bayes) is opt-in")
    ap.add_argument("--peer-max-n", type=int, default=10000, help="largest population the peers fit (default 10000)")
    ap.add_argument("--nuts-max-n", type=int, default=100, help="largest population NUTS fits (default 100)")
    ap.add_argument("--no-theophylline", action="store_true", help="skip the theophylline data")
    ap.add_argument("--estimator", default=str(REPO / "trained_models" / "pk_oral_1cmt"))
    ap.add_argument("--tiny-estimator", metavar="DIR", help="train a throw-away estimator into DIR (smoke test)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="time limit of one fit in seconds")
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--work", default=str(REPO / "results" / "peers-bench"))
    ap.add_argument("--results", default=str(HERE / "results.json"))
    ap.add_argument("--fresh", action="store_true", help="start results.json afresh instead of updating it")
    ap.add_argument("--no-readme", action="store_true", help="do not rewrite the README section")
    ap.add_argument("--no-setup", action="store_true", help="do not install missing peer tools")
    ap.add_argument("--worker", choices=("ours", "saem", "nuts", "is2ll"), help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--record", help=argparse.SUPPRESS)
    ap.add_argument("--marginal", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--likelihood", default="auto", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ensure_setup(args.tools, not args.no_setup)
    estimator = Path(args.tiny_estimator) if args.tiny_estimator else Path(args.estimator)
    if args.tiny_estimator and set(OURS) & set(args.tools):
        tiny_estimator(estimator)

    results_path = Path(args.results)
    results = load_results(results_path, args.fresh)
    r_ok, r_ver = pt.r_status()
    s_ok, s_ver = pt.pynlme_status()
    results["environment"] = {
        "machine": f"{cpu_name()}, {os.cpu_count()} logical CPUs, {platform.platform()}",
        "R": r_ver if r_ok else f"R nlme not available: {r_ver}", "pynlme": s_ver if s_ok else s_ver,
        "numpyro": pt.nuts_status()[1], "python": platform.python_version(),
    }
    if set(OURS) & set(args.tools):
        results["estimator"] = {"path": str(estimator.relative_to(REPO) if estimator.is_relative_to(REPO)
                                            else estimator), "tiny": bool(args.tiny_estimator)}
        results["ours_train_time_s"] = pt.estimator_train_time(estimator)

    def save() -> None:
        results["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        results_path.write_text(json.dumps(results, indent=1, default=float))

    jobs: list[tuple[str, int | None]] = [] if args.no_theophylline else [("theophylline", None)]
    jobs += [(f"sim-n{n}", n) for n in sorted(args.sizes)]
    for name, n in jobs:
        tools = [t for t in args.tools if n is None or t in OURS
                 or (n <= args.peer_max_n and (t != "nuts" or n <= args.nuts_max_n))]
        d_work = work / name
        d_work.mkdir(parents=True, exist_ok=True)
        if n is None:
            data_csv, sample, entry = THEO_CSV, None, {"kind": "theophylline", "n": 12, "data": str(THEO_CSV)}
        else:
            seed = args.seed + n
            frame, phi = pt.simulate_population(n, seed)
            data_csv = d_work / "data.csv"
            frame.to_csv(data_csv, index=False)
            sample = pt.sample_statistics(phi)
            entry = {"kind": "simulated", "n": n, "seed": seed, "truth": pt.TRUTH, "sample_statistics": sample}
        old_entry = results["datasets"].get(name, {})
        old = old_entry.get("fits", {})
        if "common_minus2ll" in old_entry:
            entry["common_minus2ll"] = old_entry["common_minus2ll"]
        fits = fit_all(name, data_csv, tools, d_work, estimator, args.timeout)
        entry["fits"] = dict(old)
        for tool, rec in fits.items():
            r = rec.to_dict()
            if n is not None:
                r["score"] = score(rec, pt.TRUTH, sample)
            entry["fits"][tool] = r
        if (n is None or n <= 100) and "ours" in tools:
            entry["common_minus2ll"] = common_minus2ll(data_csv, fits, d_work / "is2ll", estimator, args.timeout)
        results["datasets"][name] = entry
        save()
    plot(results, HERE)
    if not args.no_readme:
        write_readme(readme_section(results))
    print(simulation_table(results))
    print()
    print(theophylline_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
