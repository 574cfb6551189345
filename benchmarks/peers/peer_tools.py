"""Simulated theophylline-like populations with known truth, and the fitters compared on them.

Every fitter returns the same record: the seven population quantities of the one-compartment oral model with
log-normal ka, ke, V (diagonal Omega) and an additive residual error --

    beta_ka, beta_ke, beta_V    typical values on the log scale (log 1/h, log 1/h, log L)
    omega_ka, omega_ke, omega_V random-effect sds on the log scale
    sigma                       additive residual sd (mg/L)

each with a 95% interval where the tool gives one (``None`` where it does not), the wall time of the fit, and what the
tool said (convergence, messages). Tools run in their own process (R through ``Rscript``, the Python tools through
``run.py --worker``), so that a crash, a timeout or a memory blow-up of one never takes the benchmark down.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
THEO_SAEMIX_POP = REPO / "workflows" / "populations" / "theo_saemix.toml"  # reader options of the saemix layout
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

QUANTITIES: tuple[str, ...] = ("beta_ka", "beta_ke", "beta_V", "omega_ka", "omega_ke", "omega_V", "sigma")
PARAMS: tuple[str, ...] = ("ka", "ke", "V")

# population truth: theophylline-like (ka 1.5 /h, ke 0.09 /h, V 32 L), omegas on the log scale, additive error 0.5 mg/L
TRUTH: dict[str, float] = {
    "beta_ka": math.log(1.5), "beta_ke": math.log(0.09), "beta_V": math.log(32.0),
    "omega_ka": 0.5, "omega_ke": 0.2, "omega_V": 0.15, "sigma": 0.5,
}
# the theophylline study's nominal sampling times (h), pre-dose sample included: 11 samples over 24 h
THEO_TIMES: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 2.0, 3.5, 5.0, 7.0, 9.0, 12.0, 24.0)
DOSE_MG_PER_KG = 4.0


# ------------------------------------------------------------------------------------------------------------------
# populations


def simulate_population(n: int, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    """``n`` individuals of the theophylline design with :data:`TRUTH`, simulated by ``pk_oral_1cmt``.

    Returns the long-format table (``Id, Dose, Time, Concentration, Weight, Sex`` as ``theo_saemix.csv``) and the
    true individual log-parameters ``[n, 3]`` (log ka, log ke, log V). Weight ~ N(70, 10) kg clipped to 40-120 kg,
    dose 4 mg/kg, sex 0/1 with probability 1/2 (covariates are carried, not used by the population model).
    """
    from simulators import get_model

    model = get_model("pk_oral_1cmt")
    rng = np.random.default_rng(seed)
    mean = np.array([TRUTH[f"beta_{p}"] for p in PARAMS])
    sd = np.array([TRUTH[f"omega_{p}"] for p in PARAMS])
    phi = mean + sd * rng.standard_normal((n, 3))
    weight = np.clip(rng.normal(70.0, 10.0, n), 40.0, 120.0).round(1)
    sex = rng.integers(0, 2, n)
    dose = (DOSE_MG_PER_KG * weight).round(3)
    T = len(THEO_TIMES)
    times = np.zeros((n, model.max_time_points))
    mask = np.zeros((n, model.max_time_points), dtype=bool)
    times[:, :T] = THEO_TIMES
    mask[:, :T] = True
    design = {"times": times, "mask": mask, "dose": dose}
    full = np.column_stack([phi, np.full(n, math.log(TRUTH["sigma"]))])
    y = model.simulate(full, design, rng)[:, :T, 0]
    frame = pd.DataFrame({
        "Id": np.repeat(np.arange(1, n + 1), T),
        "Dose": np.repeat(dose, T),
        "Time": np.tile(THEO_TIMES, n),
        "Concentration": y.ravel().round(4),
        "Weight": np.repeat(weight, T),
        "Sex": np.repeat(sex, T),
    })
    return frame, phi


def sample_statistics(phi: np.ndarray) -> dict[str, float]:
    """Mean and sd (ddof 1) of the simulated individual log-parameters, in :data:`QUANTITIES` naming (sigma: truth)."""
    out = {f"beta_{p}": float(phi[:, k].mean()) for k, p in enumerate(PARAMS)}
    out.update({f"omega_{p}": float(phi[:, k].std(ddof=1)) for k, p in enumerate(PARAMS)})
    out["sigma"] = TRUTH["sigma"]
    return out


def log_errors(estimate: dict[str, float], reference: dict[str, float]) -> dict[str, float]:
    """Error of every quantity on the log scale: beta - reference (log means), log(est / reference) (sds)."""
    out = {}
    for q in QUANTITIES:
        e = estimate.get(q)
        if e is None or not np.isfinite(e):
            out[q] = float("nan")
        elif q.startswith("beta_"):
            out[q] = float(e - reference[q])
        else:
            out[q] = float(math.log(e / reference[q])) if e > 0 else float("nan")
    return out


def rms(errors: dict[str, float]) -> float:
    """Root mean square over the quantities (NaN when any is missing)."""
    v = np.array([errors[q] for q in QUANTITIES])
    return float(np.sqrt(np.mean(v**2))) if np.all(np.isfinite(v)) else float("nan")


# ------------------------------------------------------------------------------------------------------------------
# one fit's record


@dataclass
class FitRecord:
    """What one tool gave on one data set."""

    tool: str
    available: bool
    ok: bool = False
    estimate: dict[str, float] = field(default_factory=dict)
    ci95: dict[str, list[float] | None] = field(default_factory=dict)
    fit_s: float | None = None        # the fit as the tool's own code timed it (see each runner)
    process_s: float | None = None    # the whole child process: interpreter start, imports, data reading, fit
    minus2ll: float | None = None
    converged: bool | None = None
    message: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FitRecord":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def unavailable(tool: str, why: str) -> FitRecord:
    """The record of a tool that could not run here (reported as such, never estimated)."""
    return FitRecord(tool=tool, available=False, message=why)


# ------------------------------------------------------------------------------------------------------------------
# availability


def r_status() -> tuple[bool, str]:
    """(R nlme usable, version string or reason)."""
    if shutil.which("Rscript") is None:
        return False, "Rscript not found (run benchmarks/peers/setup.sh: apt-get install r-base-core r-cran-nlme)"
    try:
        out = subprocess.run(["Rscript", "-e", 'cat(R.version.string, "; nlme", format(packageVersion("nlme")))'],
                             capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"Rscript failed: {exc}"
    if out.returncode != 0:
        return False, f"R package nlme not loadable: {out.stderr.strip()[-300:]}"
    return True, out.stdout.strip()


def pynlme_status() -> tuple[bool, str]:
    """(pynlme importable, version or reason)."""
    try:
        import importlib.metadata as md

        import pynlme  # noqa: F401

        return True, f"pynlme {md.version('pynlme')}"
    except Exception as exc:  # noqa: BLE001 -- any import failure means: not available
        return False, f"pynlme not importable ({exc.__class__.__name__}: {exc}); pip install pynlme"


def estimator_train_time(estimator: Path) -> float | None:
    """``train_time_s`` from the estimator's ``meta.json`` (None when it has none)."""
    try:
        meta = json.loads((estimator / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    t = meta.get("training", {}).get("train_time_s")
    return float(t) if t is not None else None


# ------------------------------------------------------------------------------------------------------------------
# runners (parent side): each starts a child process with a time limit and reads back its record


def _run_child(tool: str, cmd: list[str], out_json: Path, timeout_s: float, env: dict[str, str] | None = None,
               log: Path | None = None) -> FitRecord:
    t0 = time.perf_counter()
    try:
        with open(log or os.devnull, "w") as fh:
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout_s, cwd=REPO,
                                  env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return FitRecord(tool=tool, available=True, ok=False, process_s=time.perf_counter() - t0,
                         message=f"timed out after {timeout_s:.0f} s")
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not out_json.exists():
        tail = log.read_text()[-600:] if log and log.exists() else ""
        return FitRecord(tool=tool, available=True, ok=False, process_s=wall,
                         message=f"exit status {proc.returncode}: {tail.strip()}")
    rec = FitRecord.from_dict(json.loads(out_json.read_text()))
    rec.process_s = wall
    return rec


def run_nlme(data_csv: Path, work: Path, timeout_s: float) -> FitRecord:
    """R nlme (Lindstrom-Bates) through ``Rscript nlme_fit.R``; ``fit_s`` is R's elapsed time for the self-start,
    ``nlme()`` and ``intervals()``."""
    ok, why = r_status()
    if not ok:
        return unavailable("nlme", why)
    work.mkdir(parents=True, exist_ok=True)
    out_csv = work / "nlme_out.csv"
    out_csv.unlink(missing_ok=True)
    t0 = time.perf_counter()
    log = work / "nlme.log"
    try:
        with open(log, "w") as fh:
            proc = subprocess.run(["Rscript", str(HERE / "nlme_fit.R"), str(data_csv), str(out_csv)], stdout=fh,
                                  stderr=subprocess.STDOUT, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return FitRecord(tool="nlme", available=True, process_s=time.perf_counter() - t0,
                         message=f"timed out after {timeout_s:.0f} s", details={"R": why})
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not out_csv.exists():
        return FitRecord(tool="nlme", available=True, process_s=wall, details={"R": why},
                         message=f"Rscript exit status {proc.returncode}: {log.read_text()[-600:].strip()}")
    return parse_nlme(out_csv, wall, why)


def parse_nlme(out_csv: Path, wall: float, version: str) -> FitRecord:
    """The record from ``nlme_fit.R``'s output table (lKa, lKe, lV are log ka, log ke, log V)."""
    tab = pd.read_csv(out_csv, keep_default_na=True)
    rows = {r["name"]: r for _, r in tab.iterrows()}
    names = {"beta_lKa": "beta_ka", "beta_lKe": "beta_ke", "beta_lV": "beta_V", "omega_lKa": "omega_ka",
             "omega_lKe": "omega_ke", "omega_lV": "omega_V", "sigma": "sigma"}
    est, ci = {}, {}
    for r_name, q in names.items():
        if r_name in rows:
            r = rows[r_name]
            est[q] = float(r["estimate"])
            ci[q] = [float(r["lower"]), float(r["upper"])] if np.isfinite([r["lower"], r["upper"]]).all() else None
    msg = rows["converged"]["message"] if "converged" in rows else ""
    msg = "" if not isinstance(msg, str) else msg
    converged = bool(rows["converged"]["estimate"]) if "converged" in rows else None
    return FitRecord(tool="nlme", available=True, ok=len(est) == len(QUANTITIES), estimate=est, ci95=ci,
                     fit_s=float(rows["fit_s"]["estimate"]), process_s=wall,
                     minus2ll=float(rows["minus2ll"]["estimate"]) if "minus2ll" in rows else None,
                     converged=converged, message=msg, details={"R": version})


def run_python_worker(tool: str, data_csv: Path, work: Path, timeout_s: float, estimator: Path | None = None,
                      threads: int | None = None, marginal: bool = False, likelihood: str = "auto") -> FitRecord:
    """``tool`` ("ours", "saem" or "nuts") in a child Python process (``run.py --worker``)."""
    check = {"saem": pynlme_status, "nuts": nuts_status}.get(tool)
    if check is not None:
        ok, why = check()
        if not ok:
            return unavailable(tool, why)
    work.mkdir(parents=True, exist_ok=True)
    out_json = work / f"{tool}_record.json"
    out_json.unlink(missing_ok=True)
    cmd = [sys.executable, str(HERE / "run.py"), "--worker", tool, "--data", str(data_csv), "--work", str(work),
           "--record", str(out_json)]
    if estimator is not None:
        cmd += ["--estimator", str(estimator)]
    if marginal:
        cmd += ["--marginal"]
    if likelihood != "auto":
        cmd += ["--likelihood", likelihood]
    env = {"OPENBLAS_NUM_THREADS": "1", "KERAS_BACKEND": os.environ.get("KERAS_BACKEND", "jax")}
    if threads:
        env["NUMBA_NUM_THREADS"] = str(threads)
    rec = _run_child(tool, cmd, out_json, timeout_s, env=env, log=work / f"{tool}.log")
    if tool == "ours" and likelihood != "auto":
        rec.tool = f"ours-{likelihood}"
    return rec


# ------------------------------------------------------------------------------------------------------------------
# workers (child side)


def fit_ours(data_csv: Path, work: Path, estimator: Path, marginal: bool = False, likelihood: str = "auto"
             ) -> FitRecord:
    """amortized-nlme: ``run_inference`` with the workflow's population model (random effects on ka, ke, V,
    diagonal), 10 starts, Wald CIs, no profiles, no Monte-Carlo refits; posterior draws are never read from a
    cache (a fresh cache folder per fit). The importance-sampling -2LL (``marginal``) is off unless asked for (the
    peers' timings do not include one either). ``fit_s``: the whole ``run_inference`` call (estimator loading,
    posterior draws, multistart fit, Wald SEs, the -2LL when on, writing the results folder with its plots)."""
    from amortized_nlme.inference.pipeline import InferenceOptions, run_inference

    out = work / "ours_results"
    cache = work / "ours_draws_cache"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    opts = InferenceOptions(model="pk_oral_1cmt", data=str(data_csv), population=str(THEO_SAEMIX_POP),
                            estimator=str(estimator),
                            out=str(out), n_starts=10, profiles=False, mc_refits=0, cache_dir=str(cache),
                            marginal="on" if marginal else "off", likelihood=likelihood)
    t0 = time.perf_counter()
    run_inference(opts)
    fit_s = time.perf_counter() - t0
    shutil.rmtree(cache, ignore_errors=True)
    rec = parse_ours(out)
    rec.fit_s = fit_s
    return rec


def parse_ours(out: Path) -> FitRecord:
    """The record from ``results/<run>/estimates.csv`` and ``summary.json`` (Wald 95% CIs on the log scale; omegas and
    sigma are exponentiated with their CIs)."""
    tab = pd.read_csv(out / "estimates.csv").set_index("name")
    summary = json.loads((out / "summary.json").read_text())
    names = {"beta_ka": ("beta_ka", False), "beta_ke": ("beta_ke", False), "beta_V": ("beta_V", False),
             "log_omega_ka": ("omega_ka", True), "log_omega_ke": ("omega_ke", True),
             "log_omega_V": ("omega_V", True), "beta_sigma_add": ("sigma", True)}
    est, ci = {}, {}
    for name, (q, exp) in names.items():
        r = tab.loc[name]
        f = math.exp if exp else float
        est[q] = f(float(r["estimate"]))
        lo, hi = float(r["wald95_lo"]), float(r["wald95_hi"])
        ci[q] = [f(lo), f(hi)] if np.isfinite([lo, hi]).all() else None
    timings = summary.get("timings_s", {})
    ess = summary.get("ess", {})
    details = {"timings_s": timings, "n_draws": summary.get("n_draws_per_individual"),
               "likelihood": summary.get("inputs", {}).get("likelihood"),
               "ess_median": ess.get("ess_median"), "n_low_ess": ess.get("n_low_ess"),
               "objective_mc_se": summary.get("objective", {}).get("mc_se"),
               "at_bound": summary.get("at_bound", []),
               "sigma_note": "additive sd without random effect: fitted with a narrow kernel (fixed_std = auto)"}
    ms = summary.get("multistart", {})
    if isinstance(ms, dict):
        details["multistart"] = {k: v for k, v in ms.items() if not isinstance(v, (list, dict))}
    ms = summary.get("model_selection", {})
    m2ll = ms.get("minus2ll") if ms.get("computed") else None
    if m2ll is not None:
        details["minus2ll_se"] = ms.get("minus2ll_se")
    return FitRecord(tool="ours", available=True, ok=True, estimate=est, ci95=ci, converged=not details["at_bound"],
                     minus2ll=float(m2ll) if m2ll is not None else None, details=details)


def fit_saem(data_csv: Path) -> FitRecord:
    """pynlme's SAEM (a reimplementation of saemix / MATLAB nlmefitsa) with saemix's defaults (``compat="r"``: 300 + 100
    iterations, one chain, 2+2+2 MCMC kernel steps); log-normal ka, ke, V with diagonal Omega, constant error.
    Start: ka 1 /h, ke 0.1 /h, V 30 L (the order of magnitude a modeller would guess). 95% CIs for the typical values
    from the linearised Fisher information (Wald); pynlme gives no standard errors for omega or sigma.
    ``fit_s``: the ``pynlme.fit`` call (SAEM and the standard errors; no importance-sampling likelihood)."""
    import importlib.metadata as md

    from pynlme import fit

    df = pd.read_csv(data_csv)
    data = {c: df[c].to_numpy() for c in ("Id", "Dose", "Time", "Concentration")}

    def model(p: dict[str, np.ndarray], x: dict[str, np.ndarray]) -> np.ndarray:
        ka, ke, V = p["ka"], p["ke"], p["V"]
        t, dose = x["Time"], x["Dose"]
        return dose * ka / (V * (ka - ke)) * (np.exp(-ke * t) - np.exp(-ka * t))

    t0 = time.perf_counter()
    r = fit(model, data, response="Concentration", group="Id", start={"ka": 1.0, "ke": 0.1, "V": 30.0},
            predictors=["Time", "Dose"], transform={"ka": "log", "ke": "log", "V": "log"}, method="SAEM",
            compat="r", error_model="constant", random_state=1, compute_std_errors=True)
    fit_s = time.perf_counter() - t0
    est, ci = {}, {}
    for p in PARAMS:
        b = float(r["fixed"][p])
        est[f"beta_{p}"] = b
        se = (r["se"] or {}).get(p)
        ci[f"beta_{p}"] = [b - 1.959964 * se, b + 1.959964 * se] if se is not None and np.isfinite(se) else None
        est[f"omega_{p}"] = float(math.sqrt(r["psi"]["variances"][p]))
        ci[f"omega_{p}"] = None
    est["sigma"] = float(np.atleast_1d(r["error"]["parameters"])[0])
    ci["sigma"] = None
    finite = all(np.isfinite(v) for v in est.values())
    return FitRecord(tool="saem", available=True, ok=finite, estimate=est, ci95=ci, fit_s=fit_s, converged=None,
                     message="" if finite else "non-finite estimates",
                     details={"pynlme": md.version("pynlme"), "settings": "compat='r' (saemix defaults), seed 1"})


def nuts_status() -> tuple[bool, str]:
    """(NumPyro importable, version or reason)."""
    try:
        import importlib.metadata as md

        import numpyro  # noqa: F401

        return True, f"numpyro {md.version('numpyro')}"
    except Exception as exc:  # noqa: BLE001 -- any import failure means: not available
        return False, f"numpyro not importable ({exc.__class__.__name__}: {exc}); pip install numpyro"


def fit_nuts(data_csv: Path, n_warmup: int = 500, n_samples: int = 500, n_chains: int = 2) -> FitRecord:
    """Full Bayes with NumPyro NUTS (float64, CPU): non-centred hierarchical model with the estimator's training prior
    on the typical log-values (N(prior mean, 1)), half-normal(1) on omegas and sigma. Estimates: posterior medians; 95%
    equal-tailed credible intervals. ``fit_s``: ``mcmc.run`` (compilation included), chains one after the other."""
    import importlib.metadata as md

    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    from numpyro.diagnostics import summary
    from numpyro.infer import MCMC, NUTS

    numpyro.enable_x64()
    df = pd.read_csv(data_csv)
    ids, idx = np.unique(df["Id"].to_numpy(), return_inverse=True)
    n = ids.size
    t, dose, y = (jnp.asarray(df[c].to_numpy(np.float64)) for c in ("Time", "Dose", "Concentration"))
    idx = jnp.asarray(idx)
    from simulators import get_model

    prior = get_model("pk_oral_1cmt").prior  # the estimator's training prior: N(mean, 1) on every log-parameter
    prior_mean = jnp.asarray(prior.mean[:3])

    def model() -> None:
        beta = numpyro.sample("beta", dist.Normal(prior_mean, 1.0).to_event(1))
        omega = numpyro.sample("omega", dist.HalfNormal(jnp.ones(3)).to_event(1))
        sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
        with numpyro.plate("individuals", n):
            eta = numpyro.sample("eta", dist.Normal(jnp.zeros(3), 1.0).to_event(1))
        phi = beta + omega * eta
        ka, ke, V = (jnp.exp(phi[idx, k]) for k in range(3))
        c = dose * ka / (V * (ka - ke)) * (jnp.exp(-ke * t) - jnp.exp(-ka * t))
        numpyro.sample("y", dist.Normal(c, sigma), obs=y)

    mcmc = MCMC(NUTS(model, target_accept_prob=0.9), num_warmup=n_warmup, num_samples=n_samples,
                num_chains=n_chains, chain_method="sequential", progress_bar=False)
    t0 = time.perf_counter()
    mcmc.run(jax.random.PRNGKey(1))
    fit_s = time.perf_counter() - t0
    s = mcmc.get_samples(group_by_chain=True)
    stats = summary({k: np.asarray(s[k]) for k in ("beta", "omega", "sigma")}, group_by_chain=True)
    rhat = max(float(np.max(stats[k]["r_hat"])) for k in stats)
    ess = min(float(np.min(stats[k]["n_eff"])) for k in stats)
    divergences = int(np.asarray(mcmc.get_extra_fields()["diverging"]).sum())
    flat = {k: np.asarray(v).reshape(-1, *np.asarray(v).shape[2:]) for k, v in s.items()}
    est, ci = {}, {}
    for k, p in enumerate(PARAMS):
        for q, arr in ((f"beta_{p}", flat["beta"][:, k]), (f"omega_{p}", flat["omega"][:, k])):
            est[q] = float(np.median(arr))
            ci[q] = [float(np.quantile(arr, 0.025)), float(np.quantile(arr, 0.975))]
    est["sigma"] = float(np.median(flat["sigma"]))
    ci["sigma"] = [float(np.quantile(flat["sigma"], 0.025)), float(np.quantile(flat["sigma"], 0.975))]
    converged = rhat < 1.05 and divergences == 0
    return FitRecord(tool="nuts", available=True, ok=True, estimate=est, ci95=ci, fit_s=fit_s, converged=converged,
                     message="" if converged else f"max R-hat {rhat:.3f}, {divergences} divergences",
                     details={"numpyro": md.version("numpyro"), "max_rhat": rhat, "min_ess": ess,
                              "divergences": divergences, "chains": n_chains, "warmup": n_warmup,
                              "samples_per_chain": n_samples, "estimate": "posterior median, 95% equal-tailed CrI"})



def common_minus2ll(data_csv: Path, work: Path, estimator: Path, estimates: dict[str, dict[str, float]],
                    n_draws: int = 4000) -> dict[str, list[float]]:
    """-2LL of every tool's estimate under one yardstick: amortized-nlme's importance-sampling estimate of the exact
    marginal likelihood (posterior/population/t mixture proposal, ``n_draws`` per individual), the additive sd with
    the same narrow kernel as in our fit. Returns ``{tool: [-2LL, Monte-Carlo SE]}``."""
    from amortized_nlme.inference.pipeline import InferenceOptions, prepare_inference
    from amortized_nlme.population.marginal import ImportanceSampler

    cache = work / "is2ll_draws_cache"
    ctx = prepare_inference(InferenceOptions(model="pk_oral_1cmt", data=str(data_csv), estimator=str(estimator),
                                             population=str(THEO_SAEMIX_POP), cache_dir=str(cache)))
    sampler = ImportanceSampler(ctx.model, ctx.estimator, ctx.observations, ctx.design, n_draws=n_draws,
                                pilot_draws=ctx.drawset.draws, seed=0)
    value = {"beta_ka": ("beta_ka", False), "beta_ke": ("beta_ke", False), "beta_V": ("beta_V", False),
             "beta_sigma_add": ("sigma", True), "log_omega_ka": ("omega_ka", True),
             "log_omega_ke": ("omega_ke", True), "log_omega_V": ("omega_V", True)}
    out = {}
    for tool, est in estimates.items():
        theta = np.array([math.log(est[value[p][0]]) if value[p][1] else est[value[p][0]]
                          for p in ctx.population.parameter_names])
        ml = sampler.evaluate(ctx.population, theta, ctx.covariates, ctx.groups, seed=1)
        out[tool] = [float(ml.minus2ll), float(ml.minus2ll_se)]
    shutil.rmtree(cache, ignore_errors=True)
    return out
