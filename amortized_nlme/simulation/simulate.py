"""The simulation stage: draw parameters and designs, simulate, redraw failures, write the HDF5 store chunk by chunk.

:func:`simulate_batch` is the one place that turns a model and an RNG into a clean batch (it is reused by online
training); :func:`compute_chunk` makes chunk ``c`` of a store from its own RNG, so any worker can compute any chunk;
:func:`simulate_to_store` runs the whole stage with progress, resume and an atomic final rename. Where the chunks are
computed is a :class:`ChunkExecutor` (this process, a process pool, or a Dask cluster from
:mod:`amortized_nlme.simulation.distributed`); this process alone writes the store.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from tqdm import tqdm

from amortized_nlme.errors import SimulationError
from amortized_nlme.model import Design, IndividualModel
from amortized_nlme.simulation.store import SimulationStore, StoreError, StoreWriter, chunk_bounds, partial_path

logger = logging.getLogger(__name__)

#: rounds of redrawing failed simulations before giving up
DEFAULT_MAX_ROUNDS = 20
DEFAULT_CHUNK_SIZE = 16384
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _observed_mask(mask: np.ndarray, observations: np.ndarray) -> np.ndarray:
    """The design mask broadcast to the observations' shape ``[n, T, d]``."""
    mask = np.asarray(mask, dtype=bool)
    return mask[..., None] if mask.ndim == observations.ndim - 1 else mask


