"""Calibration check of a trained estimator on fresh simulations: a family-wise simulation-based-calibration gate
(rank ECDFs inside simultaneous bands, Bonferroni over the parameters), BayesFlow's calibration metrics as BayesFlow
defines them, and, for models with a likelihood, the quality of the estimator as an importance-sampling proposal
(PSIS Pareto k-hat and effective sample size). Also renders the README's table of shipped estimators from their
``meta.json``.

The gate
--------
Under calibration the SBC rank of each parameter is uniform, so each parameter's rank ECDF stays inside its
simultaneous 1 - a band (Säilynoja, Bürkner & Vehtari 2022, the bands BayesFlow draws) with probability 1 - a.
Requiring *every* parameter to be inside its 95% band fails a calibrated estimator with probability up to
1 - 0.95^k (15-17% for k = 4, 22-24% for k = 6, measured). The gate uses per-parameter bands at level 1 - 0.05/k
(Bonferroni): the probability that a calibrated estimator fails is at most 5% whatever the dependence between the
parameters' ranks (ranks of one simulation are dependent in general, so a joint band calibrated on independent
uniforms would not be valid). ``tests/test_diagnostics.py`` measures the false-failure rate on exactly uniform ranks.

The band is computed as BayesFlow's ``simultaneous_ecdf_bands`` (same evaluation grid, same minimal-coverage
statistic, same binomial quantiles) but from 40,000 instead of 1,000 simulated uniform samples: the 0.05/k quantile
of the statistic needs them (1,000 leave 8-12 samples in that tail), and the counting is done without BayesFlow's
``[simulations, points, n]`` temporary (1 GB per 1,000 simulations). ``tests/test_diagnostics.py`` checks the
statistic against BayesFlow's on the same uniforms.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from amortized_nlme.posterior.estimator import META_FILE, TrainedEstimator
from amortized_nlme.provenance import read_json, write_json_atomic

logger = logging.getLogger(__name__)

DIAGNOSTICS_DIR = "diagnostics"

#: the gate's family-wise level: a calibrated estimator passes with probability at least this
GATE_FAMILY_LEVEL = 0.95
#: simulated uniform samples behind the simultaneous band (BayesFlow's default is 1,000)
BAND_SIMULATIONS = 40_000
#: the band depends only on the number of simulations and the level; a fixed seed makes it the same for every check
BAND_SEED = 2022
#: BayesFlow's evaluation grid: min(n, 1000) points in [eps, 1 - eps]
BAND_MAX_POINTS = 1000
BAND_EPS = 1e-5
#: Pareto k-hat above which importance sampling with the estimator as proposal is unreliable (Vehtari et al. 2024)
KHAT_THRESHOLD = 0.7

GATE_DEFINITION = ("every parameter's SBC rank ECDF inside its simultaneous band (Säilynoja et al. 2022, as "
                   "BayesFlow's simultaneous_ecdf_bands, from {sims} simulated uniform samples) at level 1 - {a}/k, "
                   "k = {k} parameters (Bonferroni): a calibrated estimator fails with probability at most {a}, "
                   "whatever the dependence between the parameters' ranks")

METRIC_DEFINITIONS = {
    "calibration_error": "BayesFlow calibration_error (default): |coverage - alpha| of the central alpha posterior "
                         "interval over 20 levels alpha in [0.005, 0.995], median over the levels, per parameter",
    "coverage_50": "fraction of simulations whose central 50% posterior interval contains the truth",
    "coverage_90": "fraction of simulations whose central 90% posterior interval contains the truth",
    "posterior_contraction": "BayesFlow posterior_contraction (default): 1 - posterior variance / prior variance, "
                             "clipped to [0, 1], median over simulations",
    "nrmse": "BayesFlow root_mean_squared_error (default, normalize='prior'): RMSE of the draws around the truth "
             "over the RMSE of prior draws, median over simulations",
    "r2": "1 - sum (posterior mean - truth)^2 / sum (truth - mean truth)^2 over simulations",
}

PROPOSAL_DEFINITION = ("log w_ij = log p(y_i | phi_ij) + log p(phi_ij) - log q(phi_ij | y_i) for the check's draws "
                       "phi_ij ~ q(. | y_i); per simulation i the Pareto k-hat of PSIS (arviz-stats psislw, r_eff = 1) "
                       "and ESS = (sum_j w_ij)^2 / sum_j w_ij^2 as a fraction of the draws; median and 90th "
                       "percentile of k-hat, fraction of simulations with k-hat > 0.7, median and 10th percentile "
                       "of ESS")


# ----------------------------------------------------------------------------------------------------------------
# simultaneous ECDF bands and the gate


def band_grid(n: int) -> np.ndarray:
    """BayesFlow's evaluation points of the ECDF for ``n`` ranks."""
    return np.linspace(BAND_EPS, 1.0 - BAND_EPS, min(n, BAND_MAX_POINTS))


