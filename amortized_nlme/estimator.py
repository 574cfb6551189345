"""The training stage: a BayesFlow 2 approximator q(phi | y) built from a workflow config, trained with
checkpoint/resume, saved as ``trained_models/<model>/`` and loaded back (under JAX or TensorFlow) for inference.

The parameters are standardized by the prior and the observations go through the model's own encoder inside the
estimator, so training and inference use exactly the same transforms.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")

import numpy as np  # noqa: E402

from amortized_nlme.config import NetworkConfig, TrainingConfig, WorkflowConfig  # noqa: E402
from amortized_nlme.files import write_json_atomic  # noqa: E402
from amortized_nlme.model import Design, IndividualModel, NormalPrior, take_design  # noqa: E402

logger = logging.getLogger(__name__)

APPROXIMATOR_FILE = "approximator.keras"
META_FILE = "meta.json"
CHECKPOINT_DIR = "checkpoint"
PARAM_KEY = "phi"
SUMMARY_KEY = "encoded"


class EstimatorError(RuntimeError):
    """An estimator cannot be built, trained, loaded or used as asked (message says why)."""


def _keras():
    import keras

    return keras


def _bf():
    import bayesflow as bf

    return bf


# ----------------------------------------------------------------------------------------------------------------
# construction


def make_adapter(prior: NormalPrior):
    """Adapter: float32, parameters standardized by the prior (fixed, exact, invertible), encoded series as
    summary variables. Its log-Jacobian makes ``log_prob`` a density of the unstandardized log-parameters."""
    bf = _bf()
    return (
        bf.Adapter()
        .convert_dtype("float64", "float32")
        .standardize(PARAM_KEY, mean=prior.mean.tolist(), std=prior.std.tolist())
        .rename(PARAM_KEY, "inference_variables")
        .rename(SUMMARY_KEY, "summary_variables")
        .keep(["inference_variables", "summary_variables"])
    )


def build_summary_network(cfg: NetworkConfig):
    """The summary network named by ``cfg.summary``."""
    bf = _bf()
    if cfg.summary == "time_series":
        return bf.networks.TimeSeriesNetwork(
            summary_dim=cfg.summary_dim, filters=tuple(cfg.filters), kernel_sizes=tuple(cfg.kernel_sizes),
            strides=tuple(cfg.strides), recurrent_type=cfg.recurrent_type, recurrent_dim=cfg.recurrent_dim,
            bidirectional=cfg.bidirectional, skip_steps=cfg.skip_steps, dropout=cfg.dropout)
    if cfg.summary == "lstm":
        return bf.networks.RecurrentNetwork(
            summary_dim=cfg.summary_dim, hidden_dim=(cfg.recurrent_dim,), recurrent_type="lstm",
            bidirectional=cfg.bidirectional, dropout=cfg.dropout)
    if cfg.summary == "transformer":
        return bf.networks.TimeSeriesTransformer(
            summary_dim=cfg.summary_dim, embed_dims=(cfg.transformer_dim,) * cfg.transformer_layers,
            num_heads=(cfg.transformer_heads,) * cfg.transformer_layers,
            mlp_depths=(2,) * cfg.transformer_layers, mlp_widths=(cfg.transformer_dim * 2,) * cfg.transformer_layers,
            dropout=cfg.dropout)
    raise EstimatorError(f"unknown summary network {cfg.summary!r}: use 'time_series', 'lstm' or 'transformer'")


def build_approximator(model: IndividualModel, cfg: NetworkConfig):
    """A BayesFlow ``BasicEstimator``: summary network + coupling flow, no running-moment standardization."""
    bf = _bf()
    flow = bf.networks.CouplingFlow(depth=cfg.flow_depth, transform=cfg.flow_transform,
                                    subnet_kwargs={"widths": tuple(cfg.flow_widths)})
    return bf.estimators.BasicEstimator(inference_network=flow, summary_network=build_summary_network(cfg),
                                        adapter=make_adapter(model.prior), standardize=None)


# ----------------------------------------------------------------------------------------------------------------
# data feeding


def _batch_dict(model: IndividualModel, params: np.ndarray, observations: np.ndarray, design: Design) -> dict:
    return {PARAM_KEY: params, SUMMARY_KEY: model.encode(observations, design)}


def _make_online_dataset(model: IndividualModel, batch_size: int, steps: int, seed: int, adapter):
    """Fresh simulations for every batch (cheap simulators): no epoch ever sees the same data twice."""
    keras = _keras()
    from amortized_nlme.simulate import simulate_batch

    class OnlineSimulations(keras.utils.PyDataset):
        def __init__(self) -> None:
            super().__init__()
            self.epoch = 0

        def __len__(self) -> int:
            return steps

        def __getitem__(self, item: int) -> dict:
            rng = np.random.default_rng([seed, self.epoch, item])
            params, obs, design = simulate_batch(model, batch_size, rng)
            return adapter(_batch_dict(model, params, obs, design))

        def on_epoch_end(self) -> None:
            self.epoch += 1

    return OnlineSimulations()


def _make_store_dataset(model: IndividualModel, store, n_train: int, batch_size: int, seed: int, adapter,
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
                data = _batch_dict(model, params[perm], obs[perm], take_design(design, perm))
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


def _fixed_dataset(model: IndividualModel, params: np.ndarray, obs: np.ndarray, design: Design, batch_size: int,
                   adapter):
    keras = _keras()
    data = adapter(_batch_dict(model, params, obs, design))
    n = params.shape[0]

    class Fixed(keras.utils.PyDataset):
        def __len__(self) -> int:
            return max(1, n // batch_size)

        def __getitem__(self, item: int) -> dict:
            sl = slice(item * batch_size, (item + 1) * batch_size)
            return {k: v[sl] for k, v in data.items()}

    return Fixed()


# ----------------------------------------------------------------------------------------------------------------
# training with checkpoints


def _make_checkpoint_callback(ckpt_dir: Path, state: dict, patience: int, deadline: float | None,
                              progress: Callable[[dict], None] | None):
    """Per epoch: save the whole approximator (optimizer included) atomically, track the best validation loss,
    stop early on a plateau or when the time budget is spent."""
    keras = _keras()

    class Checkpoint(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            logs = {k: float(v) for k, v in (logs or {}).items()}
            if not all(np.isfinite(v) for v in logs.values()):
                self.model.stop_training = True
                state["diverged"] = True
                logger.error("epoch %d: non-finite loss %s; stopping (resume restarts from the last checkpoint)",
                             epoch + 1, logs)
                return
            val = logs.get("val_loss", logs.get("loss"))
            state["history"].append({"epoch": epoch + 1, **logs})
            if val < state["best_val"]:
                state["best_val"] = val
                state["best_epoch"] = epoch + 1
                state["wait"] = 0
                tmp = ckpt_dir / "best.weights.h5.tmp.weights.h5"
                self.model.save_weights(tmp)
                os.replace(tmp, ckpt_dir / "best.weights.h5")
            else:
                state["wait"] += 1
            state["epoch"] = epoch + 1
            state["elapsed_s"] = state["elapsed_before_s"] + (time.time() - state["started"])
            tmp = ckpt_dir / "last.tmp.keras"
            self.model.save(tmp)
            os.replace(tmp, ckpt_dir / "last.keras")
            if state["wait"] >= patience:
                state["early_stopped"] = True
                self.model.stop_training = True
                logger.info("early stopping: validation loss has not improved for %d epochs", patience)
            write_json_atomic(ckpt_dir / "state.json", {k: v for k, v in state.items() if k != "started"})
            if progress:
                progress(state)
            if deadline is not None and time.time() > deadline and not self.model.stop_training:
                logger.info("time budget spent after epoch %d; run again to resume", epoch + 1)
                self.model.stop_training = True

    return Checkpoint()


def train(cfg: WorkflowConfig, model: IndividualModel, out_dir: str | os.PathLike, *, store_path: str | None = None,
          max_minutes: float | None = None, verbose: int = 2) -> bool:
    """Train (or resume training of) the estimator for ``model`` into ``out_dir``.

    Returns True when training is finished (all epochs, or early stopping) and the estimator has been exported;
    False when it stopped on the time budget (run again to resume from the checkpoint).
    """
    keras = _keras()
    out = Path(out_dir)
    ckpt_dir = out / CHECKPOINT_DIR
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tcfg: TrainingConfig = cfg.training
    keras.utils.set_random_seed(tcfg.seed)

    state_file = ckpt_dir / "state.json"
    resumed = state_file.exists() and (ckpt_dir / "last.keras").exists()
    if resumed:
        state = json.loads(state_file.read_text())
        if state.get("model") != model.identity() or state.get("config") != cfg.to_dict():
            raise EstimatorError(f"{ckpt_dir} holds a checkpoint of another model or configuration; "
                                 "remove it to start afresh")
        approximator = keras.saving.load_model(ckpt_dir / "last.keras")
        logger.info("resuming %s from epoch %d (best validation loss %.4f)", model.name, state["epoch"],
                    state["best_val"])
    else:
        state = {"model": model.identity(), "config": cfg.to_dict(), "epoch": 0, "best_val": float("inf"),
                 "best_epoch": 0, "wait": 0, "history": [], "elapsed_before_s": 0.0, "early_stopped": False,
                 "simulations_seen": 0}
        approximator = build_approximator(model, cfg.network)
        if tcfg.warm_start:
            state["warm_start"] = _warm_start(approximator, model, tcfg.warm_start)
        total_steps = tcfg.epochs * tcfg.steps_per_epoch
        schedule = keras.optimizers.schedules.CosineDecay(tcfg.learning_rate, decay_steps=total_steps, alpha=0.01)
        if tcfg.weight_decay > 0:
            optimizer = keras.optimizers.AdamW(schedule, weight_decay=tcfg.weight_decay, clipnorm=1.5)
        else:
            optimizer = keras.optimizers.Adam(schedule, clipnorm=1.5)
        approximator.compile(optimizer=optimizer)
    state["elapsed_before_s"] = float(state.get("elapsed_s", 0.0))
    state["started"] = time.time()
    state["diverged"] = False

    adapter = make_adapter(model.prior)
    from amortized_nlme.simulate import simulate_batch

    store = None
    if tcfg.mode == "online":
        train_ds = _make_online_dataset(model, tcfg.batch_size, tcfg.steps_per_epoch, tcfg.seed, adapter)
        train_ds.epoch = state["epoch"]
        val = simulate_batch(model, tcfg.validation_size, np.random.default_rng([tcfg.seed, 10**6]))
        val_ds = _fixed_dataset(model, *val, tcfg.batch_size, adapter)
        n_sim = None
    elif tcfg.mode == "offline":
        from amortized_nlme.store import SimulationStore

        if store_path is None:
            raise EstimatorError("offline training needs a simulation store (run `simulate` first)")
        store = SimulationStore(store_path, model)
        train_idx, val_idx = store.split(tcfg.validation_size)
        train_ds = _make_store_dataset(model, store, len(train_idx), tcfg.batch_size, tcfg.seed, adapter)
        train_ds.epoch = state["epoch"]
        train_ds._plan()
        val_ds = _fixed_dataset(model, *store.read(val_idx.start, val_idx.stop), tcfg.batch_size, adapter)
        n_sim = len(store)
    else:
        raise EstimatorError(f"unknown training mode {tcfg.mode!r}: use 'online' or 'offline'")

    deadline = None if max_minutes is None else time.time() + 60.0 * max_minutes
    steps = tcfg.steps_per_epoch if tcfg.mode == "online" else len(train_ds)

    def progress(st: dict) -> None:
        st["simulations_seen"] = st["epoch"] * steps * tcfg.batch_size
        last = st["history"][-1]
        print(f"[{model.name}] epoch {st['epoch']}/{tcfg.epochs}  loss {last.get('loss', float('nan')):.4f}  "
              f"val {last.get('val_loss', float('nan')):.4f}  best {st['best_val']:.4f}@{st['best_epoch']}  "
              f"{st['elapsed_s'] / 60:.1f} min", file=sys.stderr, flush=True)

    callback = _make_checkpoint_callback(ckpt_dir, state, tcfg.patience, deadline, progress)
    if state["epoch"] < tcfg.epochs and not state["early_stopped"]:
        approximator.fit(dataset=train_ds, validation_data=val_ds, epochs=tcfg.epochs, initial_epoch=state["epoch"],
                         steps_per_epoch=steps if tcfg.mode == "online" else None, callbacks=[callback],
                         verbose=verbose)
    if store is not None:
        store.close()
    if state.get("diverged"):
        raise EstimatorError("training diverged (non-finite loss); lower the learning rate or resume from the "
                             "last checkpoint")
    finished = state["epoch"] >= tcfg.epochs or state["early_stopped"]
    if not finished:
        return False
    approximator.load_weights(ckpt_dir / "best.weights.h5")
    export(approximator, model, cfg, out, state, n_simulations=n_sim)
    return True


def _warm_start(approximator, model: IndividualModel, folder: str) -> dict:
    """Initialise ``approximator`` with the weights of a trained estimator (same model and network); returns what
    the new estimator's metadata records about that first phase."""
    path = Path(folder) if Path(folder).is_absolute() else Path(__file__).resolve().parent.parent / folder
    source = TrainedEstimator.load(path, model)
    approximator.build_from_data(_first_batch(model, source.approximator))
    approximator.set_weights(source.approximator.get_weights())
    prev = source.meta.get("training", {})
    logger.info("warm start from %s (%s simulations seen)", path, prev.get("simulations_seen"))
    return {"from": str(folder), "file_sha256": source.sha256,
            **{k: prev.get(k) for k in ("simulations_seen", "train_time_s", "epochs", "best_val_loss", "device")},
            "workflow_training": source.meta.get("workflow", {}).get("training")}


