"""Simulate a store's chunks on a Dask cluster; this process stays the only writer of the store.

``DaskExecutor("local")`` or ``DaskExecutor("local:N")`` starts a :class:`distributed.LocalCluster` of ``N`` (default 2)
single-threaded worker processes on this machine; any other address (``tcp://host:8786``) connects to a running
scheduler (``dask scheduler`` and ``dask worker <address>``; every worker needs this package). Workers compute
:func:`~amortized_nlme.simulation.simulate.compute_chunk` and send the chunk back; :func:`simulate_to_store` writes it,
so resume, seeding by chunk index, redraws of failed simulations and the atomic final rename are the same as without
Dask, and so are the bytes. Dask is imported only when an executor is entered (the ``dask`` extra).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import uuid
from typing import TYPE_CHECKING, Any

from amortized_nlme.errors import ConfigError, DaskError
from amortized_nlme.simulation.simulate import (
    ChunkExecutor,
    ChunkJob,
    ChunkResult,
    WriteChunk,
    available_cores,
    compute_chunk,
    simulate_to_store,
)

if TYPE_CHECKING:
    from pathlib import Path

    from distributed import Client

    from amortized_nlme.model import IndividualModel

logger = logging.getLogger(__name__)

#: workers of ``local`` without a count
DEFAULT_LOCAL_WORKERS = 2
#: seconds to wait for a scheduler before giving up (distributed's own default is 30 s)
DEFAULT_CONNECT_TIMEOUT = 10.0
INSTALL_HINT = "pip install 'amortized-nlme[dask]' (or pip install 'dask[distributed]')"


def parse_dask_address(address: str) -> tuple[str | None, int]:
    """``"local"`` / ``"local:N"`` -> ``(None, N)``; a scheduler address -> ``(address, 0)``."""
    text = address.strip()
    if not text:
        raise ConfigError("empty Dask address; use local, local:N or a scheduler address such as tcp://host:8786")
    if text != "local" and not text.startswith("local:"):
        return text, 0
    count = text.partition(":")[2] if text != "local" else str(DEFAULT_LOCAL_WORKERS)
    if not count.isdigit() or int(count) < 1:
        raise ConfigError(f"Dask address {address!r}: the number of local workers must be a positive integer "
                          f"(local:N)")
    return None, int(count)


def _import_distributed(what: str) -> Any:
    """The ``distributed`` module, or a :class:`DaskError` that says which extra to install."""
    try:
        import distributed
    except ImportError as err:
        raise DaskError(f"cannot simulate on Dask ({what}): dask.distributed is not installed ({err}); install the "
                        f"'dask' extra: {INSTALL_HINT}") from None
    return distributed


def _one_line(err: BaseException) -> str:
    """An exception's text on one line (distributed's messages span several)."""
    return " ".join(str(err).split())


def _compute_chunk_on_worker(numba_threads: int | None, *args: Any) -> ChunkResult:
    """:func:`compute_chunk` in a worker's task thread, with numba limited to ``numba_threads`` threads (numba's
    setting is per thread, so it is made here rather than once per worker)."""
    if numba_threads:
        import numba

        numba.set_num_threads(max(1, min(int(numba_threads), numba.config.NUMBA_NUM_THREADS)))
    return compute_chunk(*args)


def _versions() -> dict[str, str]:
    """Versions that decide a chunk's bytes: a worker with other versions may simulate other numbers."""
    import numba
    import numpy

    from amortized_nlme import __version__

    return {"amortized-nlme": __version__, "numpy": numpy.__version__, "numba": numba.__version__}


