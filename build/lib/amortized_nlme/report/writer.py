"""The results folder of a population fit: the tables and figures a pharmacometrician reads after a fit.

:func:`write_results` writes everything into a temporary sibling folder and renames it into place only when every file
is complete, so a results folder under its final name is never half written (an existing folder of the same name is
replaced as a whole).

Tables cover every individual and observation (``sdtab.csv``, ``patab.csv``, ``individual_estimates.csv``); figures
subsample where a data set is large, and say so in their titles, report.md and summary.json (``subsampling``):
goodness-of-fit scatter plots draw at most ``MAX_GOF_POINTS`` observations, the VPCs simulate at most
``MAX_VPC_INDIVIDUALS`` individuals, ``individual_fits.pdf`` holds at most ``MAX_PDF_INDIVIDUALS`` individuals.

All individual parameters are on the model's log scale; see :mod:`amortized_nlme.report.parameters` for what the
natural-scale columns mean.
"""

from __future__ import annotations

import errno
import glob
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from amortized_nlme.model import Design, IndividualModel
from amortized_nlme.population.fit import FitResult
from amortized_nlme.provenance import plain_json, to_json
from amortized_nlme.report.censoring import Censoring
from amortized_nlme.report.constants import (
    CORRELATION_FILE,
    COVARIANCE_FILE,
    DERIVED_FILE,
    ESTIMATES_FILE,
    INDIVIDUAL_FILE,
    INDIVIDUAL_FITS_PDF,
    MAX_GOF_POINTS,
    MAX_PDF_INDIVIDUALS,
    PATAB_FILE,
    PYPESTO_FILE,
    RANDOM_EFFECTS_FILE,
    REPORT_FILE,
    SDTAB_FILE,
    SUMMARY_FILE,
)
from amortized_nlme.report.diagnostics import (
    Diagnostics,
    compute_diagnostics,
    is_log_scale,
    patab_frame,
    sdtab_frame,
)
from amortized_nlme.report.fits import (
    plot_individual_fits_png,
    write_individual_fits_pdf,
)
from amortized_nlme.report.gof import (
    plot_dv_vs_predictions,
    plot_eta_covariates,
    plot_eta_distributions,
    plot_npde_distribution,
    plot_residuals,
)
from amortized_nlme.report.markdown import render_report
from amortized_nlme.report.parameters import (
    DerivedParameter,
    covariance_of_estimates,
    covariance_tables,
    derived_frame,
    derived_individual_values,
    estimates_frame,
    model_derived_parameters,
    random_effects_frame,
)
from amortized_nlme.report.plots import (
    plot_parameter_distributions,
    plot_profiles,
    plot_vpc,
    plot_waterfall,
    time_label,
)
from amortized_nlme.report.residuals import (
    ResidualError,
    residual_description,
    resolve_residual,
)
from amortized_nlme.report.tables import build_summary, individual_frame
from amortized_nlme.report.vpc import (
    VPCOptions,
    simulate_vpc,
    stratum_labels,
    vpc_panels,
)

logger = logging.getLogger(__name__)


# ============================================================================ writing
def _temporary_prefix(out_dir: Path, kind: str = "") -> str:
    """Name prefix of this process's temporary siblings of ``out_dir``: ``.<name>.tmp-<pid>-`` (new results) and
    ``.<name>.tmp-<pid>-old-`` (the results being replaced), so that those of a killed process can be told apart."""
    return f".{out_dir.name}.tmp-{os.getpid()}-{kind}"


def remove_stale_temporaries(out_dir: Path) -> int:
    """Delete the temporary siblings of ``out_dir`` that a killed run left behind (their pid no longer runs);
    returns how many. Those of running processes (a concurrent run writing the same folder) are left alone."""
    from amortized_nlme.posterior.cache import remove_stale_temporaries as remove

    if not out_dir.parent.is_dir():
        return 0
    n = remove(out_dir.parent, f".{glob.escape(out_dir.name)}.tmp-*")
    if n:
        logger.info("removed %d temporary folder(s) of %s left by an interrupted run", n, out_dir)
    return n