def ecdf_counts(samples: np.ndarray, z: np.ndarray) -> np.ndarray:
    """``counts[m, j]`` = number of ``samples[m, :]`` that are <= ``z[j]`` (``z`` increasing); exact, by binning."""
    samples = np.atleast_2d(samples)
    m, K = samples.shape[0], z.size
    idx = np.searchsorted(z, samples, side="left")  # u <= z[j]  <=>  idx(u) <= j
    flat = (idx + (K + 1) * np.arange(m)[:, None]).ravel()
    return np.bincount(flat, minlength=m * (K + 1)).reshape(m, K + 1).cumsum(axis=1)[:, :K]


@functools.lru_cache(maxsize=8)
def _binomial_cdf_table(n: int) -> np.ndarray:
    """``table[j, c + 1]`` = P(Binomial(n, z_j) <= c) for c = -1..n on :func:`band_grid`."""
    from scipy.stats import binom

    z = band_grid(n)
    table = np.zeros((z.size, n + 2))
    table[:, 1:] = binom.cdf(np.arange(n + 1)[None, :], n, z[:, None])
    return table


def minimal_coverage(counts: np.ndarray, n: int) -> np.ndarray:
    """Säilynoja et al.'s statistic for ECDF counts ``[m, K]`` of ``n`` ranks: 2 min_j min(F(c_j), 1 - F(c_j - 1))
    with F the Binomial(n, z_j) cdf (BayesFlow's ``minimal_coverage_probs``); small when the ECDF strays."""
    table = _binomial_cdf_table(n)
    rows = np.arange(table.shape[0])[None, :]
    below = table[rows, counts + 1]
    above = 1.0 - table[rows, counts]
    return 2.0 * np.minimum(below, above).min(axis=1)


