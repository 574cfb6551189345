"""The HDF5 simulation store: the artifact between the simulation and the training stage.

Layout of ``simulations/<model>.h5``::

    params        float64 [N, k]       log-parameters drawn from the model's prior
    observations  float32 [N, T, d]    simulated observations (0 where masked)
    design/<key>  [N, ...]             every design array (``times``, ``mask``, model-specific entries)
    chunk_done    bool    [n_chunks]   set after chunk c is written and flushed
    chunk_failed  int64   [n_chunks]   simulations redrawn in chunk c because they had non-finite values

    attrs: model_name, model_version, prior_spec (JSON), param_names (JSON), obs_names (JSON), seed,
           package_version, chunk_size, n_total, n_chunks, n_failed, created (JSON), complete

Chunk ``c`` holds rows ``[c * chunk_size, min((c + 1) * chunk_size, N))`` and is generated from its own RNG
``np.random.default_rng([seed, c])`` (see :func:`amortized_nlme.simulation.simulate.compute_chunk`), so chunks can be computed in
any order, anywhere, and written by index with :meth:`StoreWriter.write_chunk`. The writer works on
``<final>.partial`` and renames it to the final name only once every chunk is done.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import platform
import socket
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from amortized_nlme import __version__
from amortized_nlme.errors import StoreError
from amortized_nlme.model import Design, IndividualModel

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
#: target size in bytes of one HDF5 storage chunk of the uncompressed datasets (params, observations)
_H5_CHUNK_BYTES = 1 << 20
#: the same for compressed design datasets: small, since reading any row decompresses its whole chunk
_H5_DESIGN_CHUNK_BYTES = 64 << 10
#: HDF5 chunk cache per open dataset when reading
_READ_CACHE_BYTES = 64 << 20
#: attributes that must agree before a partial file is resumed
_RESUME_KEYS = ("model_name", "model_version", "seed", "n_total", "chunk_size", "prior_spec")


def partial_path(path: str | os.PathLike) -> Path:
    """Where an unfinished store for ``path`` lives: ``<path>.partial``."""
    path = Path(path)
    return path.with_name(path.name + ".partial")


def n_chunks_for(n_total: int, chunk_size: int) -> int:
    """Number of chunks needed for ``n_total`` simulations."""
    return -(-n_total // chunk_size)


def chunk_bounds(chunk_index: int, n_total: int, chunk_size: int) -> tuple[int, int]:
    """Row range ``[start, stop)`` of chunk ``chunk_index``."""
    start = chunk_index * chunk_size
    if chunk_index < 0 or start >= n_total:
        raise IndexError(f"chunk {chunk_index} is out of range for {n_total} simulations in chunks of {chunk_size}")
    return start, min(start + chunk_size, n_total)


def _row_chunks(n_total: int, row_shape: tuple[int, ...], dtype: np.dtype, max_rows: int,
                target_bytes: int = _H5_CHUNK_BYTES) -> tuple[int, ...]:
    """HDF5 storage chunk shape: whole rows, about ``target_bytes`` each."""
    row_bytes = max(1, int(np.prod(row_shape, dtype=np.int64)) * np.dtype(dtype).itemsize)
    rows = max(1, min(max_rows, n_total, target_bytes // row_bytes))
    return (rows, *row_shape)


def _creation_info() -> dict[str, Any]:
    """Who/where/with what the store was created (informative only, never compared)."""
    import numba

    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        user = ""
    return {
        "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "user": user,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "h5py": h5py.__version__,
        "hdf5": h5py.version.hdf5_version,
        "format_version": FORMAT_VERSION,
    }


def _expected_attrs(model: IndividualModel, n_total: int, chunk_size: int, seed: int) -> dict[str, Any]:
    return {
        "model_name": model.name,
        "model_version": str(model.version),
        "prior_spec": json.dumps(model.prior.spec(), sort_keys=True),
        "param_names": json.dumps(list(model.param_names)),
        "obs_names": json.dumps(list(model.obs_names)),
        "seed": int(seed),
        "n_total": int(n_total),
        "chunk_size": int(chunk_size),
        "n_chunks": n_chunks_for(n_total, chunk_size),
        "package_version": __version__,
        "format_version": FORMAT_VERSION,
    }


def _attr(value: Any) -> Any:
    """h5py attribute -> plain Python value."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _pad_time_axis(array: np.ndarray, target_t: int, chunk_t: int, name: str) -> np.ndarray:
    """Pad axis 1 of a per-time-point array from ``chunk_t`` to ``target_t`` with zeros (False for masks)."""
    if array.ndim < 2 or array.shape[1] != chunk_t or chunk_t > target_t:
        raise StoreError(f"{name}: cannot fit shape {array.shape} into the store's {target_t} time points")
    width = [(0, 0)] * array.ndim
    width[1] = (0, target_t - chunk_t)
    return np.pad(array, width)