@contextmanager
def _atomic_directory(out_dir: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``out_dir`` (renames), on an exception it is deleted
    and ``out_dir`` (new or pre-existing) is untouched. Temporary siblings of killed runs are removed first."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=_temporary_prefix(out_dir), dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the results folder gets ordinary permissions
    try:
        yield tmp
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the complete folder ``tmp`` to ``out_dir``, replacing an existing one as a whole. When a concurrent run
    puts its own results there in between, the last one to finish wins and neither fails; an interruption between
    the two renames puts the previous results back."""
    for _ in range(20):
        old = None
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=_temporary_prefix(out_dir, "old-"), dir=out_dir.parent))
            os.rmdir(old)
            try:
                os.replace(out_dir, old)
            except FileNotFoundError:  # a concurrent run moved it away in between
                old = None
        try:
            os.replace(tmp, out_dir)
        except BaseException as exc:
            if old is not None:
                try:
                    os.replace(old, out_dir)  # the previous results back
                except OSError:  # a concurrent run's results are there now: the previous ones are superseded
                    shutil.rmtree(old, ignore_errors=True)
            if isinstance(exc, OSError) and exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                continue  # a concurrent run's results arrived between our two renames: replace them too
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
            logger.info("replaced existing results folder %s", out_dir)
        return
    raise OSError(errno.EBUSY, "other runs keep replacing the results folder", str(out_dir))


def _check_censoring(censoring: Censoring | None, shape: tuple[int, ...]) -> Censoring | None:
    if censoring is None:
        return None
    if censoring.blq.shape != shape:
        raise ValueError(f"censoring arrays have shape {censoring.blq.shape}, the observations {shape}")
    return censoring


def write_results(
    out_dir: Path, *, fit: FitResult, model: IndividualModel, observations: np.ndarray, design: Design,
    draws: np.ndarray, ids: Sequence[str], covariates: dict[str, np.ndarray] | None, groups: np.ndarray | None,
    inputs: dict, extra: dict | None = None, plots: bool = True, seed: int = 0,
    residual: ResidualError | None = None, censoring: Censoring | None = None,
    derived: Sequence[DerivedParameter] | None = None, vpc: VPCOptions | None = None,
    n_npde_simulations: int | None = None, max_pdf_individuals: int | None = MAX_PDF_INDIVIDUALS,
) -> Path:
    """Write the results folder of ``fit`` atomically to ``out_dir`` and return it.

    ``observations [n, T, d]``, ``design``, ``draws [n, M, k]``, ``ids``, ``covariates`` and ``groups`` are those the
    fit used; ``inputs`` (data hash, estimator hash, population model, seed, versions, ...) goes verbatim into
    summary.json, as do the top-level keys of ``extra`` (``extra["model_selection"]`` with ``computed``,
    ``minus2ll`` and ``minus2ll_se`` is where report.md takes -2LL from). ``seed`` seeds the NPDE and VPC
    simulations and the plot subsampling.

    Inputs the fit does not provide yet (all optional):

    * ``residual``: the population-level residual error (:class:`ResidualError`); None: the fit's ``log_sigma_add``
      / ``log_sigma_prop`` parameters if it has them, else the model's own error (see
      :mod:`amortized_nlme.report.residuals`);
    * ``censoring``: BLQ flags and limits ``[n, T, d]`` (:class:`Censoring`); None: no BLQ data (BLQ column 0);
    * ``derived``: derived parameters (:class:`DerivedParameter`); None: the model's ``derived_parameters``;
    * ``vpc``: :class:`VPCOptions` (stratification, log axis, binning); ``n_npde_simulations``: K of the NPDE
      (None: chosen by budget, see :func:`~amortized_nlme.report.diagnostics.n_npde_simulations`);
      ``max_pdf_individuals``: how many individuals individual_fits.pdf holds at most (None: all; a page of 16
      takes about a second).
    """
    import pypesto.store

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    draws = np.asarray(draws, dtype=np.float64)
    observations = np.asarray(observations, dtype=np.float64)
    n = draws.shape[0]
    if observations.shape[0] != n or len(ids) != n or np.asarray(design["times"]).shape[0] != n:
        raise ValueError(f"observations ({observations.shape[0]}), design, ids ({len(ids)}) and draws ({n}) must cover "
                         "the same individuals")
    if groups is not None and len(groups) != n:
        raise ValueError(f"{len(groups)} group labels for {n} individuals")
    censoring = _check_censoring(censoring, observations.shape)
    vpc = vpc or VPCOptions()
    derived = tuple(derived) if derived is not None else model_derived_parameters(model)
    residual = resolve_residual(model, fit.parameter_names, fit.estimate, residual)
    rng = np.random.default_rng(seed)
    timings: dict[str, float] = {}
    with _atomic_directory(out_dir) as tmp:
        # ---------------------------------------------------------------- parameter tables
        cov = covariance_of_estimates(fit)
        estimates = estimates_frame(fit, cov)
        estimates.to_csv(tmp / ESTIMATES_FILE, index=False)
        cov_df, corr_df, cov_info = covariance_tables(fit, cov)
        files = [ESTIMATES_FILE]
        if cov_df is not None:
            cov_df.to_csv(tmp / COVARIANCE_FILE, index_label="parameter")
            corr_df.to_csv(tmp / CORRELATION_FILE, index_label="parameter")
            files += [COVARIANCE_FILE, CORRELATION_FILE]
        # ---------------------------------------------------------------- observation and individual diagnostics
        t1 = time.perf_counter()
        conditional = fit.objective.conditional_moments(fit.estimate)
        diag = compute_diagnostics(fit, model, observations, design, covariates, groups, rng, residual=residual,
                                   censoring=censoring, conditional=conditional, n_simulations=n_npde_simulations)
        timings["diagnostics_s"] = time.perf_counter() - t1
        shrinkage = fit.objective.shrinkage(fit.estimate, conditional[0])
        random_effects = random_effects_frame(fit, cov, shrinkage)
        random_effects.to_csv(tmp / RANDOM_EFFECTS_FILE, index=False)
        files.append(RANDOM_EFFECTS_FILE)
        derived_df = derived_frame(fit, cov, derived) if derived else None
        if derived_df is not None:
            derived_df.to_csv(tmp / DERIVED_FILE, index=False)
            files.append(DERIVED_FILE)
        sdtab_frame(diag, ids, groups).to_csv(tmp / SDTAB_FILE, index=False)
        patab_frame(diag, ids, groups, covariates,
                    derived_individual_values(derived, model.param_names, diag.cond_mean)).to_csv(
            tmp / PATAB_FILE, index=False)
        individual_frame(model, draws, ids, covariates, groups, fit.diagnostics.ess, conditional,
                         fit.model.param_names_individual).to_csv(
            tmp / INDIVIDUAL_FILE, index=False)
        files += [SDTAB_FILE, PATAB_FILE, INDIVIDUAL_FILE]
        pypesto.store.write_result(fit.result, tmp / PYPESTO_FILE, overwrite=True, problem=True, optimize=True,
                                   profile=bool(fit.result.profile_result.list))
        files.append(PYPESTO_FILE)
        npde_summary = diag.npde_summary()
        # ---------------------------------------------------------------- figures
        written: list[str] = []
        subsampling: dict[str, str] = {}
        vpc_info: dict[str, Any] = {}
        if plots:
            t1 = time.perf_counter()
            written, subsampling, vpc_info, pdf_what = _figures(
                tmp, fit, model, observations, design, draws, ids, covariates, groups, diag, npde_summary, shrinkage,
                residual, censoring, vpc, rng, max_pdf_individuals)
            if pdf_what:
                files.append(INDIVIDUAL_FITS_PDF)
            timings["figures_s"] = time.perf_counter() - t1
        # ---------------------------------------------------------------- summary and report
        summary = build_summary(fit, inputs, extra, ids, report_s=time.perf_counter() - t0)
        summary["objective"]["objective_x2"] = 2.0 * fit.fval
        summary["objective"]["draws_weighting"] = getattr(fit.objective.draws, "kind", "amortized")
        summary["n_observations"] = int(diag.observed.sum())
        summary["n_blq"] = int(diag.blq.sum())
        summary["shrinkage"] = {
            "eta_shrinkage": shrinkage,
            "epsilon_shrinkage": diag.epsilon_shrinkage,
            "note": "eta: 1 - sd over individuals of E[eta_i | y_i] / omega, eta_i = phi_i - mu_i, conditional means "
                    "under the fitted population model; epsilon: 1 - sd of IWRES (NONMEM/Monolix conventions; above "
                    "~0.3 individual estimates are pulled to the population mean and diagnostics based on them "
                    "mislead)"}
        summary["npde"] = {**npde_summary, "method": (
            "Comets et al. 2008: K data sets simulated from the fitted population at each individual's design, "
            "decorrelated by the Cholesky factor of the simulated covariance; mean and covariance from K/2 "
            "simulations, pde against the other K/2; BLQ observations imputed in the decorrelated space below the "
            "LLOQ given the preceding observations (the cdf method of Nguyen et al. 2012 after whitening)"),
                           "undefined_zero_variance": diag.npde_failed}
        summary["residual_error"] = {**residual_description(residual, model), "iwres_sd_from": diag.residual_source}
        summary["covariance_of_estimates"] = cov_info
        summary["random_effects"] = random_effects.to_dict(orient="records")
        if derived_df is not None:
            summary["derived_parameters"] = derived_df.to_dict(orient="records")
        summary["vpc"] = vpc_info
        summary["subsampling"] = subsampling
        summary["plots"] = written
        summary["files"] = files + [SUMMARY_FILE, REPORT_FILE]
        summary["timings"]["report_s"] = time.perf_counter() - t0
        summary["timings"].update({k: round(v, 2) for k, v in timings.items()})
        summary = plain_json(summary)
        (tmp / SUMMARY_FILE).write_text(to_json(summary))
        (tmp / REPORT_FILE).write_text(render_report(fit, summary, estimates=estimates, random_effects=random_effects,
                                                     derived=derived_df, plots=written, files=summary["files"]))
    logger.info("results written to %s in %.1f s", out_dir, time.perf_counter() - t0)
    return out_dir


def _figures(tmp: Path, fit: FitResult, model: IndividualModel, observations: np.ndarray, design: Design,
             draws: np.ndarray, ids: Sequence[str], covariates: dict[str, np.ndarray] | None,
             groups: np.ndarray | None, diag: Diagnostics, npde_summary: dict, shrinkage: dict,
             residual: ResidualError | None, censoring: Censoring | None, vpc: VPCOptions,
             rng: np.random.Generator, max_pdf: int | None) -> tuple[list[str], dict[str, str], dict[str, Any], str]:
    """Every figure; returns the PNG names, what was subsampled, the VPC settings and what the PDF holds."""
    written: list[str] = []
    sub: dict[str, str] = {}
    tl = time_label(model)
    n = observations.shape[0]
    plot_waterfall(fit, tmp / "waterfall.png")
    written.append("waterfall.png")
    if plot_profiles(fit, tmp / "profiles.png"):
        written.append("profiles.png")
    has_pred = bool(np.isfinite(diag.pred[diag.observed]).any())
    n_used = int(diag.used.sum())
    if n_used > MAX_GOF_POINTS:
        sub["goodness_of_fit"] = (f"scatter plots draw {MAX_GOF_POINTS} random observations per observation type "
                                  f"of {n_used}; trend lines and tables use all")
    if has_pred:
        plot_dv_vs_predictions(diag, tmp / "gof_dv_vs_pred.png", rng)
        plot_residuals(diag, tmp / "gof_residuals.png", rng, tl)
        written += ["gof_dv_vs_pred.png", "gof_residuals.png"]
    if np.isfinite(diag.npde).any():
        plot_npde_distribution(diag, npde_summary, tmp / "npde.png")
        written.append("npde.png")
    if plot_eta_covariates(diag, covariates, groups, tmp / "eta_covariates.png", rng):
        written.append("eta_covariates.png")
    if plot_eta_distributions(diag, tmp / "eta_distributions.png"):
        written.append("eta_distributions.png")
    plot_parameter_distributions(fit, draws, covariates, groups, tmp / "parameter_distributions.png", rng,
                                 diag.cond_mean, shrinkage)
    written.append("parameter_distributions.png")
    # VPCs: one simulation, three views
    labels, strat = stratum_labels(vpc.stratify, groups, covariates, n)
    sim = simulate_vpc(fit.model, fit.estimate, model, observations, design, covariates, groups, strata=labels,
                       censoring=censoring, residual=residual, n_replicates=vpc.n_replicates,
                       max_individuals=vpc.max_individuals, seed=int(rng.integers(2**31)))
    m = sim.index.size
    if m < n:
        sub["vpc"] = f"VPCs simulate {m} of {n} individuals (random subsample), {sim.n_replicates} replicates each"
    common = dict(time_label=tl, n_replicates=sim.n_replicates, n_individuals=m, n_total=n, strata_label=strat)
    opts = dict(quantiles=vpc.quantiles, interval=vpc.interval, binning=vpc.binning, n_bins=vpc.n_bins,
                log_dv=vpc.log_dv)
    plot_vpc(vpc_panels(sim, prediction_corrected=False, **opts), tmp / "vpc.png", **common)
    written.append("vpc.png")
    if has_pred:
        panels = vpc_panels(sim, prediction_corrected=True, **opts)
        plot_vpc(panels, tmp / "pcvpc.png", **common)
        written.append("pcvpc.png")
        positive = np.mean(observations[diag.used] > 0) if n_used else 0.0
        log_y = vpc.log_y if vpc.log_y is not None else (
            not any(is_log_scale(o) for o in diag.obs_names) and positive > 0.9)
        if log_y:
            plot_vpc(panels, tmp / "pcvpc_log.png", log_y=True, **common)
            written.append("pcvpc_log.png")
    vpc_info = {"n_replicates": sim.n_replicates, "n_individuals": m, "n_total": n, "stratified_by": strat,
                "binning": vpc.binning, "quantiles": list(vpc.quantiles), "interval": vpc.interval,
                "prediction_correction": "pcY = Y PRED_bin / PRED (additive for log-scale observations), Bergstrand "
                                         "et al. 2011"}
    # individual fits
    pdf_what = ""
    if has_pred:
        try:
            plot_individual_fits_png(fit, model, design, diag, ids, groups, tmp / "individual_fits.png", rng, tl)
            written.append("individual_fits.png")
            pdf_what = write_individual_fits_pdf(fit, model, design, diag, ids, groups, tmp / INDIVIDUAL_FITS_PDF,
                                                 rng, tl, max_pdf)
            if not pdf_what.startswith("all"):
                sub["individual_fits_pdf"] = pdf_what
        except NotImplementedError as exc:
            logger.warning("no individual-fit plots: %s", exc)
    return written, sub, vpc_info, pdf_what