@functools.lru_cache(maxsize=8)
def _null_statistic(n: int, n_simulations: int = BAND_SIMULATIONS, seed: int = BAND_SEED) -> np.ndarray:
    """The minimal-coverage statistic of ``n_simulations`` samples of ``n`` exact uniforms, sorted."""
    rng = np.random.default_rng([seed, n])
    z = band_grid(n)
    out = np.empty(n_simulations)
    chunk = max(1, 2_000_000 // n)
    for a in range(0, n_simulations, chunk):
        b = min(n_simulations, a + chunk)
        out[a:b] = minimal_coverage(ecdf_counts(rng.uniform(size=(b - a, n)), z), n)
    return np.sort(out)


def simultaneous_band(n: int, confidence: float) -> dict[str, Any]:
    """Simultaneous ``confidence`` band for the ECDF of ``n`` uniform ranks (BayesFlow's construction): evaluation
    points ``z``, ``lower`` and ``upper`` ECDF bounds, and the statistic's critical value ``gamma``."""
    z, lower, upper, gamma = _band(int(n), float(confidence))
    return {"z": z.copy(), "lower": lower.copy(), "upper": upper.copy(), "gamma": gamma}


@functools.lru_cache(maxsize=32)
def _band(n: int, confidence: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    from scipy.stats import binom

    z = band_grid(n)
    gamma = float(np.percentile(_null_statistic(n), 100.0 * (1.0 - confidence)))
    lower = binom(n, z).ppf(gamma / 2.0) / n
    upper = binom(n, z).ppf(1.0 - gamma / 2.0) / n
    return z, lower, upper, gamma


def ecdf_band_check(ranks: np.ndarray, confidence: float = 0.95) -> dict[str, Any]:
    """Is each parameter's rank ECDF inside its own simultaneous ``confidence`` band? (One parameter at a time: for
    the family of all parameters use :func:`calibration_gate`.)

    ``ranks [n_sims, k]`` are ranks in (0, 1) (:func:`randomized_ranks`). Returns per parameter whether the ECDF is
    inside, its largest excursion outside the band (0 when inside) and the p-value of the band's uniformity test
    (the fraction of uniform samples whose ECDF strays at least as far; inside the band <=> p > 1 - confidence).
    """
    ranks = np.asarray(ranks, dtype=np.float64)
    n = ranks.shape[0]
    band = simultaneous_band(n, confidence)
    counts = ecdf_counts(ranks.T, band["z"])
    ecdf = counts / n
    out = np.maximum(band["lower"] - ecdf, ecdf - band["upper"])
    null = _null_statistic(n)
    stat = minimal_coverage(counts, n)
    p_value = np.searchsorted(null, stat, side="right") / null.size
    return {"inside_band": [bool(v) for v in np.all(out <= 1e-12, axis=1)],
            "max_excursion": [float(max(0.0, v)) for v in out.max(axis=1)],
            "p_value": [float(v) for v in p_value],
            "confidence": confidence}


def calibration_gate(ranks: np.ndarray, names: list[str] | tuple[str, ...] | None = None,
                     family_level: float = GATE_FAMILY_LEVEL) -> dict[str, Any]:
    """The check's pass rule: every parameter's rank ECDF inside its simultaneous band at level
    1 - (1 - family_level) / k (Bonferroni over the k parameters), so that a calibrated estimator passes with
    probability at least ``family_level``. ``ranks [n_sims, k]`` in (0, 1)."""
    ranks = np.asarray(ranks, dtype=np.float64)
    n, k = ranks.shape
    names = list(names) if names is not None else [f"p{j}" for j in range(k)]
    alpha = 1.0 - family_level
    level = 1.0 - alpha / k
    res = ecdf_band_check(ranks, level)
    excursion = np.asarray(res["max_excursion"])
    p = np.asarray(res["p_value"])
    worst = int(np.argmax(excursion)) if excursion.max() > 0 else int(np.argmin(p))
    return {
        "definition": GATE_DEFINITION.format(sims=f"{BAND_SIMULATIONS:,}", a=f"{alpha:g}", k=k),
        "family_level": family_level,
        "per_parameter_level": round(level, 6),
        "n_parameters": k,
        "n_ranks": n,
        "band_simulations": BAND_SIMULATIONS,
        "passed": bool(all(res["inside_band"])),
        "inside_band": dict(zip(names, res["inside_band"])),
        "max_excursion": {nm: round(v, 4) for nm, v in zip(names, res["max_excursion"])},
        "p_value": {nm: round(v, 4) for nm, v in zip(names, res["p_value"])},
        # Bonferroni-adjusted: the gate fails iff this is below 1 - family_level (up to the band's discreteness)
        "family_p_value": round(float(min(1.0, k * p.min())), 4),
        "worst_parameter": names[worst],
        "worst_excursion": round(float(excursion[worst]), 4),
    }


def randomized_ranks(draws: np.ndarray, truth: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """SBC ranks mapped to (0, 1): (#draws below truth + U) / (M + 1) is exactly uniform under calibration,
    whereas plain fractional ranks pile up at 0 and 1 for a finite number of draws."""
    below = np.sum(draws < truth[:, None, :], axis=1)
    return (below + rng.uniform(size=below.shape)) / (draws.shape[1] + 1)


def interval_coverage(draws: np.ndarray, truth: np.ndarray, level: float) -> np.ndarray:
    """Fraction of central ``level`` posterior intervals that contain the truth, per parameter."""
    lo, hi = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2], axis=1)
    return np.mean((truth >= lo) & (truth <= hi), axis=0)


# ----------------------------------------------------------------------------------------------------------------
# proposal quality


def has_likelihood(model, observations: np.ndarray, design: dict) -> bool:
    """Whether ``model.log_likelihood`` exists (SDE models raise NotImplementedError)."""
    try:
        model.log_likelihood(model.check_phi(model.prior.mean[None, :]), observations[:1],
                             {key: value[:1] for key, value in design.items()})
    except NotImplementedError:
        return False
    return True


def pareto_khat(log_weights: np.ndarray) -> np.ndarray:
    """PSIS Pareto k-hat of each row of ``log_weights [n, M]`` (ArviZ >= 1.0, whose PSIS lives in ``arviz_stats``:
    ``psislw``, r_eff = 1: independent draws).
    Rows whose weights are all equal (k-hat undefined, a perfect proposal) get -inf; rows with fewer than two
    finite weights get NaN."""
    from arviz_stats.base import array_stats

    log_weights = np.asarray(log_weights, dtype=np.float64)
    out = np.full(log_weights.shape[0], np.nan)
    for i, row in enumerate(log_weights):
        finite = row[np.isfinite(row)]
        if finite.size < 2:
            continue
        if np.ptp(finite) == 0.0:
            out[i] = -np.inf
            continue
        # a weight of zero (log w = -inf) as a negligible finite one: PSIS needs finite values
        row = np.where(np.isfinite(row), row, finite.min() - 1000.0)
        try:  # psislw takes the negated log ratios (its log-likelihood convention)
            _, k = array_stats.psislw(-row, r_eff=1.0, axis=-1)
        except ValueError:  # e.g. "All tail values are the same"
            continue
        out[i] = float(k)
    return out


def importance_ess(log_weights: np.ndarray) -> np.ndarray:
    """(sum w)^2 / sum w^2 per row of ``log_weights [n, M]`` (raw, unsmoothed weights)."""
    lw = np.where(np.isfinite(log_weights), log_weights, -np.inf)
    top = lw.max(axis=1, keepdims=True)
    w = np.exp(lw - np.where(np.isfinite(top), top, 0.0))
    s1, s2 = w.sum(axis=1), np.sum(w * w, axis=1)
    return np.where(s2 > 0, s1 * s1 / np.where(s2 > 0, s2, 1.0), 0.0)


def proposal_log_weights(estimator: TrainedEstimator, draws: np.ndarray, observations: np.ndarray,
                         design: dict) -> np.ndarray:
    """log p(y_i | phi_ij) + log p(phi_ij) - log q(phi_ij | y_i) for draws ``[n, M, k]`` -> ``[n, M]``.

    The estimator's draws are truncated to the prior's support (``TrainedEstimator.sample``); the truncated density
    differs from log q by a constant per simulation, which changes neither k-hat nor the ESS."""
    from amortized_nlme.population.marginal import individual_loglik

    model = estimator.model
    log_q = np.asarray(estimator.log_prob(draws, observations, design), dtype=np.float64)
    log_lik = individual_loglik(model, draws, observations, design)
    log_w = log_lik + model.prior.log_prob(draws) - log_q
    return np.where(np.isfinite(log_w), log_w, -np.inf)


def summarize_proposal(log_weights: np.ndarray) -> dict[str, Any]:
    """Per-simulation k-hat and ESS of ``log_weights [n, M]``, summarized."""
    import arviz_stats

    n, M = log_weights.shape
    khat = pareto_khat(log_weights)
    ess = importance_ess(log_weights) / M
    finite = khat[~np.isnan(khat)]
    return {
        "definition": PROPOSAL_DEFINITION,
        "n_simulations": n,
        "n_draws": M,
        "khat_median": round(float(np.median(finite)), 3) if finite.size else None,
        "khat_p90": round(float(np.percentile(finite, 90)), 3) if finite.size else None,
        "fraction_khat_above_0.7": round(float(np.mean(finite > KHAT_THRESHOLD)), 4) if finite.size else None,
        "khat_undefined": int(np.isnan(khat).sum()),
        "ess_fraction_median": round(float(np.median(ess)), 4),
        "ess_fraction_p10": round(float(np.percentile(ess, 10)), 4),
        "arviz_stats_version": arviz_stats.__version__,
    }


# ----------------------------------------------------------------------------------------------------------------
# the check


@contextmanager
def _global_numpy_seed(seed: int) -> Iterator[None]:
    """BayesFlow draws from numpy's global generator (NRMSE's prior bootstrap, the plots' bands): fix it."""
    state = np.random.get_state()
    np.random.seed(int(seed) % (1 << 32))
    try:
        yield
    finally:
        np.random.set_state(state)


def compact_result(result: dict[str, Any]) -> dict[str, Any]:
    """The few numbers recorded for a check at a further seed."""
    proposal = result.get("proposal", {})
    return {
        "passed": result["passed"],
        "worst_parameter": result["gate"]["worst_parameter"],
        "worst_excursion": result["gate"]["worst_excursion"],
        "family_p_value": result["gate"]["family_p_value"],
        "outside_band": [p for p, ok in result["gate"]["inside_band"].items() if not ok],
        "calibration_error_max": max(result["calibration_error"].values()),
        "coverage_90_range": [min(result["coverage_90"].values()), max(result["coverage_90"].values())],
        "proposal": {key: proposal[key] for key in ("khat_median", "khat_p90", "fraction_khat_above_0.7",
                                                   "ess_fraction_median", "ess_fraction_p10") if key in proposal}
        if "skipped" not in proposal else {"skipped": proposal["skipped"]},
        "n_simulations": result["n_simulations"],
        "n_draws": result["n_draws"],
    }


def run_check(estimator: TrainedEstimator, n_simulations: int = 1000, n_draws: int = 1000, seed: int = 20240,
              out_dir: str | os.PathLike | None = None, write_meta: bool = True, plots: bool = True,
              record_as: str = "main", proposal: bool = True) -> dict[str, Any]:
    """Simulate ``n_simulations`` fresh data sets at ``seed``, draw ``n_draws`` posterior samples each and compute
    the gate, the calibration metrics and (for models with a likelihood) the proposal quality.

    ``record_as`` says where the result goes in the estimator's ``meta.json`` (with ``write_meta``): "main" as its
    ``diagnostics`` section (the check at the workflow's seed, plots regenerated), "other" compactly under
    ``diagnostics.other_seeds[seed]`` (a check at a further seed; no plots)."""
    import bayesflow as bf

    from amortized_nlme.simulation import simulate_batch

    if record_as not in ("main", "other"):
        raise ValueError(f"record_as must be 'main' or 'other', not {record_as!r}")
    model = estimator.model
    rng = np.random.default_rng([seed, 99])
    truth, obs, design = simulate_batch(model, n_simulations, rng)
    draws = estimator.sample(obs, design, n_draws, seed=seed, progress=True)
    redrawn = estimator.last_replaced
    names = list(model.param_names)
    est = {"phi": draws}
    tgt = {"phi": truth}
    cal = bf.diagnostics.metrics.calibration_error(est, tgt)
    con = bf.diagnostics.metrics.posterior_contraction(est, tgt)
    with _global_numpy_seed(seed):
        nrmse = bf.diagnostics.metrics.root_mean_squared_error(est, tgt, normalize="prior")
    ranks = randomized_ranks(draws, truth, np.random.default_rng([seed, 7]))
    gate = calibration_gate(ranks, names)
    post_mean = draws.mean(axis=1)
    ss_res = np.sum((post_mean - truth) ** 2, axis=0)
    ss_tot = np.sum((truth - truth.mean(axis=0)) ** 2, axis=0)
    r2 = 1.0 - ss_res / ss_tot
    cov90 = interval_coverage(draws, truth, 0.90)
    cov50 = interval_coverage(draws, truth, 0.50)

    def per_param(values) -> dict[str, float]:
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        assert values.size == len(names), (values.shape, names)
        return {n: round(float(v), 4) for n, v in zip(names, values)}

    result: dict[str, Any] = {
        "n_simulations": n_simulations,
        "n_draws": n_draws,
        "seed": seed,
        "file_sha256": estimator.sha256,
        # draws beyond the prior's support (affine-flow tail blow-ups) replaced by fresh ones, as in inference
        "draws_redrawn_outside_support": redrawn,
        "passed": gate["passed"],
        "gate": gate,
        "metric_definitions": METRIC_DEFINITIONS,
        "calibration_error": per_param(cal["values"]),
        "coverage_90": per_param(cov90),
        "coverage_50": per_param(cov50),
        "posterior_contraction": per_param(con["values"]),
        "nrmse": per_param(nrmse["values"]),
        "r2": per_param(r2),
    }
    if proposal:
        if has_likelihood(model, obs, design):
            result["proposal"] = summarize_proposal(proposal_log_weights(estimator, draws, obs, design))
        else:
            result["proposal"] = {"skipped": f"{model.name} has no tractable individual likelihood "
                                             "(log_likelihood raises NotImplementedError)"}
    folder = Path(out_dir) if out_dir is not None else estimator.path
    if folder is not None and plots and record_as == "main":
        _plots(folder / DIAGNOSTICS_DIR, draws, truth, names, gate["per_parameter_level"], seed)
        result["plots"] = [f"{DIAGNOSTICS_DIR}/{p}" for p in ("calibration_ecdf.png", "recovery.png",
                                                                "z_score_contraction.png")]
    if write_meta and estimator.path is not None:
        _record(estimator.path / META_FILE, result, record_as)
    logger.info("calibration check at seed %d %s (gate at family-wise %.0f%%; worst %s, excursion %.4f)", seed,
                "passed" if result["passed"] else "FAILED", 100 * GATE_FAMILY_LEVEL, gate["worst_parameter"],
                gate["worst_excursion"])
    return result


def _record(meta_path: Path, result: dict[str, Any], record_as: str) -> None:
    """Write ``result`` into ``meta.json``: checks at other seeds are kept only while they are of the same weights."""
    meta = read_json(meta_path, "estimator metadata")
    previous = meta.get("diagnostics") or {}
    others = {s: r for s, r in (previous.get("other_seeds") or {}).items()
              if r.get("file_sha256") == result["file_sha256"]}
    if record_as == "main":
        others.pop(str(result["seed"]), None)
        meta["diagnostics"] = {**result, "other_seeds": others}
    else:
        if previous.get("seed") == result["seed"]:
            raise ValueError(f"seed {result['seed']} is the recorded main check's seed; record it as 'main'")
        others[str(result["seed"])] = {**compact_result(result), "file_sha256": result["file_sha256"]}
        previous["other_seeds"] = dict(sorted(others.items(), key=lambda kv: int(kv[0])))
        meta["diagnostics"] = previous
    write_json_atomic(meta_path, meta)


def _plots(folder: Path, draws: np.ndarray, truth: np.ndarray, names: list[str], band_level: float,
           seed: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import bayesflow as bf
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    with _global_numpy_seed(seed):
        # the gate's per-parameter level; BayesFlow's band from its default 1,000 simulations (the gate's own band
        # uses BAND_SIMULATIONS), so the plot's band is an approximation of the gate's
        ecdf = bf.diagnostics.plots.calibration_ecdf(draws, truth, variable_names=names, difference=True,
                                                     ecdf_bands_kwargs={"confidence": band_level})
    figs = {
        "calibration_ecdf.png": ecdf,
        "recovery.png": bf.diagnostics.plots.recovery(draws, truth, variable_names=names),
        "z_score_contraction.png": bf.diagnostics.plots.z_score_contraction(draws, truth, variable_names=names),
    }
    for fname, fig in figs.items():
        fig.savefig(folder / fname, dpi=90)
        plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# the README's table of shipped estimators

TABLE_START = "<!-- estimator-table:start -->"
TABLE_END = "<!-- estimator-table:end -->"
#: the order of the README's table; other estimators follow alphabetically
SHIPPED_ORDER = ("pk_oral_1cmt", "mrna_simple", "mrna_sde", "mrna_detailed")


def _num(value: float, digits: int = 2) -> str:
    """.93 style (no leading zero), as in the README's tables."""
    text = f"{value:.{digits}f}"
    return text.replace("0.", ".", 1) if text.startswith("0.") else text.replace("-0.", "−.", 1)


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f} M"


def _estimator_row(name: str, meta: dict[str, Any]) -> str:
    diag = meta.get("diagnostics") or {}
    training = meta.get("training", {})
    params = list(meta["param_names"])
    warm = training.get("warm_start") or {}
    # this phase, the one it was warm-started from, and that one's own warm start where it had one
    phases = 1 + bool(warm) + bool((warm.get("workflow_training") or {}).get("warm_start"))
    seen = _millions(training.get("simulations_seen", 0)) + (f" ({phases} phases)" if phases > 1 else "")
    minutes = f"{training.get('train_time_s', 0) / 60:.0f} min"
    version = (meta.get("model") or {}).get("version", "1")
    model_cell = f"`{name}`{'' if version == '1' else f' (version {version})'}: {', '.join(params)}"
    if "gate" not in diag:
        return f"| {model_cell} | {seen} | {minutes} | not checked with this gate | | | | | |"
    gate = diag["gate"]
    p_value = _num(gate["family_p_value"], 3 if gate["family_p_value"] < 0.01 else 2)
    if gate["passed"]:
        verdict = f"yes (seed {diag['seed']}: worst excursion 0; p = {p_value})"
    else:
        outside = [f"{p} outside by {_num(gate['max_excursion'][p], 3)}" for p, ok in gate["inside_band"].items()
                   if not ok]
        verdict = f"**no** (seed {diag['seed']}: {', '.join(outside)}; p = {p_value})"
    others = diag.get("other_seeds") or {}
    if others:
        verdict += "; other seeds " + ", ".join(
            f"{s}: " + ("yes" if r["passed"] else f"no ({r['worst_parameter']} {_num(r['worst_excursion'], 3)})")
            for s, r in others.items())

    def series(key: str, digits: int = 2) -> str:
        return " ".join(_num(diag[key][p], digits) for p in params)

    prop = diag.get("proposal") or {}
    if "skipped" in prop:
        proposal = "no likelihood: skipped"
    elif prop:
        proposal = (f"{_num(prop['khat_median'])} / {_num(prop['khat_p90'])} "
                    f"({prop['fraction_khat_above_0.7'] * 100:.0f}% > .7); "
                    f"ESS {prop['ess_fraction_median'] * 100:.1f}%")
    else:
        proposal = "—"
    return (f"| {model_cell} | {seen} | {minutes} | {verdict} | {series('calibration_error', 3)} | "
            f"{series('coverage_90')} | {series('r2')} | {series('posterior_contraction')} | {proposal} |")


def render_estimator_table(trained_dir: str | os.PathLike) -> str:
    """The Markdown block of the README's "Shipped estimators" table, from ``trained_dir/*/meta.json``."""
    trained_dir = Path(trained_dir)
    found = sorted(p.parent.name for p in trained_dir.glob(f"*/{META_FILE}"))
    ordered = [n for n in SHIPPED_ORDER if n in found] + [n for n in found if n not in SHIPPED_ORDER]
    metas = {n: read_json(trained_dir / n / META_FILE, "estimator metadata") for n in ordered}
    gates = [m["diagnostics"]["gate"] for m in metas.values() if "gate" in (m.get("diagnostics") or {})]
    level = f"{gates[0]['family_level'] * 100:.0f}%" if gates else "95%"
    lines = [
        "| model: parameters | simulations seen | training time | SBC gate passed (family-wise " + level + ") | "
        "calibration error | 90% interval coverage | R² (posterior mean vs truth) | contraction | "
        "proposal: k̂ median / p90 (share > .7); median ESS |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_estimator_row(n, m) for n, m in metas.items()]
    lines += ["", textwrap.fill(
        "Generated from `trained_models/*/meta.json` by `make estimator-table` (1,000 fresh simulations × 1,000 draws "
        "at the workflow's check seed; other seeds: the same check at two further seeds). The gate: every "
        "parameter's rank ECDF inside its simultaneous band at level 1 − 0.05/k (Bonferroni over the k parameters), "
        "so a calibrated estimator fails it with probability ≤ 5%; p is the Bonferroni-adjusted p-value of the "
        "worst parameter (the gate fails when it is below .05). Calibration error: BayesFlow's (median over 20 "
        "interval levels); contraction: median over simulations; per-parameter values in the order listed. Proposal: Pareto k̂ (PSIS, ArviZ) and ESS (share "
        "of the draws) of the estimator as importance proposal for the exact posterior, per simulation.", width=117,
        break_on_hyphens=False)]
    return "\n".join(lines) + "\n"


def update_readme_table(readme: str | os.PathLike = "README.md", trained_dir: str | os.PathLike | None = None
                        ) -> bool:
    """Rewrite the block between the estimator-table markers in ``readme``; returns whether it changed."""
    readme = Path(readme)
    trained_dir = Path(trained_dir) if trained_dir is not None else readme.parent / "trained_models"
    text = readme.read_text()
    pattern = re.compile(re.escape(TABLE_START) + r"\n.*?" + re.escape(TABLE_END), re.DOTALL)
    if not pattern.search(text):
        raise ValueError(f"{readme} has no {TABLE_START} ... {TABLE_END} block")
    new = pattern.sub(lambda _: f"{TABLE_START}\n{render_estimator_table(trained_dir)}{TABLE_END}", text)
    if new != text:
        readme.write_text(new)
    return new != text


def readme_table_block(readme: str | os.PathLike) -> str:
    """The current content between the estimator-table markers."""
    text = Path(readme).read_text()
    start = text.index(TABLE_START) + len(TABLE_START) + 1
    return text[start:text.index(TABLE_END)]