class StoreWriter:
    """Creates or resumes ``<final>.partial`` and writes chunks by index; :meth:`finalize` renames it into place.

    A chunk may be computed anywhere (another process, another machine); only this object touches the file.
    """

    def __init__(self, path: str | os.PathLike, model: IndividualModel, n_total: int, chunk_size: int,
                 seed: int) -> None:
        if n_total <= 0:
            raise ValueError(f"number of simulations must be positive, got {n_total}")
        if chunk_size <= 0:
            raise ValueError(f"chunk size must be positive, got {chunk_size}")
        self.final_path = Path(path)
        self.path = partial_path(self.final_path)
        self.model = model
        self.n_total = int(n_total)
        self.chunk_size = int(chunk_size)
        self.seed = int(seed)
        self.n_chunks = n_chunks_for(self.n_total, self.chunk_size)
        self._expected = _expected_attrs(model, self.n_total, self.chunk_size, self.seed)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.resumed = self.path.exists()
        self._file = self._resume() if self.resumed else self._create()
        self._done = np.asarray(self._file["chunk_done"][:], dtype=bool)
        if self.resumed:
            logger.info("resuming %s: %d of %d chunks already done", self.path, int(self._done.sum()), self.n_chunks)

    # -- opening -------------------------------------------------------------------------------------------------
    def _create(self) -> h5py.File:
        f = h5py.File(self.path, "w", track_order=True)
        try:
            for key, value in self._expected.items():
                f.attrs[key] = value
            f.attrs["created"] = json.dumps(_creation_info())
            f.attrs["n_failed"] = 0
            f.attrs["complete"] = False
            k = self.model.n_params
            f.create_dataset("params", shape=(self.n_total, k), dtype=np.float64,
                             chunks=_row_chunks(self.n_total, (k,), np.float64, self.chunk_size), track_times=False)
            f.create_dataset("chunk_done", data=np.zeros(self.n_chunks, dtype=bool), track_times=False)
            f.create_dataset("chunk_failed", data=np.zeros(self.n_chunks, dtype=np.int64), track_times=False)
            f.create_group("design", track_order=True)
            f.flush()
        except BaseException:
            f.close()
            self.path.unlink(missing_ok=True)
            raise
        logger.debug("created %s", self.path)
        return f

    def _resume(self) -> h5py.File:
        try:
            f = h5py.File(self.path, "r+")
        except OSError as err:
            raise StoreError(f"cannot open the unfinished simulation file {self.path} ({err}); it was probably cut "
                             f"off in the middle of a write: delete it and run again") from err
        try:
            stored = {key: _attr(f.attrs[key]) if key in f.attrs else None for key in _RESUME_KEYS}
            diffs = [f"{key}: file has {stored[key]!r}, this run asks {self._expected[key]!r}"
                     for key in _RESUME_KEYS if stored[key] != self._expected[key]]
            missing = [name for name in ("params", "chunk_done", "chunk_failed", "design") if name not in f]
            if diffs or missing:
                detail = "; ".join(diffs) if diffs else f"missing {', '.join(missing)}"
                raise StoreError(f"refusing to resume {self.path}: it was started with different settings "
                                 f"({detail}). Rerun with the original settings, or delete the file to start over.")
            if _attr(f.attrs.get("package_version")) != __version__:
                logger.warning("%s was started with amortized-nlme %s, resuming with %s", self.path,
                               _attr(f.attrs.get("package_version")), __version__)
        except BaseException:
            f.close()
            raise
        return f

    # -- state ---------------------------------------------------------------------------------------------------
    @property
    def done(self) -> np.ndarray:
        """Copy of the per-chunk done flags."""
        return self._done.copy()

    def pending_chunks(self) -> list[int]:
        """Indices of the chunks not written yet, in order."""
        return [int(c) for c in np.flatnonzero(~self._done)]

    def rows_done(self) -> int:
        """Number of simulations already written."""
        bounds = (chunk_bounds(int(c), self.n_total, self.chunk_size) for c in np.flatnonzero(self._done))
        return sum(stop - start for start, stop in bounds)

    @property
    def n_failed(self) -> int:
        """Failed-and-redrawn simulations over the chunks written so far."""
        return int(self._file["chunk_failed"][:].sum())

    # -- writing -------------------------------------------------------------------------------------------------
    def _time_points(self, chunk_t: int) -> int:
        if "observations" in self._file:
            return int(self._file["observations"].shape[1])
        return int(self.model.max_time_points) or chunk_t

    def _ensure_datasets(self, observations: np.ndarray, design: Design, n_time: int) -> None:
        """Create observation and design datasets from the first chunk's shapes and dtypes."""
        f = self._file
        if "observations" not in f:
            row = (n_time, observations.shape[2])
            f.create_dataset("observations", shape=(self.n_total, *row), dtype=np.float32,
                             chunks=_row_chunks(self.n_total, row, np.float32, self.chunk_size), track_times=False)
        group = f["design"]
        if not group.keys():
            for key, value in design.items():
                row = value.shape[1:]
                if value.ndim >= 2 and value.shape[1] == observations.shape[1]:
                    row = (n_time, *value.shape[2:])
                # designs are often identical between rows (fixed grids): shuffle + lzf makes them nearly free
                group.create_dataset(key, shape=(self.n_total, *row), dtype=value.dtype,
                                     chunks=_row_chunks(self.n_total, row, value.dtype, self.chunk_size,
                                                        _H5_DESIGN_CHUNK_BYTES),
                                     compression="lzf", shuffle=True, track_times=False)

    def write_chunk(self, chunk_index: int, params: np.ndarray, observations: np.ndarray, design: Design,
                    n_failed: int = 0) -> None:
        """Write chunk ``chunk_index`` (rows, shapes checked), flush, then mark it done and flush again."""
        chunk_index = int(chunk_index)
        start, stop = chunk_bounds(chunk_index, self.n_total, self.chunk_size)
        n = stop - start
        if self._done[chunk_index]:
            raise StoreError(f"chunk {chunk_index} of {self.path} is already written")
        params = np.asarray(params, dtype=np.float64)
        observations = np.asarray(observations)
        if params.shape != (n, self.model.n_params):
            raise StoreError(f"chunk {chunk_index}: params have shape {params.shape}, expected "
                             f"{(n, self.model.n_params)}")
        if observations.ndim != 3 or observations.shape[0] != n:
            raise StoreError(f"chunk {chunk_index}: observations have shape {observations.shape}, expected [{n}, T, d]")
        missing = {"times", "mask"} - set(design)
        if missing:
            raise StoreError(f"chunk {chunk_index}: design lacks {', '.join(sorted(missing))}")
        chunk_t = observations.shape[1]
        n_time = self._time_points(chunk_t)
        self._ensure_datasets(observations, design, n_time)
        f = self._file
        if chunk_t != n_time:
            observations = _pad_time_axis(observations, n_time, chunk_t, "observations")
        if observations.shape[1:] != f["observations"].shape[1:]:
            raise StoreError(f"chunk {chunk_index}: observations have shape {observations.shape}, the store holds "
                             f"rows of shape {f['observations'].shape[1:]}")
        group = f["design"]
        if set(design) != set(group.keys()):
            raise StoreError(f"chunk {chunk_index}: design keys {sorted(design)} differ from the store's "
                             f"{sorted(group.keys())}")
        rows: dict[str, np.ndarray] = {}
        for key, value in design.items():
            value = np.asarray(value)
            dset = group[key]
            if value.shape[0] != n:
                raise StoreError(f"chunk {chunk_index}: design[{key!r}] has {value.shape[0]} rows, expected {n}")
            if value.shape[1:] != dset.shape[1:] and chunk_t != n_time:
                value = _pad_time_axis(value, n_time, chunk_t, f"design[{key!r}]")
            if value.shape[1:] != dset.shape[1:]:
                raise StoreError(f"chunk {chunk_index}: design[{key!r}] has rows of shape {value.shape[1:]}, the "
                                 f"store holds {dset.shape[1:]}")
            rows[key] = value.astype(dset.dtype, copy=False)
        f["params"][start:stop] = params
        f["observations"][start:stop] = observations.astype(np.float32, copy=False)
        for key, value in rows.items():
            group[key][start:stop] = value
        f["chunk_failed"][chunk_index] = int(n_failed)
        f.flush()
        f["chunk_done"][chunk_index] = True
        f.flush()
        self._done[chunk_index] = True

    # -- finishing -----------------------------------------------------------------------------------------------
    def finalize(self) -> Path:
        """Check every chunk is done, record the failure count, close and rename atomically to the final path."""
        pending = self.pending_chunks()
        if pending:
            raise StoreError(f"{self.path}: {len(pending)} of {self.n_chunks} chunks are not written yet")
        f = self._file
        f.attrs["n_failed"] = int(f["chunk_failed"][:].sum())
        f.attrs["complete"] = True
        f.attrs["finished_utc"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.close()
        os.replace(self.path, self.final_path)
        logger.debug("renamed %s -> %s", self.path, self.final_path)
        return self.final_path

    def close(self) -> None:
        """Flush and close the partial file (it stays resumable)."""
        if self._file.id.valid:
            self._file.flush()
            self._file.close()

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SimulationStore:
    """Read-only access to a finished simulation store, row ranges at a time (never everything unless asked).

    ``model``, when given, must match the store's model name and version.
    """

    def __init__(self, path: str | os.PathLike, model: IndividualModel | None = None) -> None:
        self.path = Path(path)
        if not self.path.exists():
            hint = (f" (an unfinished run left {partial_path(self.path)}; rerun the simulation to finish it)"
                    if partial_path(self.path).exists() else "")
            raise StoreError(f"simulation store {self.path} does not exist{hint}")
        try:
            self._file = h5py.File(self.path, "r", rdcc_nbytes=_READ_CACHE_BYTES, rdcc_nslots=100_003)
        except OSError as err:
            raise StoreError(f"cannot read simulation store {self.path}: {err}") from err
        try:
            self.meta: dict[str, Any] = {key: _attr(value) for key, value in self._file.attrs.items()}
            for key in ("prior_spec", "param_names", "obs_names", "created"):
                if isinstance(self.meta.get(key), str):
                    self.meta[key] = json.loads(self.meta[key])
            missing = [name for name in ("params", "observations", "design", "chunk_done") if name not in self._file]
            if missing or "model_name" not in self.meta:
                raise StoreError(f"{self.path} is not a simulation store (missing {', '.join(missing) or 'attrs'})")
            if not (self.meta.get("complete") and bool(np.all(self._file["chunk_done"][:]))):
                raise StoreError(f"simulation store {self.path} is incomplete; rerun the simulation to finish it")
            if model is not None:
                self.check_model(model)
        except BaseException:
            self._file.close()
            raise
        self._params: np.ndarray | None = None
        # keep datasets open: each open has its own chunk cache, so reopening per read would decompress again
        self._params_ds = self._file["params"]
        self._obs_ds = self._file["observations"]
        self._design_ds = dict(self._file["design"].items())

    def check_model(self, model: IndividualModel) -> None:
        """Raise :class:`StoreError` unless the store was simulated by this model name and version."""
        have = (self.meta["model_name"], str(self.meta["model_version"]))
        want = (model.name, str(model.version))
        if have != want:
            raise StoreError(f"simulation store {self.path} holds model {have[0]!r} version {have[1]}, but model "
                             f"{want[0]!r} version {want[1]} was asked for; simulate again for this model")
        if self.meta.get("prior_spec") != model.prior.spec():
            logger.warning("%s: prior spec differs from model %s's current prior (same version)", self.path, model.name)

    # -- sizes and metadata --------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self._params_ds.shape[0])

    @property
    def n_params(self) -> int:
        return int(self._params_ds.shape[1])

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(self.meta["param_names"])

    @property
    def observation_shape(self) -> tuple[int, int]:
        """``(T, d)`` of each stored observation row."""
        t, d = self._obs_ds.shape[1:]
        return int(t), int(d)

    @property
    def design_keys(self) -> tuple[str, ...]:
        return tuple(self._design_ds)

    @property
    def n_failed(self) -> int:
        return int(self.meta.get("n_failed", 0))

    @property
    def params(self) -> np.ndarray:
        """All parameters ``[N, k]`` (small: loaded once and cached)."""
        if self._params is None:
            self._params = self._params_ds[:]
        return self._params

    # -- reading -------------------------------------------------------------------------------------------------
    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, Design]:
        """Rows ``[start, stop)`` as ``(params, observations, design)`` numpy arrays."""
        n = len(self)
        start, stop, _ = slice(start, stop).indices(n)
        stop = max(start, stop)
        design = {key: dset[start:stop] for key, dset in self._design_ds.items()}
        return self._params_ds[start:stop], self._obs_ds[start:stop], design

    def read_indices(self, indices: np.ndarray, max_gap: int = 64) -> tuple[np.ndarray, np.ndarray, Design]:
        """Rows at sorted ``indices``; reads runs of nearby rows (gaps <= ``max_gap``) as slabs, then selects."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        if idx.size and (idx[0] < 0 or idx[-1] >= n):
            raise IndexError(f"indices must lie in [0, {n}), got {idx[0]}..{idx[-1]}")
        if idx.size > 1 and np.any(np.diff(idx) <= 0):
            raise ValueError("indices must be sorted and unique")
        dsets = {"params": self._params_ds, "observations": self._obs_ds,
                 **{f"design/{key}": dset for key, dset in self._design_ds.items()}}
        out = {name: np.empty((idx.size, *dset.shape[1:]), dtype=dset.dtype) for name, dset in dsets.items()}
        breaks = np.flatnonzero(np.diff(idx) > max_gap) + 1
        lo = 0
        for hi in (*breaks.tolist(), idx.size):
            if hi == lo:
                continue
            first, last = int(idx[lo]), int(idx[hi - 1])
            local = idx[lo:hi] - first
            for name, dset in dsets.items():
                out[name][lo:hi] = dset[first:last + 1][local]
            lo = hi
        design = {key: out[f"design/{key}"] for key in self._design_ds}
        return out["params"], out["observations"], design

    def split(self, validation: float | int = 0.05) -> tuple[range, range]:
        """Train and validation index ranges; the validation set is the last rows (rows are i.i.d., so a tail is a
        random subset). ``validation`` is a fraction (< 1) or a count."""
        n = len(self)
        n_val = int(round(validation * n)) if isinstance(validation, float) and validation < 1 else int(validation)
        if not 0 < n_val < n:
            raise ValueError(f"validation size {validation!r} gives {n_val} of {n} simulations; need 0 < n_val < N")
        return range(0, n - n_val), range(n - n_val, n)

    def close(self) -> None:
        if self._file.id.valid:
            self._file.close()

    def __enter__(self) -> "SimulationStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"SimulationStore({str(self.path)!r}, model={self.meta['model_name']!r} v{self.meta['model_version']}, "
                f"N={len(self)}, seed={self.meta['seed']})")
