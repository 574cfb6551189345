"""Posterior draws cached in HDF5, keyed by what was actually used: the data's content hash, the sha256 of the loaded
estimator file, the number of draws and the seed. Refitting with another population model then neither resamples nor
retrains. Safe with concurrent runs (each writes its own temporary file, the rename is atomic, identical content wins
either way) and after a kill (a truncated or unreadable cache file is detected, removed and resampled).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import h5py
import numpy as np

from amortized_nlme.errors import EstimatorError
from amortized_nlme.model import Design

logger = logging.getLogger(__name__)


def cache_key(data_hash: str, estimator_hash: str, n_draws: int, seed: int) -> str:
    """File stem of the cached draws of one (data, estimator, M, seed)."""
    return f"{data_hash[:16]}-{estimator_hash[:16]}-M{n_draws}-s{seed}"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (temporary files of dead processes may be removed)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: Path, pattern: str) -> int:
    """Delete ``folder/<pattern>`` files or folders whose name carries the pid of a process that no longer runs
    (``...tmp-<pid>-...``); returns how many were removed."""
    import shutil

    removed = 0
    for p in folder.glob(pattern):
        try:
            pid = int(p.name.split("tmp-", 1)[1].split("-", 1)[0])
        except (IndexError, ValueError):
            continue
        if not pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed += 1
    return removed


def _read_cached(path: Path, data_hash: str, estimator_hash: str, shape: tuple[int, int]) -> np.ndarray | None:
    """The cached draws, or None when the file is missing, belongs to something else, or is damaged (then removed)."""
    if not path.exists():
        return None
    try:
        with h5py.File(path, "r") as fh:
            if fh.attrs.get("data_hash") != data_hash or fh.attrs.get("estimator_sha256") != estimator_hash:
                return None
            draws = fh["draws"][...]
        if draws.shape[:2] != shape or not np.all(np.isfinite(draws)):
            raise ValueError(f"shape {draws.shape} or non-finite values")
        return draws
    except (OSError, KeyError, ValueError) as exc:
        logger.warning("cached posterior draws %s are damaged (%s); removing them and sampling again", path, exc)
        path.unlink(missing_ok=True)
        return None


def posterior_draws(estimator, observations: np.ndarray, design: Design, n_draws: int, seed: int, data_hash: str,
                    cache_dir: Path | None) -> np.ndarray:
    """Draws ``[n, M, k]`` (float32) for every individual, read from the cache when the same data, estimator file,
    M and seed were sampled before; written atomically otherwise."""
    n = observations.shape[0]
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"{cache_key(data_hash, estimator.sha256, n_draws, seed)}.h5"
        cached = _read_cached(path, data_hash, estimator.sha256, (n, n_draws))
        if cached is not None:
            logger.info("posterior draws read from cache %s", path)
            return cached
    t0 = time.perf_counter()
    draws = estimator.sample(observations, design, n_draws, seed=seed, progress=True)
    logger.info("%d x %d posterior draws in %.1f s", draws.shape[0], n_draws, time.perf_counter() - t0)
    bad = ~np.all(np.isfinite(draws), axis=(1, 2))
    if bad.any():
        raise EstimatorError(f"the estimator returned non-finite draws for {int(bad.sum())} individuals")
    draws = draws.astype(np.float32)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(path.parent, "*.tmp-*")
            tmp = path.with_name(f"{path.stem}.tmp-{os.getpid()}-{time.monotonic_ns()}")
            try:
                with h5py.File(tmp, "w") as fh:
                    fh.create_dataset("draws", data=draws, compression="lzf")
                    fh.attrs.update({"data_hash": data_hash, "estimator_sha256": estimator.sha256,
                                     "n_draws": n_draws, "seed": seed, "model": estimator.model.name})
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
        except OSError as exc:  # a cache is an optimisation: a read-only or full disk never fails the fit
            logger.warning("could not cache posterior draws in %s (%s)", path.parent, exc)
    return draws
