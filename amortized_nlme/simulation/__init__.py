"""Stage 1, simulate: draw parameters and designs from an individual model's prior, simulate, and write the
prior-predictive data to a resumable HDF5 store.

Public API: :func:`simulate_batch` (one clean batch, also used by online training), :func:`simulate_to_store` (the
stage, resumable), :class:`SimulationStore` (reading a store), :class:`StoreWriter` and :func:`compute_chunk`
(chunks from independent workers), :class:`ChunkExecutor` (where chunks run), :class:`DaskExecutor` and
:func:`simulate_on_dask` (chunks on a Dask cluster; needs the ``dask`` extra).
"""

from amortized_nlme.errors import DaskError, SimulationError, StoreError
from amortized_nlme.simulation.distributed import DaskExecutor, simulate_on_dask
from amortized_nlme.simulation.simulate import (
    ChunkExecutor,
    compute_chunk,
    simulate_batch,
    simulate_batch_counted,
    simulate_to_store,
)
from amortized_nlme.simulation.store import SimulationStore, StoreWriter

__all__ = ["ChunkExecutor", "DaskError", "DaskExecutor", "SimulationError", "SimulationStore", "StoreError",
           "StoreWriter", "compute_chunk", "simulate_batch", "simulate_batch_counted", "simulate_on_dask",
           "simulate_to_store"]
