"""The results folder of a population fit: estimates, summary, individual estimates, the pyPESTO result and plots.

:func:`write_results` writes everything into a temporary sibling folder and renames it into place only when every file
is complete, so a results folder under its final name is never half written (an existing folder of the same name is
replaced as a whole). Plots are subsampled (at most ``MAX_VPC_INDIVIDUALS`` individuals for the visual predictive check,
``N_INDIVIDUAL_FITS`` panels of individual fits) so that data sets of thousands of individuals are reported in seconds.

All individual parameters are on the model's log scale; ``estimates.csv`` adds the natural-scale value where one is
meaningful (exp of log means and covariate effects, random-effect standard deviations).
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

import numpy as np

from amortized_nlme.model import Design, IndividualModel
from amortized_nlme.population.fit import FitResult
from amortized_nlme.provenance import to_json
from amortized_nlme.report.constants import (
    ESTIMATES_FILE,
    INDIVIDUAL_FILE,
    MAX_VPC_INDIVIDUALS,
    N_VPC_REPLICATES,
    PYPESTO_FILE,
    REPORT_FILE,
    SUMMARY_FILE,
)
from amortized_nlme.report.markdown import render_report
from amortized_nlme.report.plots import (
    plot_individual_fits,
    plot_parameter_distributions,
    plot_profiles,
    plot_vpc,
    plot_waterfall,
)
from amortized_nlme.report.tables import (
    build_summary,
    estimates_frame,
    individual_frame,
)
from amortized_nlme.report.vpc import visual_predictive_check

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


def write_results(
    out_dir: Path, *, fit: FitResult, model: IndividualModel, observations: np.ndarray, design: Design,
    draws: np.ndarray, ids: Sequence[str], covariates: dict[str, np.ndarray] | None, groups: np.ndarray | None,
    inputs: dict, extra: dict | None = None, plots: bool = True, seed: int = 0,
) -> Path:
    """Write the results folder of ``fit`` (estimates.csv, summary.json, individual_estimates.csv, pypesto_result.h5,
    report.md and the plots) atomically to ``out_dir`` and return it. ``observations [n, T, d]``, ``design``,
    ``draws [n, M, k]``, ``ids``, ``covariates`` and ``groups`` are those the fit used; ``inputs`` (data hash,
    estimator hash, population model, seed, versions, ...) goes verbatim into summary.json, as do the top-level keys
    of ``extra``. ``seed`` seeds the plot subsampling and the VPC simulations."""
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
    rng = np.random.default_rng(seed)
    with _atomic_directory(out_dir) as tmp:
        estimates_frame(fit).to_csv(tmp / ESTIMATES_FILE, index=False)
        conditional = fit.objective.conditional_moments(fit.estimate)
        shrinkage = fit.objective.shrinkage(fit.estimate, conditional[0])
        individual_frame(model, draws, ids, covariates, groups, fit.diagnostics.ess, conditional).to_csv(
            tmp / INDIVIDUAL_FILE, index=False)
        pypesto.store.write_result(fit.result, tmp / PYPESTO_FILE, overwrite=True, problem=True, optimize=True,
                                   profile=bool(fit.result.profile_result.list))
        written: list[str] = []
        if plots:
            plot_waterfall(fit, tmp / "waterfall.png")
            written.append("waterfall.png")
            if plot_profiles(fit, tmp / "profiles.png"):
                written.append("profiles.png")
            try:
                plot_individual_fits(model, observations, design, draws, ids, groups, tmp / "individual_fits.png",
                                     rng)
                written.append("individual_fits.png")
            except NotImplementedError as exc:
                logger.warning("no individual-fit plot: %s", exc)
            panels = visual_predictive_check(fit.model, fit.estimate, model, observations, design, covariates, groups,
                                             seed=int(rng.integers(2**31)))
            plot_vpc(panels, model, tmp / "vpc.png", N_VPC_REPLICATES, min(n, MAX_VPC_INDIVIDUALS))
            written.append("vpc.png")
            plot_parameter_distributions(fit, draws, covariates, groups, tmp / "parameter_distributions.png", rng,
                                         conditional[0], shrinkage)
            written.append("parameter_distributions.png")
        summary = build_summary(fit, inputs, extra, ids, report_s=time.perf_counter() - t0)
        summary["shrinkage"] = {"eta_shrinkage": shrinkage,
                                "note": "1 - sd over individuals of E[eta_i | y_i] / omega, eta_i = phi_i - mu_i, "
                                        "conditional means under the fitted population model (NONMEM/Monolix "
                                        "convention; above ~0.3 individual estimates are pulled to the population "
                                        "mean and diagnostics based on them mislead)"}
        summary["plots"] = written
        (tmp / SUMMARY_FILE).write_text(to_json(summary))
        (tmp / REPORT_FILE).write_text(render_report(fit, summary, written))
    logger.info("results written to %s in %.1f s", out_dir, time.perf_counter() - t0)
    return out_dir