class DaskExecutor(ChunkExecutor):
    """Chunks on Dask workers, at most ``in_flight_per_thread`` per worker thread at a time (bounded memory).

    ``address``: ``"local"``, ``"local:N"``, a scheduler address, or a connected :class:`distributed.Client` (used as
    is and left open). ``numba_threads``: numba threads per task (default: the cores split between local workers;
    for a remote cluster the workers' own setting, e.g. ``NUMBA_NUM_THREADS``).
    """

    def __init__(self, address: str | Client = "local", connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 numba_threads: int | None = None, in_flight_per_thread: int = 2) -> None:
        self._given_client: Client | None = None
        if isinstance(address, str):
            self.address, self.n_local = parse_dask_address(address)
            self.spec = address
        else:
            self._given_client, self.address, self.n_local = address, None, 0
            self.spec = f"client of {getattr(address.scheduler, 'address', 'a Dask scheduler')}"
        if not connect_timeout > 0:
            raise ConfigError(f"Dask connect timeout must be positive, got {connect_timeout!r}")
        self.connect_timeout = float(connect_timeout)
        if numba_threads is None and self.n_local:
            numba_threads = max(1, available_cores() // self.n_local)
        self.numba_threads = numba_threads
        self.in_flight_per_thread = max(1, int(in_flight_per_thread))
        self.client: Client | None = None
        self._cluster: Any = None
        self.description = f"Dask {self.spec}"

    # -- connecting ----------------------------------------------------------------------------------------------
    def __enter__(self) -> DaskExecutor:
        if self._given_client is not None:
            self.client = self._given_client
        else:
            distributed = _import_distributed(self.spec)
            if self.n_local:
                self._start_local(distributed)
            else:
                self._connect(distributed)
        try:
            self._check_workers()
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._close()

    def _start_local(self, distributed: Any) -> None:
        """A LocalCluster of single-threaded worker processes (its HTTP server on a free port: runs side by side)."""
        try:
            self._cluster = distributed.LocalCluster(n_workers=self.n_local, threads_per_worker=1, processes=True,
                                                     dashboard_address=":0")
            self.client = distributed.Client(self._cluster, set_as_default=False)
        except Exception as err:  # noqa: BLE001 - whatever kept the cluster from starting, say so in one line
            self._close()
            raise DaskError(f"cannot start a local Dask cluster of {self.n_local} workers ({type(err).__name__}: "
                            f"{_one_line(err)})") from None

    def _connect(self, distributed: Any) -> None:
        """Connect to the scheduler within ``connect_timeout`` seconds."""
        try:
            self.client = distributed.Client(self.address, timeout=self.connect_timeout, set_as_default=False)
        except (OSError, TimeoutError, ValueError) as err:
            raise DaskError(f"cannot reach the Dask scheduler at {self.address} within {self.connect_timeout:g} s "
                            f"({_one_line(err)}); start one with `dask scheduler` and workers with "
                            f"`dask worker {self.address}`, or simulate on this machine with --dask local[:N]") from None

    def _check_workers(self) -> None:
        """Every connected worker must import this package; other versions only warn (bytes may differ)."""
        client = self._require_client()
        try:
            versions = client.run(_versions)
        except Exception as err:  # noqa: BLE001 - typically ModuleNotFoundError raised on a worker
            raise DaskError(f"the Dask workers of {self.spec} cannot run amortized-nlme ({type(err).__name__}: "
                            f"{_one_line(err)}); install the same version of the package on every worker") from None
        mine = _versions()
        for worker, theirs in sorted(versions.items()):
            if theirs != mine:
                logger.warning("Dask worker %s has %s, this process %s: its chunks may differ from a local run",
                               worker, theirs, mine)
        threads = sum(client.nthreads().values())
        where = "local cluster" if self.n_local else f"scheduler {client.scheduler.address}"
        self.description = f"Dask {where}, {len(versions)} workers, {threads} threads"
        if not versions:
            logger.warning("the Dask scheduler %s has no workers yet; chunks wait until workers join", self.spec)
        link = getattr(client, "dashboard_link", None)
        if link:  # the page only works with bokeh installed on the scheduler's side
            level = logging.INFO if importlib.util.find_spec("bokeh") or not self.n_local else logging.DEBUG
            logger.log(level, "Dask dashboard: %s", link)

    def _require_client(self) -> Client:
        if self.client is None:
            raise RuntimeError("DaskExecutor used outside its with-block")
        return self.client

    def _close(self) -> None:
        """Close what this executor opened (a client it was given stays open)."""
        if self._given_client is None:
            for thing in (self.client, self._cluster):
                if thing is not None:
                    with contextlib.suppress(Exception):
                        thing.close()
        self.client = None
        self._cluster = None

    # -- running -------------------------------------------------------------------------------------------------
    def run(self, job: ChunkJob, pending: list[int], write: WriteChunk) -> None:
        distributed = _import_distributed(self.spec)
        client = self._require_client()
        token = uuid.uuid4().hex[:8]
        queue = list(reversed(pending))
        chunk_of: dict[Any, int] = {}  # future key -> chunk index, for the futures in flight
        futures: dict[Any, Any] = {}
        completed = distributed.as_completed(loop=client.loop)

        def top_up() -> None:
            # workers may join or leave a running cluster: the bound follows the threads there are now
            try:
                limit = max(2, self.in_flight_per_thread * sum(client.nthreads().values()))
                while queue and len(chunk_of) < limit:
                    c = queue.pop()
                    future = client.submit(_compute_chunk_on_worker, self.numba_threads, *job.args(c),
                                           key=f"simulate-{job.model.name}-{token}-chunk-{c}", pure=False)
                    chunk_of[future.key], futures[future.key] = c, future
                    completed.add(future)
            except (distributed.CancelledError, OSError, TimeoutError) as err:
                raise self._lost(err, "while submitting chunks") from None

        try:
            top_up()
            for future in completed:
                c = chunk_of.pop(future.key)
                del futures[future.key]
                result = self._result(distributed, future, c)
                future.release()
                write(result)
                top_up()
        except BaseException:
            completed.clear()
            with contextlib.suppress(Exception):
                client.cancel(list(futures.values()))
            raise

    def _result(self, distributed: Any, future: Any, chunk: int) -> ChunkResult:
        """The chunk's result; a dead worker or a lost scheduler becomes a :class:`DaskError` (errors raised by the
        simulation itself come through as they are)."""
        try:
            return future.result()
        except distributed.KilledWorker as err:
            raise DaskError(f"Dask workers died while simulating chunk {chunk} ({_one_line(err)}); the chunks written "
                            f"so far are saved: run the same command again to resume") from None
        except (distributed.CancelledError, OSError, TimeoutError) as err:
            if future.status == "error":  # raised by the simulation on the worker
                raise
            raise self._lost(err, f"while simulating chunk {chunk}") from None

    def _lost(self, err: BaseException, when: str) -> DaskError:
        """The error for a scheduler that went away (connection closed or refused, futures cancelled with the
        client)."""
        return DaskError(f"lost the Dask scheduler ({self.spec}) {when} ({type(err).__name__}: {_one_line(err)}); the "
                         f"chunks written so far are saved: run the same command again to resume")


def simulate_on_dask(model: IndividualModel | str, n: int, path: str | Path, address: str | Client = "local",
                     connect_timeout: float = DEFAULT_CONNECT_TIMEOUT, **kwargs: Any) -> Path:
    """:func:`simulate_to_store` with its chunks on Dask (``address`` as for :class:`DaskExecutor`); same store,
    same bytes."""
    return simulate_to_store(model, n, path, executor=DaskExecutor(address, connect_timeout=connect_timeout), **kwargs)
