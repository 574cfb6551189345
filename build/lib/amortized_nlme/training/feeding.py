"""Feeding the training loop: fresh simulations every batch (online), blocks streamed from the HDF5 store
(offline), and a fixed validation set, each as a Keras ``PyDataset`` of adapted batches."""

from __future__ import annotations

import numpy as np

from amortized_nlme.model import Design, IndividualModel, take_design
from amortized_nlme.posterior.estimator import PARAM_KEY, SUMMARY_KEY
from amortized_nlme.simulation import simulate_batch_counted


def _keras():
    import keras

    return keras


def batch_dict(model: IndividualModel, params: np.ndarray, observations: np.ndarray, design: Design) -> dict:
    shift = model.parameter_shift(observations, design)
    target = params if shift is None else params + shift  # the normalised parameters the network learns
    return {PARAM_KEY: target, SUMMARY_KEY: model.encode(observations, design)}


class TrainingPriorTally:
    """What online training actually trained on: simulations drawn, failed (non-finite, redrawn) and the moments and
    range of the accepted parameters. Redrawing failures truncates the prior wherever the simulator breaks down;
    these numbers say where the estimator was trained (recorded in ``meta.json``)."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = tuple(names)
        k = len(names)
        self.n_accepted = 0
        self.n_failed = 0
        self._sum = np.zeros(k)
        self._sumsq = np.zeros(k)
        self._min = np.full(k, np.inf)
        self._max = np.full(k, -np.inf)
        self._counted: set = set()  # keys of the batches counted in the current epoch

    def add(self, params: np.ndarray, n_failed: int, key: tuple[int, int] | None = None) -> None:
        """Count one batch. ``key`` (epoch, batch index) names the batch: a batch fetched again (the same key gives
        the same simulations) is counted once; keys of earlier epochs are forgotten when a new epoch begins."""
        if key is not None:
            if key in self._counted:
                return
            if any(k[0] != key[0] for k in self._counted):
                self._counted.clear()
            self._counted.add(key)
        self.n_accepted += params.shape[0]
        self.n_failed += int(n_failed)
        self._sum += params.sum(axis=0)
        self._sumsq += (params * params).sum(axis=0)
        self._min = np.minimum(self._min, params.min(axis=0))
        self._max = np.maximum(self._max, params.max(axis=0))

    def state(self) -> dict:
        """Plain numbers (resumable: :meth:`restore` takes them back)."""
        return {"n_accepted": self.n_accepted, "n_failed": self.n_failed, "sum": self._sum.tolist(),
                "sumsq": self._sumsq.tolist(), "min": self._min.tolist(), "max": self._max.tolist()}

    def restore(self, state: dict | None) -> None:
        if not state:
            return
        self.n_accepted, self.n_failed = int(state["n_accepted"]), int(state["n_failed"])
        self._sum, self._sumsq = np.asarray(state["sum"], float), np.asarray(state["sumsq"], float)
        self._min, self._max = np.asarray(state["min"], float), np.asarray(state["max"], float)

    def summary(self, prior) -> dict:
        """Failure rate and the accepted parameters' mean/sd/range next to the nominal prior's, per parameter."""
        n = max(self.n_accepted, 1)
        mean = self._sum / n
        sd = np.sqrt(np.maximum(self._sumsq / n - mean * mean, 0.0))
        drawn = self.n_accepted + self.n_failed
        return {
            "simulations_drawn": drawn,
            "simulations_failed_and_redrawn": self.n_failed,
            "failure_fraction": self.n_failed / drawn if drawn else 0.0,
            "accepted_parameters": {
                name: {"mean": float(mean[i]), "sd": float(sd[i]), "min": float(self._min[i]),
                       "max": float(self._max[i]), "prior_mean": float(prior.mean[i]),
                       "prior_sd": float(prior.std[i])}
                for i, name in enumerate(self.names)},
            "note": "failed simulations are redrawn from the prior, so the training prior is the nominal prior "
                    "truncated where the simulator fails; compare the accepted moments with the prior's",
        }


def online_dataset(model: IndividualModel, batch_size: int, steps: int, seed: int, adapter,
                   tally: TrainingPriorTally | None = None):
    """Fresh simulations for every batch (cheap simulators): no epoch ever sees the same data twice. Every batch's
    accepted parameters and failed simulations go into ``tally``."""
    keras = _keras()

    class OnlineSimulations(keras.utils.PyDataset):
        def __init__(self) -> None:
            super().__init__()
            self.epoch = 0
            self.tally = tally  # None while fetching a batch that is not trained on (building the networks)

        def __len__(self) -> int:
            return steps

        def __getitem__(self, item: int) -> dict:
            rng = np.random.default_rng([seed, self.epoch, item])
            params, obs, design, n_failed = simulate_batch_counted(model, batch_size, rng)
            if self.tally is not None:
                self.tally.add(params, n_failed, key=(self.epoch, int(item)))
            return adapter(batch_dict(model, params, obs, design))

        def on_epoch_end(self) -> None:
            self.epoch += 1

    return OnlineSimulations()


def store_dataset(model: IndividualModel, store, n_train: int, batch_size: int, seed: int, adapter,
                  block_size: int = 32768):
    """Batches from the HDF5 store's first ``n_train`` rows: contiguous blocks are read in a random order each epoch
    and shuffled in memory (random single-row reads from HDF5 are far too slow); the store is never loaded whole."""
    keras = _keras()
    n_blocks = max(1, -(-n_train // block_size))

    class StoredSimulations(keras.utils.PyDataset):
        def __init__(self) -> None:
            super().__init__()
            self.epoch = 0
            self._cached: tuple[int, dict] | None = None
            self._plan()

        def _plan(self) -> None:
            rng = np.random.default_rng([seed, self.epoch])
            self.block_order = rng.permutation(n_blocks)
            self.batches = []  # (block, start, stop) within the shuffled block
            for b in self.block_order:
                rows = min(block_size, n_train - b * block_size)
                self.batches += [(int(b), s, s + batch_size) for s in range(0, rows - batch_size + 1, batch_size)]

        def _block(self, b: int) -> dict:
            if self._cached is None or self._cached[0] != b:
                start = b * block_size
                params, obs, design = store.read(start, min(start + block_size, n_train))
                perm = np.random.default_rng([seed, self.epoch, b]).permutation(params.shape[0])
                data = batch_dict(model, params[perm], obs[perm], take_design(design, perm))
                self._cached = (b, data)
            return self._cached[1]

        def __len__(self) -> int:
            return max(1, len(self.batches))

        def __getitem__(self, item: int) -> dict:
            b, start, stop = self.batches[item]
            data = self._block(b)
            return adapter({k: v[start:stop] for k, v in data.items()})

        def on_epoch_end(self) -> None:
            self.epoch += 1
            self._plan()

    return StoredSimulations()


def fixed_dataset(model: IndividualModel, params: np.ndarray, obs: np.ndarray, design: Design, batch_size: int,
                   adapter):
    keras = _keras()
    data = adapter(batch_dict(model, params, obs, design))
    n = params.shape[0]

    class Fixed(keras.utils.PyDataset):
        def __len__(self) -> int:
            return max(1, n // batch_size)

        def __getitem__(self, item: int) -> dict:
            sl = slice(item * batch_size, (item + 1) * batch_size)
            return {k: v[sl] for k, v in data.items()}

    return Fixed()
