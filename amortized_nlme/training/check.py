"""Calibration check of a trained estimator on fresh simulations: simulation-based calibration (rank ECDF with
its simultaneous 95% band), parameter recovery and posterior contraction, with BayesFlow's diagnostics."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from amortized_nlme.posterior.estimator import META_FILE, TrainedEstimator
from amortized_nlme.provenance import read_json, write_json_atomic

logger = logging.getLogger(__name__)

DIAGNOSTICS_DIR = "diagnostics"


def ecdf_band_check(ranks: np.ndarray, confidence: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Is each parameter's rank ECDF inside the simultaneous band (Säilynoja et al. 2022, BayesFlow's bands)?

    ``ranks [n_sims, k]`` are fractional ranks in [0, 1]. Returns per-parameter pass flags and the largest
    excursion outside the band (0 when inside).
    """
    from bayesflow.utils.ecdf import simultaneous_ecdf_bands

    state = np.random.get_state()
    np.random.seed(seed)  # the band is computed by simulation; fix it so a check is reproducible
    try:
        _, z, lower, upper = simultaneous_ecdf_bands(ranks.shape[0], confidence=confidence)
    finally:
        np.random.set_state(state)
    inside, excursion = [], []
    for j in range(ranks.shape[1]):
        ecdf = np.mean(ranks[:, j][None, :] <= z[:, None], axis=1)
        out = np.maximum(lower - ecdf, ecdf - upper)
        inside.append(bool(np.all(out <= 1e-12)))
        excursion.append(float(max(0.0, out.max())))
    return {"inside_band": inside, "max_excursion": excursion}


def randomized_ranks(draws: np.ndarray, truth: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """SBC ranks mapped to (0, 1): (#draws below truth + U) / (M + 1) is exactly uniform under calibration,
    whereas plain fractional ranks pile up at 0 and 1 for a finite number of draws."""
    below = np.sum(draws < truth[:, None, :], axis=1)
    return (below + rng.uniform(size=below.shape)) / (draws.shape[1] + 1)


def interval_coverage(draws: np.ndarray, truth: np.ndarray, level: float) -> np.ndarray:
    """Fraction of central ``level`` posterior intervals that contain the truth, per parameter."""
    lo, hi = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2], axis=1)
    return np.mean((truth >= lo) & (truth <= hi), axis=0)


def run_check(estimator: TrainedEstimator, n_simulations: int = 1000, n_draws: int = 1000, seed: int = 20240,
              out_dir: str | os.PathLike | None = None, write_meta: bool = True, plots: bool = True
              ) -> dict[str, Any]:
    """Simulate ``n_simulations`` fresh data sets, draw ``n_draws`` posterior samples each and compute the
    calibration numbers; writes plots and (optionally) the numbers into the estimator's ``meta.json``."""
    import bayesflow as bf

    from amortized_nlme.simulation import simulate_batch

    model = estimator.model
    rng = np.random.default_rng([seed, 99])
    truth, obs, design = simulate_batch(model, n_simulations, rng)
    draws = estimator.sample(obs, design, n_draws, seed=seed, progress=True)
    redrawn = estimator.last_replaced
    names = list(model.param_names)
    est = {"phi": draws}
    tgt = {"phi": truth}
    cal = bf.diagnostics.metrics.calibration_error(est, tgt, aggregation=None)
    con = bf.diagnostics.metrics.posterior_contraction(est, tgt, aggregation=None)
    nrmse = bf.diagnostics.metrics.root_mean_squared_error(est, tgt, aggregation=np.median)
    ranks = randomized_ranks(draws, truth, np.random.default_rng([seed, 7]))
    band = ecdf_band_check(ranks, seed=seed)
    post_mean = draws.mean(axis=1)
    ss_res = np.sum((post_mean - truth) ** 2, axis=0)
    ss_tot = np.sum((truth - truth.mean(axis=0)) ** 2, axis=0)
    r2 = 1.0 - ss_res / ss_tot
    cov90 = interval_coverage(draws, truth, 0.90)
    cov50 = interval_coverage(draws, truth, 0.50)

    def per_param(values) -> dict[str, float]:
        return {n: round(float(v), 4) for n, v in zip(names, np.ravel(values))}

    result = {
        "n_simulations": n_simulations,
        "n_draws": n_draws,
        "seed": seed,
        # draws beyond the prior's support (affine-flow tail blow-ups) replaced by fresh ones, as in inference
        "draws_redrawn_outside_support": redrawn,
        "calibration_error": per_param(cal["values"]),
        "ecdf_inside_95_band": dict(zip(names, band["inside_band"])),
        "ecdf_max_excursion": per_param(band["max_excursion"]),
        "coverage_90": per_param(cov90),
        "coverage_50": per_param(cov50),
        "posterior_contraction": per_param(con["values"]),
        "nrmse": per_param(nrmse["values"]),
        "r2": per_param(r2),
        "passed": bool(all(band["inside_band"])),
    }
    folder = Path(out_dir) if out_dir is not None else estimator.path
    if folder is not None and plots:
        _plots(folder / DIAGNOSTICS_DIR, draws, truth, names)
        result["plots"] = [f"{DIAGNOSTICS_DIR}/{p}" for p in ("calibration_ecdf.png", "recovery.png",
                                                                "z_score_contraction.png")]
    if write_meta and estimator.path is not None:
        meta_path = estimator.path / META_FILE
        meta = read_json(meta_path, "estimator metadata")
        meta["diagnostics"] = result
        write_json_atomic(meta_path, meta)
    logger.info("calibration check %s: %s", "passed" if result["passed"] else "FAILED",
                {n: f"err {result['calibration_error'][n]:.3f} cov90 {result['coverage_90'][n]:.2f} "
                    f"R2 {result['r2'][n]:.2f}" for n in names})
    return result


def _plots(folder: Path, draws: np.ndarray, truth: np.ndarray, names: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import bayesflow as bf
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    figs = {
        "calibration_ecdf.png": bf.diagnostics.plots.calibration_ecdf(draws, truth, variable_names=names,
                                                                      difference=True),
        "recovery.png": bf.diagnostics.plots.recovery(draws, truth, variable_names=names),
        "z_score_contraction.png": bf.diagnostics.plots.z_score_contraction(draws, truth, variable_names=names),
    }
    for fname, fig in figs.items():
        fig.savefig(folder / fname, dpi=90)
        plt.close(fig)