def _first_batch(model: IndividualModel, approximator) -> dict:
    """A small adapted batch, to build a fresh approximator's variables before weights are copied in."""
    from amortized_nlme.simulate import simulate_batch

    params, obs, design = simulate_batch(model, 8, np.random.default_rng(0))
    adapted = approximator.adapter(_batch_dict(model, params, obs, design))
    return {k: _keras().ops.convert_to_tensor(v) for k, v in adapted.items()}


def export(approximator, model: IndividualModel, cfg: WorkflowConfig, out: Path, state: dict,
           n_simulations: int | None) -> None:
    """Write ``approximator.keras`` and ``meta.json`` (diagnostics are added by ``check``)."""
    import importlib.metadata as md

    keras = _keras()
    tmp = out / "approximator.tmp.keras"
    approximator.save(tmp)
    os.replace(tmp, out / APPROXIMATOR_FILE)
    versions = {}
    for pkg in ("amortized-nlme", "bayesflow", "keras", "jax", "numpy", "numba"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    seen = state["epoch"] * cfg.training.steps_per_epoch * cfg.training.batch_size
    warm = state.get("warm_start")
    meta = {
        "model": model.identity(),
        "param_names": list(model.param_names),
        "prior": model.prior.spec(),
        "encoder": {"function": f"{type(model).__module__}.{type(model).__name__}.encode",
                    "max_time_points": model.max_time_points, "obs_names": list(model.obs_names)},
        "workflow": cfg.to_dict(),
        "keras_backend": keras.backend.backend(),
        "package_versions": versions,
        "training": {
            "mode": cfg.training.mode,
            "simulations_in_store": n_simulations,
            "simulations_seen": seen + (warm or {}).get("simulations_seen", 0),
            "simulations_seen_this_phase": seen,
            "warm_start": warm,
            "epochs": state["epoch"],
            "best_epoch": state["best_epoch"],
            "best_val_loss": state["best_val"],
            "early_stopped": state["early_stopped"],
            "train_time_s": round(state.get("elapsed_s", 0.0) + (warm or {}).get("train_time_s", 0.0), 1),
            "train_time_s_this_phase": round(state.get("elapsed_s", 0.0), 1),
            "device": _device_description(),
            "history": state["history"],
        },
        "file_sha256": file_hash(out / APPROXIMATOR_FILE),
    }
    old = out / META_FILE
    if old.exists():  # keep diagnostics of an earlier check only if the weights did not change
        prev = json.loads(old.read_text())
        if prev.get("file_sha256") == meta["file_sha256"] and "diagnostics" in prev:
            meta["diagnostics"] = prev["diagnostics"]
    write_json_atomic(out / META_FILE, meta)
    logger.info("saved estimator to %s", out)


def _device_description() -> str:
    try:
        import jax

        dev = jax.devices()[0]
        return f"{dev.platform}: {getattr(dev, 'device_kind', '')} ({os.cpu_count()} CPU cores)"
    except Exception:  # noqa: BLE001 - informative only
        return f"cpu ({os.cpu_count()} cores)"


def file_hash(path: str | os.PathLike) -> str:
    """sha256 of a file, recorded with results so a fit names the exact estimator it used."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# using a trained estimator


class TrainedEstimator:
    """A loaded estimator: posterior draws and posterior log-densities for batches of individuals."""

    def __init__(self, approximator, model: IndividualModel, meta: dict, path: Path | None = None) -> None:
        self.approximator = approximator
        self.model = model
        self.meta = meta
        self.path = path

    @classmethod
    def load(cls, path: str | os.PathLike, model: IndividualModel) -> "TrainedEstimator":
        """Load ``path`` (a ``trained_models/<model>`` folder) for ``model``; refuses a name/version mismatch."""
        keras = _keras()
        import bayesflow  # noqa: F401 - registers BayesFlow's serializable classes

        folder = Path(path)
        meta_file = folder / META_FILE
        if not meta_file.exists() or not (folder / APPROXIMATOR_FILE).exists():
            raise EstimatorError(f"{folder} is not a trained estimator (needs {APPROXIMATOR_FILE} and {META_FILE})")
        meta = json.loads(meta_file.read_text())
        if meta.get("model") != model.identity():
            raise EstimatorError(
                f"estimator {folder} was trained for {meta.get('model')}, but the simulator is {model.identity()}; "
                "retrain it for this model version")
        approximator = keras.saving.load_model(folder / APPROXIMATOR_FILE, safe_mode=True)
        return cls(approximator, model, meta, folder)

    @property
    def sha256(self) -> str:
        return self.meta.get("file_sha256", "")

    def encode(self, observations: np.ndarray, design: Design) -> np.ndarray:
        return self.model.encode(observations, design)

    def sample(self, observations: np.ndarray, design: Design, n_draws: int, *, batch_size: int = 512,
               seed: int | None = None, progress: bool = False) -> np.ndarray:
        """Posterior draws ``[n, n_draws, k]`` of the log-parameters for each individual (batched)."""
        encoded = self.encode(observations, design)
        n = encoded.shape[0]
        out = np.empty((n, n_draws, self.model.n_params))
        # keep each call to roughly 1M flow evaluations
        per_call = max(1, min(batch_size, (1 << 20) // max(n_draws, 1)))
        starts = range(0, n, per_call)
        iterator = starts
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(starts, desc="posterior draws", unit="batch", file=sys.stderr)
        for b, start in enumerate(iterator):
            sl = slice(start, min(start + per_call, n))
            kwargs = {} if seed is None else {"seed": int(seed) + b}
            draws = self.approximator.sample(num_samples=n_draws, conditions={SUMMARY_KEY: encoded[sl]}, **kwargs)
            out[sl] = draws[PARAM_KEY]
        return out

    def log_prob(self, phi: np.ndarray, observations: np.ndarray, design: Design, *, batch_size: int = 256
                 ) -> np.ndarray:
        """log q(phi_ij | y_i) for draws ``phi [n, M, k]``: the summary is computed once per individual."""
        keras = _keras()
        phi = np.asarray(phi, dtype=np.float64)
        n, M, k = phi.shape
        encoded = self.encode(observations, design)
        prior = self.model.prior
        z = ((phi - prior.mean) / prior.std).astype(np.float32)
        log_det = -float(np.sum(np.log(prior.std)))
        out = np.empty((n, M))
        for start in range(0, n, batch_size):
            sl = slice(start, min(start + batch_size, n))
            summaries = self.approximator.summarize({SUMMARY_KEY: encoded[sl]})
            cond = np.repeat(np.asarray(summaries), M, axis=0)
            lp = self.approximator.inference_network.log_prob(keras.ops.convert_to_tensor(z[sl].reshape(-1, k)),
                                                              conditions=keras.ops.convert_to_tensor(cond))
            out[sl] = np.asarray(keras.ops.convert_to_numpy(lp)).reshape(-1, M) + log_det
        return out


def load_estimator(path: str | os.PathLike, model: IndividualModel) -> TrainedEstimator:
    """Shorthand for :meth:`TrainedEstimator.load`."""
    return TrainedEstimator.load(path, model)