def failed_rows(observations: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Rows ``[n]`` with a non-finite observed value (or one that overflows float32, the store's precision)."""
    bad = ~(np.abs(observations) <= _FLOAT32_MAX)  # also catches NaN
    bad &= _observed_mask(mask, observations)
    return bad.reshape(bad.shape[0], -1).any(axis=1)


def _fit_time_axis(array: np.ndarray, n_time: int, what: str) -> np.ndarray:
    """Zero-pad axis 1 of a redrawn per-time-point array to the batch's ``n_time``."""
    if array.ndim < 2 or array.shape[1] == n_time:
        return array
    if array.shape[1] > n_time:
        raise SimulationError(f"{what}: redrawn rows have {array.shape[1]} time points, the batch {n_time}; "
                              f"pad designs to the model's max_time_points")
    width = [(0, 0)] * array.ndim
    width[1] = (0, n_time - array.shape[1])
    return np.pad(array, width)


def simulate_batch_counted(model: IndividualModel, n: int, rng: np.random.Generator,
                           max_rounds: int = DEFAULT_MAX_ROUNDS) -> tuple[np.ndarray, np.ndarray, Design, int]:
    """Like :func:`simulate_batch`, also returning how many simulations failed and were redrawn."""
    params = model.prior.sample(n, rng)
    design = {key: np.array(value) for key, value in model.sample_design(n, rng).items()}
    observations = np.array(model.simulate(params, design, rng))
    n_time = observations.shape[1]
    bad = failed_rows(observations, design["mask"])
    n_failed = 0
    rounds = 0
    while bad.any():
        idx = np.flatnonzero(bad)
        if rounds == max_rounds:
            raise SimulationError(
                f"{model.name}: {idx.size} of {n} simulations still give non-finite values after {max_rounds} redraw "
                f"rounds ({n_failed} failures in all); the prior reaches a region where the simulator breaks down")
        rounds += 1
        n_failed += idx.size
        new_params = model.prior.sample(idx.size, rng)
        new_design = model.sample_design(idx.size, rng)
        new_obs = _fit_time_axis(np.asarray(model.simulate(new_params, new_design, rng)), n_time, "observations")
        params[idx] = new_params
        observations[idx] = new_obs
        for key, value in new_design.items():
            width = design[key].shape[1] if design[key].ndim > 1 else 0
            design[key][idx] = _fit_time_axis(np.asarray(value), width, f"design[{key!r}]")
        bad[:] = False
        bad[idx[failed_rows(new_obs, new_design["mask"])]] = True
    # masked entries are 0 by contract, whatever the simulator left there
    observations[~np.broadcast_to(_observed_mask(design["mask"], observations), observations.shape)] = 0.0
    if n_failed:
        logger.debug("%s: %d of %d simulations failed and were redrawn (%d rounds)", model.name, n_failed, n, rounds)
    return params, observations, design, n_failed


def simulate_batch(model: IndividualModel, n: int, rng: np.random.Generator,
                   max_rounds: int = DEFAULT_MAX_ROUNDS) -> tuple[np.ndarray, np.ndarray, Design]:
    """Draw ``n`` parameter vectors from the prior and designs, simulate; rows with non-finite observed values are
    redrawn with fresh parameters and designs (up to ``max_rounds`` rounds), so every returned row is usable."""
    params, observations, design, _ = simulate_batch_counted(model, n, rng, max_rounds)
    return params, observations, design


@dataclass
class ChunkResult:
    """One store chunk, ready for :meth:`StoreWriter.write_chunk` (observations already float32)."""

    index: int
    params: np.ndarray
    observations: np.ndarray
    design: Design
    n_failed: int


def compute_chunk(model: IndividualModel, seed: int, chunk_index: int, n_total: int, chunk_size: int,
                  max_rounds: int = DEFAULT_MAX_ROUNDS) -> ChunkResult:
    """Simulate chunk ``chunk_index`` from its own RNG ``default_rng([seed, chunk_index])``: same seed, same chunk,
    wherever and in whatever order it runs."""
    start, stop = chunk_bounds(chunk_index, n_total, chunk_size)
    rng = np.random.default_rng([int(seed), int(chunk_index)])
    params, observations, design, n_failed = simulate_batch_counted(model, stop - start, rng, max_rounds)
    return ChunkResult(chunk_index, params, observations.astype(np.float32), design, n_failed)


def available_cores() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _init_worker(numba_threads: int) -> None:
    """Process-pool initializer: split the cores between workers instead of every worker using all of them."""
    import numba

    numba.set_num_threads(max(1, min(numba_threads, numba.config.NUMBA_NUM_THREADS)))


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, a plain ``kill`` (SIGTERM) stops the run like Ctrl-C, so the partial file is closed cleanly."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _check_existing(path: Path, model: IndividualModel, n: int, seed: int, chunk_size: int) -> bool:
    """True if ``path`` already holds this exact simulation; raise if it holds a different one."""
    with SimulationStore(path) as store:
        meta = store.meta
        have = (meta["model_name"], str(meta["model_version"]), meta["seed"], len(store), meta["chunk_size"])
    want = (model.name, str(model.version), int(seed), int(n), int(chunk_size))
    if have == want:
        return True
    raise StoreError(f"{path} already exists with other settings (model, version, seed, N, chunk size = {have}; this "
                     f"run asks {want}); delete it or pass overwrite=True")


def _open_writer(path: Path, model: IndividualModel, n: int, chunk_size: int, seed: int,
                 overwrite: bool) -> StoreWriter:
    """Create or resume the partial file; with ``overwrite`` a partial file from other settings is discarded."""
    try:
        return StoreWriter(path, model, n, chunk_size, seed)
    except StoreError:
        if not overwrite:
            raise
        logger.warning("discarding %s (other settings or unreadable) and starting over", partial_path(path))
        partial_path(path).unlink()
        return StoreWriter(path, model, n, chunk_size, seed)


@dataclass(frozen=True)
class ChunkJob:
    """What every chunk of one store shares (model, seed, layout): an executor computes ``compute_chunk(*job.args(c))``
    for each pending chunk ``c``."""

    model: IndividualModel
    seed: int
    n_total: int
    chunk_size: int
    max_rounds: int = DEFAULT_MAX_ROUNDS

    def args(self, chunk_index: int) -> tuple:
        """The positional arguments of :func:`compute_chunk` for chunk ``chunk_index``."""
        return (self.model, self.seed, int(chunk_index), self.n_total, self.chunk_size, self.max_rounds)


#: called in the calling thread with each finished chunk, in whatever order chunks finish
WriteChunk = Callable[[ChunkResult], None]


class ChunkExecutor:
    """Where a store's chunks are computed. :func:`simulate_to_store` enters it (start workers, connect) before it
    touches the store, calls :meth:`run` once and exits it; only the calling process ever writes the store."""

    #: for the log line, e.g. "1 process"
    description: str = "1 process"

    def __enter__(self) -> ChunkExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def run(self, job: ChunkJob, pending: list[int], write: WriteChunk) -> None:
        """Compute every chunk in ``pending`` and pass each result to ``write`` (in this thread) as it arrives."""
        raise NotImplementedError


class SerialExecutor(ChunkExecutor):
    """Chunks one after the other in this process (numba threads on every core)."""

    description = "1 process"

    def run(self, job: ChunkJob, pending: list[int], write: WriteChunk) -> None:
        for c in pending:
            write(compute_chunk(*job.args(c)))


class ProcessPoolChunkExecutor(ChunkExecutor):
    """Chunks in ``n_workers`` spawned processes (at most two in flight each), the cores split between them."""

    def __init__(self, n_workers: int) -> None:
        self.n_workers = max(1, int(n_workers))
        self.description = f"{self.n_workers} process{'' if self.n_workers == 1 else 'es'}"

    def run(self, job: ChunkJob, pending: list[int], write: WriteChunk) -> None:
        threads = max(1, available_cores() // self.n_workers)
        queue = list(reversed(pending))
        in_flight: set[Future] = set()
        with ProcessPoolExecutor(self.n_workers, mp_context=get_context("spawn"), initializer=_init_worker,
                                 initargs=(threads,)) as pool:
            try:
                while queue or in_flight:
                    while queue and len(in_flight) < 2 * self.n_workers:
                        in_flight.add(pool.submit(compute_chunk, *job.args(queue.pop())))
                    finished, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
                    for future in finished:
                        write(future.result())
            except BaseException:
                for future in in_flight:
                    future.cancel()
                pool.shutdown(wait=False, cancel_futures=True)
                raise


def simulate_to_store(model: IndividualModel | str, n: int, path: str | os.PathLike, seed: int = 0,
                      chunk_size: int = DEFAULT_CHUNK_SIZE, workers: int | None = None, progress: bool = True,
                      overwrite: bool = False, max_rounds: int = DEFAULT_MAX_ROUNDS,
                      executor: ChunkExecutor | None = None) -> Path:
    """Simulate ``n`` individuals from the model's prior into the HDF5 store at ``path`` and return the path.

    Resumes ``<path>.partial`` if an earlier run was interrupted; returns at once if ``path`` already holds the
    same simulation. ``workers``: processes over chunks (None or 1: one process, numba threads on every core; more
    runs spawned processes, so a calling script needs the ``if __name__ == "__main__"`` guard). ``executor``: any other
    :class:`ChunkExecutor` instead (e.g. :class:`~amortized_nlme.simulation.distributed.DaskExecutor`); not together
    with ``workers``. Content never depends on where chunks run, only on model, ``seed``, ``n`` and ``chunk_size``.
    """
    if isinstance(model, str):
        from simulators import get_model

        model = get_model(model)
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if executor is not None and workers is not None:
        raise ValueError("pass either workers (a local process pool) or an executor, not both")
    path = Path(path)
    if path.exists() and not overwrite and _check_existing(path, model, n, seed, chunk_size):
        logger.info("%s already holds %d %s simulations with seed %d; nothing to do", path, n, model.name, seed)
        return path
    if executor is None:
        n_workers = 1 if workers is None else max(1, int(workers))
        executor = SerialExecutor() if n_workers == 1 else ProcessPoolChunkExecutor(n_workers)
    job = ChunkJob(model, int(seed), int(n), int(chunk_size), int(max_rounds))

    # the executor starts (or connects) before the store is touched: a cluster that cannot be reached leaves no file
    with _sigterm_as_interrupt(), executor:
        writer = _open_writer(path, model, n, chunk_size, seed, overwrite)
        pending = writer.pending_chunks()
        rows_before = writer.rows_done()
        logger.info("simulating %d %s simulations (seed %d, %d chunks of %d, %d to do, %s) into %s",
                    n, model.name, seed, writer.n_chunks, chunk_size, len(pending), executor.description, writer.path)
        bar = tqdm(total=n, initial=rows_before, unit="sim", unit_scale=True, file=sys.stderr, disable=not progress,
                   desc=f"simulate {model.name}", dynamic_ncols=True, smoothing=0.1)
        t0 = time.perf_counter()

        def write(result: ChunkResult) -> None:
            writer.write_chunk(result.index, result.params, result.observations, result.design, result.n_failed)
            bar.update(result.params.shape[0])
            bar.set_postfix(failed=writer.n_failed, refresh=False)

        try:
            executor.run(job, pending, write)
            n_failed = writer.n_failed
        except BaseException as err:
            writer.close()
            if isinstance(err, KeyboardInterrupt):
                logger.warning("interrupted: %d of %d chunks are saved in %s; run the same command again to resume",
                               int(writer.done.sum()), writer.n_chunks, writer.path)
            raise
        finally:
            bar.close()
        final = writer.finalize()
        elapsed = time.perf_counter() - t0
    new_rows = n - rows_before
    logger.info("%s: %d simulations (%d new) in %.1f s (%.0f sims/s); %d failed simulations redrawn (%.3g%%) -> %s",
                model.name, n, new_rows, elapsed, new_rows / max(elapsed, 1e-9), n_failed,
                100.0 * n_failed / n, final)
    return final
