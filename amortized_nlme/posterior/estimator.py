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
                                    subnet_kwargs={"widths": tuple(cfg.flow_widths),
                                                                   "dropout": cfg.flow_dropout})
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


#: Compiled (JAX) inference path: fixed call shapes, so that jax compiles each function once per estimator and the
#: last batch is zero-padded instead of triggering a recompilation. Rows are (individual, draw) pairs of the flow.
_FLOW_ROWS = 4096  # flow evaluations per compiled call (small enough to stay in the CPU caches)
_SUMMARY_ROWS = 128  # individuals per compiled summary-network call
_GROUP_ROWS = 1 << 20  # flow evaluations prepared at once (bounds the memory of latent noise and conditions)
_NOISE_BLOCK = 64  # individuals per block of latent noise; a block's stream is seeded by (seed, block index)
_NOISE_TAG = 0x5EED_F10  # keeps the latent-noise streams apart from other uses of the same integer seed


class _CompiledFlow:
    """The estimator's own summary network and coupling flow, traced once with ``jax.jit`` (JAX backend only).

    Nothing of the networks is reimplemented: the jitted functions call the very layers BayesFlow calls
    (``summary_network(x)``, ``inference_network(z, conditions, inverse=True)`` and ``inference_network.log_prob``),
    with the current weights passed in through a ``keras.StatelessScope``.
    """

    def __init__(self, approximator) -> None:
        self.summary_network = approximator.summary_network
        self.flow = approximator.inference_network
        self.base = self.flow.base_distribution
        self._summary_vars = list(self.summary_network.variables)
        self._flow_vars = list(self.flow.variables)
        self._compiled: dict[tuple, Callable] = {}
        self.summary_dims: dict[tuple[int, ...], int | None] = {}

    @staticmethod
    def unsupported_reason(approximator) -> str | None:
        """Why the compiled path cannot reproduce ``approximator.sample`` exactly (None when it can)."""
        keras = _keras()
        bf = _bf()
        if keras.backend.backend() != "jax":
            return f"keras backend is {keras.backend.backend()!r}, not 'jax'"
        if getattr(approximator, "summary_network", None) is None:
            return "no summary network"
        if not isinstance(getattr(approximator, "inference_network", None), bf.networks.CouplingFlow):
            return "the inference network is not a CouplingFlow"
        standardizer = getattr(approximator, "standardizer", None)
        if standardizer is not None and standardizer.standardize:
            return "the approximator standardizes its inputs (running moments)"
        if type(approximator.inference_network.base_distribution).__name__ != "DiagonalNormal":
            return "the flow's base distribution is not a DiagonalNormal"
        return None

    def _lower(self, name: str, shapes: tuple[tuple[int, ...], ...]):
        """Trace function ``name`` for float32 inputs of ``shapes`` (the weights are arguments, not constants)."""
        import jax

        keras = _keras()
        variables = self._summary_vars if name == "summary" else self._flow_vars

        def summary(values, x):
            with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                return self.summary_network(x)  # as BayesFlow's ConditionBuilder calls it (no masks)

        def inverse(values, conditions, eps):
            with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                z = self.base._mean + self.base._std * eps  # DiagonalNormal.sample: mean + std * N(0, 1)
                z = keras.ops.cast(z, eps.dtype)
                return self.flow(z, conditions=conditions, inverse=True, density=False)

        def log_prob(values, conditions, x):
            with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                return self.flow.log_prob(x, conditions=conditions)

        fn = {"summary": summary, "inverse": inverse, "log_prob": log_prob}[name]
        args = [jax.ShapeDtypeStruct(shape, np.float32) for shape in shapes]
        return jax.jit(fn).lower(self._values(name), *args)

    def _function(self, name: str, shapes: tuple[tuple[int, ...], ...]) -> Callable:
        """The compiled function ``name`` for float32 inputs of ``shapes``, compiled on first use."""
        key = (name, shapes)
        if key not in self._compiled:
            self._compiled[key] = self._lower(name, shapes).compile()
        return self._compiled[key]

    def _values(self, name: str) -> list:
        return [v.value for v in (self._summary_vars if name == "summary" else self._flow_vars)]

    def _run(self, name: str, rows: int, *arrays: np.ndarray, progress=None) -> np.ndarray:
        """Apply function ``name`` to ``arrays`` (same number of rows) in zero-padded calls of ``rows`` rows."""
        n = arrays[0].shape[0]
        n_calls = -(-n // rows)
        arrays = tuple(np.asarray(a, dtype=np.float32) for a in arrays)
        fn = self._function(name, tuple((rows, *a.shape[1:]) for a in arrays))
        values = self._values(name)

        def chunk(a: np.ndarray, i: int) -> np.ndarray:  # only the last call is zero-padded (no copy of the rest)
            part = a[i * rows:(i + 1) * rows]
            if part.shape[0] < rows:
                part = np.concatenate([part, np.zeros((rows - part.shape[0], *a.shape[1:]), np.float32)])
            return part

        # dispatch is asynchronous: queue every call, then collect the results
        results = [fn(values, *(chunk(a, i) for a in arrays)) for i in range(n_calls)]
        out = None
        for i, r in enumerate(results):
            r = np.asarray(r)
            if out is None:
                out = np.empty((n, *r.shape[1:]), dtype=r.dtype)
            m = min(rows, n - i * rows)
            out[i * rows:i * rows + m] = r[:m]
            if progress is not None:
                progress(m)
        return out if out is not None else np.empty((0,), np.float32)

    def summarize(self, summary_variables: np.ndarray) -> np.ndarray:
        return self._run("summary", _SUMMARY_ROWS, summary_variables)

    def inverse(self, conditions: np.ndarray, eps: np.ndarray, progress=None) -> np.ndarray:
        """Flow inverse of the base-distribution draws ``mean + std * eps`` (eps standard normal)."""
        return self._run("inverse", _FLOW_ROWS, conditions, eps, progress=progress)

    def log_prob(self, conditions: np.ndarray, x: np.ndarray) -> np.ndarray:
        return self._run("log_prob", _FLOW_ROWS, conditions, x)

    def warm_up(self, summary_shape: tuple[int, ...], cond_dim: int | None, dim: int, names: tuple[str, ...]
                ) -> None:
        """Compile the functions a call needs: traced one after the other, compiled concurrently (XLA releases
        the GIL), which shortens the first call's wait on two cores."""
        from concurrent.futures import ThreadPoolExecutor

        jobs = [("summary", ((_SUMMARY_ROWS, *summary_shape),))]
        if cond_dim is not None:
            jobs += [(name, ((_FLOW_ROWS, cond_dim), (_FLOW_ROWS, dim))) for name in names]
        jobs = [j for j in jobs if j not in self._compiled]
        if not jobs:
            return
        lowered = [self._lower(*j) for j in jobs]
        with ThreadPoolExecutor(len(jobs)) as pool:
            compiled = list(pool.map(lambda low: low.compile(), lowered))
        self._compiled.update(zip(jobs, compiled))


#: posterior draws beyond this many prior standard deviations from the prior mean are outside the prior's support in
#: practice (prior mass ~1e-23) and are redrawn (see ``TrainedEstimator.sample``)
SUPPORT_SD = 10.0


def _outside_support(draws: np.ndarray, prior: NormalPrior, rows_per_block: int = 2048) -> np.ndarray:
    """Per draw (last axis: parameters): non-finite, or farther than ``SUPPORT_SD`` prior sds from the prior mean.
    Computed in blocks of rows so that the temporaries stay small next to the draws themselves."""
    lo = prior.mean - SUPPORT_SD * prior.std
    hi = prior.mean + SUPPORT_SD * prior.std
    flat = draws.reshape(-1, draws.shape[-1]) if draws.ndim > 1 else draws.reshape(1, -1)
    bad = np.empty(flat.shape[0], dtype=bool)
    step = max(1, rows_per_block * (draws.shape[-2] if draws.ndim > 2 else 1))
    for a in range(0, flat.shape[0], step):
        block = flat[a:a + step]
        # NaN fails both comparisons, so "not inside" also catches non-finite values
        bad[a:a + step] = ~np.all((block >= lo) & (block <= hi), axis=-1)
    return bad.reshape(draws.shape[:-1])


class TrainedEstimator:
    """A loaded estimator: posterior draws and posterior log-densities for batches of individuals.

    Under the JAX backend both are computed by the estimator's own networks compiled with ``jax.jit``
    (``use_jit = False`` selects BayesFlow's eager ``approximator.sample`` path, the one used by other backends).
    """

    def __init__(self, approximator, model: IndividualModel, meta: dict, path: Path | None = None) -> None:
        self.approximator = approximator
        self.model = model
        self.meta = meta
        self.path = path
        self.use_jit = True
        self.last_replaced = 0
        self._compiled_flow: _CompiledFlow | None = None

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
        """Posterior draws ``[n, n_draws, k]`` of the log-parameters for each individual (batched).

        Draws farther than ``SUPPORT_SD`` prior standard deviations from the prior mean (or non-finite) are replaced
        by fresh draws of the same individual, i.e. q is truncated to where the prior has mass: affine coupling flows
        map a few extreme latent draws (a few in 10,000) to absurd values (1e5 prior sds), which the posterior cannot
        hold. ``last_replaced`` counts them. ``batch_size`` (individuals per call) applies to the BayesFlow path
        only; the compiled JAX path uses fixed call shapes, and its draws for individual ``i`` depend only on
        ``seed``, ``i`` and ``n_draws``."""
        encoded = self.encode(observations, design)
        out = self._sample_encoded(encoded, n_draws, seed, progress, batch_size)
        self.last_replaced = 0
        prior = self.model.prior
        for attempt in range(1, 12):
            bad = _outside_support(out, prior)
            if not bad.any():
                break
            if attempt == 11:
                raise EstimatorError(f"the estimator keeps drawing outside the prior's support (> {SUPPORT_SD:g} "
                                     f"prior sds) for {int(bad.any(axis=1).sum())} individuals")
            rows = np.flatnonzero(bad.any(axis=1))
            self.last_replaced += int(bad.sum()) if attempt == 1 else 0
            need = int(bad[rows].sum(axis=1).max())
            redo_seed = None if seed is None else int(np.random.SeedSequence([int(seed) % (1 << 63), 0x7A11,
                                                                              attempt]).generate_state(1)[0])
            fresh = self._sample_encoded(encoded[rows], max(need, 8), redo_seed, False, batch_size)
            for r, row in enumerate(rows):
                slots = np.flatnonzero(bad[row])
                ok = np.flatnonzero(~_outside_support(fresh[r], prior))
                take = min(slots.size, ok.size)
                out[row, slots[:take]] = fresh[r, ok[:take]]
        if self.last_replaced:
            logger.info("%d of %d posterior draws were outside the prior's support (> %g prior sds) and were "
                        "redrawn", self.last_replaced, out.shape[0] * out.shape[1], SUPPORT_SD)
        return out

    def _sample_encoded(self, encoded: np.ndarray, n_draws: int, seed: int | None, progress: bool,
                        batch_size: int) -> np.ndarray:
        """Draws ``[n, n_draws, k]`` for encoded individuals, untruncated (compiled path, else BayesFlow's)."""
        flow = self._compiled()
        if flow is not None:
            return self._sample_compiled(flow, encoded, n_draws, seed, progress)
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
        """log q(phi_ij | y_i) for draws ``phi [n, M, k]``: the summary is computed once per individual
        (``batch_size``, individuals per call, applies to the BayesFlow path only)."""
        keras = _keras()
        phi = np.asarray(phi, dtype=np.float64)
        n, M, k = phi.shape
        encoded = self.encode(observations, design)
        prior = self.model.prior
        z = ((phi - prior.mean) / prior.std).astype(np.float32)
        log_det = -float(np.sum(np.log(prior.std)))
        out = np.empty((n, M))
        flow = self._compiled()
        if flow is not None:
            if n * M == 0:
                return out
            flow.warm_up(encoded.shape[1:], self._summary_dim(flow, encoded), k, ("log_prob",))
            group = max(1, _GROUP_ROWS // M)
            for g0 in range(0, n, group):
                g1 = min(n, g0 + group)
                cond = np.repeat(flow.summarize(self._summary_variables(encoded[g0:g1])), M, axis=0)
                lp = flow.log_prob(cond, z[g0:g1].reshape(-1, k))
                out[g0:g1] = lp.reshape(g1 - g0, M).astype(np.float64) + log_det
            return out
        for start in range(0, n, batch_size):
            sl = slice(start, min(start + batch_size, n))
            summaries = self.approximator.summarize({SUMMARY_KEY: encoded[sl]})
            cond = np.repeat(np.asarray(summaries), M, axis=0)
            lp = self.approximator.inference_network.log_prob(keras.ops.convert_to_tensor(z[sl].reshape(-1, k)),
                                                              conditions=keras.ops.convert_to_tensor(cond))
            out[sl] = np.asarray(keras.ops.convert_to_numpy(lp)).reshape(-1, M) + log_det
        return out

    # ------------------------------------------------------------------------------------------------------------
    # the compiled JAX path

    def _compiled(self) -> _CompiledFlow | None:
        """The compiled networks, or None where the BayesFlow path must be used (other backend, other networks)."""
        if not self.use_jit:
            return None
        if self._compiled_flow is None:
            reason = _CompiledFlow.unsupported_reason(self.approximator)
            if reason is not None:
                logger.debug("posterior sampling through BayesFlow: %s", reason)
                self.use_jit = False
                return None
            self._compiled_flow = _CompiledFlow(self.approximator)
        return self._compiled_flow

    def _summary_variables(self, encoded: np.ndarray) -> np.ndarray:
        """The summary network's input, through the estimator's own adapter (as in ``approximator.sample``)."""
        adapted = self.approximator.adapter({SUMMARY_KEY: encoded}, strict=False)
        return np.asarray(adapted["summary_variables"], dtype=np.float32)

    @staticmethod
    def _summary_dim(flow: _CompiledFlow, encoded: np.ndarray) -> int | None:
        """Width of the summaries (the flow's conditions), None where the summary network cannot say it; asked once
        per input shape (Keras traces the network to answer, ~0.3 s)."""
        shape = tuple(encoded.shape[1:])
        if shape not in flow.summary_dims:
            try:
                flow.summary_dims[shape] = int(flow.summary_network.compute_output_shape((None, *shape))[-1])
            except Exception:  # noqa: BLE001 - only used to compile ahead; the functions then compile on first use
                flow.summary_dims[shape] = None
        return flow.summary_dims[shape]

    def _noise_seed(self, seed: int | None) -> int:
        """A non-negative integer seed; without one, the next seed of the approximator's own generator (as
        BayesFlow does when ``seed`` is None), so successive calls differ."""
        if seed is not None:
            return int(seed) % (1 << 64)
        state = np.asarray(_keras().ops.convert_to_numpy(self.approximator.seed_generator.next()))
        return int(state.astype(np.uint64)[0]) << 32 | int(state.astype(np.uint64)[-1])

    @staticmethod
    def _latent_noise(seed: int, start: int, stop: int, n_draws: int, dim: int) -> np.ndarray:
        """Standard normals ``[stop - start, n_draws, dim]`` (float32) for individuals ``start:stop``: block ``b`` of
        ``_NOISE_BLOCK`` individuals comes from ``default_rng([tag, seed, b])``, whatever the batching."""
        b0, b1 = start // _NOISE_BLOCK, -(-stop // _NOISE_BLOCK)
        blocks = [np.random.default_rng([_NOISE_TAG, seed, b]).standard_normal((_NOISE_BLOCK, n_draws, dim),
                                                                                 dtype=np.float32)
                  for b in range(b0, b1)]
        eps = np.concatenate(blocks) if len(blocks) > 1 else blocks[0]
        return eps[start - b0 * _NOISE_BLOCK:stop - b0 * _NOISE_BLOCK]

    def _draws_from_noise(self, flow: _CompiledFlow, encoded: np.ndarray, eps: np.ndarray, progress=None
                          ) -> np.ndarray:
        """Posterior draws ``[n, M, k]`` (unstandardized log-parameters) of the latent noise ``eps [n, M, k]``."""
        n, M, k = eps.shape
        summaries = flow.summarize(self._summary_variables(encoded))
        x = flow.inverse(np.repeat(summaries, M, axis=0), eps.reshape(-1, k), progress=progress)
        # the adapter's inverse (standardized by the prior), in float64
        prior = self.model.prior
        return x.reshape(n, M, k).astype(np.float64) * prior.std + prior.mean

    def _sample_compiled(self, flow: _CompiledFlow, encoded: np.ndarray, n_draws: int, seed: int | None,
                         progress: bool) -> np.ndarray:
        n, k = encoded.shape[0], self.model.n_params
        out = np.empty((n, n_draws, k))
        if n * n_draws == 0:
            return out
        flow.warm_up(encoded.shape[1:], self._summary_dim(flow, encoded), k, ("inverse",))
        noise_seed = self._noise_seed(seed)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n * n_draws, desc="posterior draws", unit="draw", unit_scale=True, file=sys.stderr)
        group = max(_NOISE_BLOCK, _GROUP_ROWS // n_draws // _NOISE_BLOCK * _NOISE_BLOCK)
        for g0 in range(0, n, group):
            g1 = min(n, g0 + group)
            eps = self._latent_noise(noise_seed, g0, g1, n_draws, k)
            out[g0:g1] = self._draws_from_noise(flow, encoded[g0:g1], eps, progress=bar.update if bar else None)
        if bar is not None:
            bar.close()
        return out


def load_estimator(path: str | os.PathLike, model: IndividualModel) -> TrainedEstimator:
    """Shorthand for :meth:`TrainedEstimator.load`."""
    return TrainedEstimator.load(path, model)
