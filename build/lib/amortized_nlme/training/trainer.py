"""The training stage: train (or resume training of) an estimator into ``trained_models/<model>/`` with a checkpoint
after every epoch, early stopping and a time budget, then export the approximator and its ``meta.json``."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")

import numpy as np  # noqa: E402

from amortized_nlme.config import TrainingConfig, WorkflowConfig  # noqa: E402
from amortized_nlme.errors import EstimatorError  # noqa: E402
from amortized_nlme.model import IndividualModel  # noqa: E402
from amortized_nlme.posterior.estimator import APPROXIMATOR_FILE, META_FILE, TrainedEstimator, load_approximator  # noqa: E402
from amortized_nlme.provenance import file_sha256, package_versions, read_json, write_json_atomic  # noqa: E402
from amortized_nlme.resources import resolve_shipped_path  # noqa: E402
from amortized_nlme.simulation import simulate_batch  # noqa: E402
from amortized_nlme.training.feeding import (  # noqa: E402
    TrainingPriorTally, batch_dict, fixed_dataset, online_dataset, store_dataset)
from amortized_nlme.training.networks import build_approximator, make_adapter  # noqa: E402

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
#: held (``flock``) by the process that trains into a folder; the kernel releases it when that process ends, however
LOCK_FILE = ".lock"


def _keras():
    import keras

    return keras


def _epoch_dirs(ckpt_dir: Path) -> list[Path]:
    """Complete epoch checkpoints (``epoch-NNNN``), oldest first; temporary folders are never listed."""
    return sorted(p for p in ckpt_dir.glob("epoch-*") if p.is_dir() and p.name[6:].isdigit())


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> Path | None:
    """The newest complete epoch checkpoint, or None."""
    dirs = _epoch_dirs(Path(ckpt_dir))
    return dirs[-1] if dirs else None


def _clean_checkpoints(ckpt_dir: Path, keep: Path | None) -> None:
    """Remove every epoch checkpoint but ``keep``, and temporary folders left by a killed run."""
    import shutil

    for p in ckpt_dir.iterdir():
        if p == keep:
            continue
        if (p.is_dir() and (p.name.startswith(".epoch-") or p.name.startswith("epoch-"))) or p.name in (
                "last.keras", "best.weights.h5", "state.json"):  # layout of earlier versions
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def write_checkpoint(ckpt_dir: Path, model, state: dict, improved: bool) -> Path:
    """Save the approximator (optimizer included), the best weights so far and the training state of this epoch as
    one folder ``epoch-NNNN``: written under a temporary name and renamed when complete, so a kill at any instant
    leaves the previous epoch's consistent set (or this one), never a mixture."""
    import shutil

    epoch = int(state["epoch"])
    tmp = ckpt_dir / f".epoch-{epoch:04d}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        model.save(tmp / "last.keras")
        previous = latest_checkpoint(ckpt_dir)
        if improved or previous is None or not (previous / "best.weights.h5").exists():
            model.save_weights(tmp / "best.weights.h5")
        else:
            try:
                os.link(previous / "best.weights.h5", tmp / "best.weights.h5")
            except OSError:
                shutil.copy2(previous / "best.weights.h5", tmp / "best.weights.h5")
        write_json_atomic(tmp / "state.json", {k: v for k, v in state.items() if k != "started"})
        final = ckpt_dir / f"epoch-{epoch:04d}"
        os.rename(tmp, final)
    except BaseException:  # an error or a Ctrl-C: no half-written folder stays behind (a kill's is removed at resume)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _clean_checkpoints(ckpt_dir, keep=final)
    return final


def _make_checkpoint_callback(ckpt_dir: Path, state: dict, patience: int, deadline: float | None,
                              progress: Callable[[dict], None] | None, tally=None):
    """Per epoch: track the best validation loss, write one consistent checkpoint folder, stop early on a plateau or
    when the time budget is spent."""
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
            improved = val < state["best_val"]
            if improved:
                state["best_val"] = val
                state["best_epoch"] = epoch + 1
                state["wait"] = 0
            else:
                state["wait"] += 1
            state["epoch"] = epoch + 1
            state["elapsed_s"] = state["elapsed_before_s"] + (time.time() - state["started"])
            if tally is not None:
                state["training_prior"] = tally.state()
            if state["wait"] >= patience:
                state["early_stopped"] = True
                self.model.stop_training = True
                logger.info("early stopping: validation loss has not improved for %d epochs", patience)
            if progress:
                progress(state)
            write_checkpoint(ckpt_dir, self.model, state, improved)
            if deadline is not None and time.time() > deadline and not self.model.stop_training:
                logger.info("time budget spent after epoch %d; run again to resume", epoch + 1)
                self.model.stop_training = True

    return Checkpoint()


def train(cfg: WorkflowConfig, model: IndividualModel, out_dir: str | os.PathLike, *, store_path: str | None = None,
          max_minutes: float | None = None, verbose: int = 2) -> bool:
    """Train (or resume training of) the estimator for ``model`` into ``out_dir``.

    Returns True when training is finished (all epochs, or early stopping) and the estimator has been exported;
    False when it stopped on the time budget (run the same command again to resume from the checkpoint). Run again
    after a kill, a Ctrl-C or a finished run, it resumes from (or re-exports) the newest complete checkpoint.
    Refused (:class:`EstimatorError`) while another process trains into the same folder.
    """
    out = Path(out_dir)
    ckpt_dir = out / CHECKPOINT_DIR
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    lock = _lock(ckpt_dir)
    try:
        return _train(cfg, model, out, ckpt_dir, store_path, max_minutes, verbose)
    finally:
        if lock is not None:
            lock.close()


def _lock(ckpt_dir: Path):
    """Take the folder's training lock (an open file, to close when done), or refuse: two processes training into
    one folder would interleave their checkpoints. None where the platform has no ``flock``."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return None
    fh = open(ckpt_dir / LOCK_FILE, "a+")  # noqa: SIM115 - held open while training: that is the lock
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.seek(0)
        holder = fh.read().strip()
        fh.close()
        raise EstimatorError(f"{ckpt_dir.parent} is being trained by another process"
                             f"{f' (pid {holder})' if holder.isdigit() else ''}; wait for it to finish, or stop it "
                             "and run again to resume") from None
    fh.seek(0)
    fh.truncate()
    fh.write(str(os.getpid()))
    fh.flush()
    return fh


def _remove_stale_exports(out: Path) -> None:
    """Temporary files of an export that a killed process left in ``out`` (``.approximator.tmp-<pid>-*.keras``,
    ``.meta.json.<pid>.tmp``); those of live processes (e.g. a ``check`` writing meta.json) are left alone."""
    from amortized_nlme.posterior.cache import pid_alive

    for p in [*out.glob(".approximator.tmp-*.keras"), *out.glob(f".{META_FILE}.*.tmp")]:
        field = p.name.split("tmp-", 1)[1].split("-", 1)[0] if "tmp-" in p.name else p.name.split(".")[-2]
        if field.isdigit() and not pid_alive(int(field)):
            p.unlink(missing_ok=True)


def _train(cfg: WorkflowConfig, model: IndividualModel, out: Path, ckpt_dir: Path, store_path: str | None,
           max_minutes: float | None, verbose: int) -> bool:
    keras = _keras()
    tcfg: TrainingConfig = cfg.training
    keras.utils.set_random_seed(tcfg.seed)

    checkpoint = latest_checkpoint(ckpt_dir)
    _clean_checkpoints(ckpt_dir, keep=checkpoint)  # temporary folders of a killed run (we hold the lock)
    _remove_stale_exports(out)
    if checkpoint is not None:
        state = read_json(checkpoint / "state.json", "training state")
        if state.get("model") != model.identity() or state.get("config") != cfg.to_dict():
            raise EstimatorError(f"{ckpt_dir} holds a checkpoint of another model or configuration; "
                                 "remove it to start afresh")
        if (state["epoch"] >= tcfg.epochs or state["early_stopped"]) and _exported(out, state):
            logger.info("%s: training finished at epoch %d and the estimator is exported; nothing to do", out,
                        state["epoch"])
            return True
        approximator = load_approximator(checkpoint / "last.keras")
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
    store = None
    tally = None
    if tcfg.mode == "online":
        tally = TrainingPriorTally(model.param_names)
        tally.restore(state.get("training_prior"))
        train_ds = online_dataset(model, tcfg.batch_size, tcfg.steps_per_epoch, tcfg.seed, adapter, tally)
        train_ds.epoch = state["epoch"]
        val = simulate_batch(model, tcfg.validation_size, np.random.default_rng([tcfg.seed, 10**6]))
        val_ds = fixed_dataset(model, *val, tcfg.batch_size, adapter)
        n_sim = None
    else:
        from amortized_nlme.simulation import SimulationStore

        if store_path is None:
            raise EstimatorError("offline training needs a simulation store (run `simulate` first)")
        store = SimulationStore(store_path, model)
        train_idx, val_idx = store.split(tcfg.validation_size)
        train_ds = store_dataset(model, store, len(train_idx), tcfg.batch_size, tcfg.seed, adapter)
        train_ds.epoch = state["epoch"]
        train_ds._plan()
        val_ds = fixed_dataset(model, *store.read(val_idx.start, val_idx.stop), tcfg.batch_size, adapter)
        n_sim = len(store)

    deadline = None if max_minutes is None else time.time() + 60.0 * max_minutes
    steps = tcfg.steps_per_epoch if tcfg.mode == "online" else len(train_ds)

    def progress(st: dict) -> None:
        st["simulations_seen"] = st["epoch"] * steps * tcfg.batch_size
        last = st["history"][-1]
        print(f"[{model.name}] epoch {st['epoch']}/{tcfg.epochs}  loss {last.get('loss', float('nan')):.4f}  "
              f"val {last.get('val_loss', float('nan')):.4f}  best {st['best_val']:.4f}@{st['best_epoch']}  "
              f"{st['elapsed_s'] / 60:.1f} min", file=sys.stderr, flush=True)

    callback = _make_checkpoint_callback(ckpt_dir, state, tcfg.patience, deadline, progress, tally)
    try:
        if state["epoch"] < tcfg.epochs and not state["early_stopped"]:
            if not approximator.built:
                _build(approximator, train_ds)
            approximator.fit(dataset=train_ds, validation_data=val_ds, epochs=tcfg.epochs,
                             initial_epoch=state["epoch"], steps_per_epoch=steps if tcfg.mode == "online" else None,
                             callbacks=[callback], verbose=verbose)
    finally:
        if store is not None:
            store.close()
    if state.get("diverged"):
        raise EstimatorError("training diverged (non-finite loss); lower the learning rate or resume from the "
                             "last checkpoint")
    finished = state["epoch"] >= tcfg.epochs or state["early_stopped"]
    if not finished:
        return False
    checkpoint = latest_checkpoint(ckpt_dir)
    if checkpoint is None:
        raise EstimatorError(f"{ckpt_dir}: no complete checkpoint to export")
    approximator.load_weights(checkpoint / "best.weights.h5")
    training_prior = tally.summary(model.prior) if tally is not None else None
    export(approximator, model, cfg, out, state, n_simulations=n_sim, training_prior=training_prior)
    return True


def _build(approximator, dataset) -> None:
    """Build a fresh approximator on the first training batch, as BayesFlow's ``fit`` would, but without counting that
    batch in the training-prior tally: it is not trained on (Keras starts the first epoch with fresh batches)."""
    keras = _keras()
    tally = getattr(dataset, "tally", None)
    dataset.tally = None
    try:
        batch = dataset[0]
    finally:
        dataset.tally = tally
    approximator.build_from_data(keras.tree.map_structure(keras.ops.convert_to_tensor, batch))


def _exported(out: Path, state: dict) -> bool:
    """Whether ``out`` already holds the export of this finished run (its metadata names the same epochs and its
    approximator file is the one the metadata describes)."""
    try:
        meta = read_json(out / META_FILE, "estimator metadata")
        training = meta.get("training", {})
        return (training.get("epochs") == state["epoch"] and training.get("best_epoch") == state["best_epoch"]
                and meta.get("file_sha256") == file_sha256(out / APPROXIMATOR_FILE))
    except Exception:  # noqa: BLE001 - anything missing or unreadable: export again
        return False


def _warm_start(approximator, model: IndividualModel, folder: str) -> dict:
    """Initialise ``approximator`` with the weights of a trained estimator (same model and network); returns what
    the new estimator's metadata records about that first phase."""
    path = resolve_shipped_path(folder)
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
    params, obs, design = simulate_batch(model, 8, np.random.default_rng(0))
    adapted = approximator.adapter(batch_dict(model, params, obs, design))
    return {k: _keras().ops.convert_to_tensor(v) for k, v in adapted.items()}


def export(approximator, model: IndividualModel, cfg: WorkflowConfig, out: Path, state: dict,
           n_simulations: int | None, training_prior: dict | None = None) -> None:
    """Write ``approximator.keras`` and ``meta.json`` (diagnostics are added by ``check``); the approximator first,
    then the metadata that carries its hash, each atomically."""
    keras = _keras()
    tmp = out / f".approximator.tmp-{os.getpid()}-export.keras"
    try:
        approximator.save(tmp)
        os.replace(tmp, out / APPROXIMATOR_FILE)
    finally:
        tmp.unlink(missing_ok=True)
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
        "package_versions": package_versions(),
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
            "training_prior": training_prior,
            "history": state["history"],
        },
        "file_sha256": file_sha256(out / APPROXIMATOR_FILE),
    }
    old = out / META_FILE
    if old.exists():  # keep diagnostics of an earlier check only if the weights did not change
        try:
            prev = read_json(old, "estimator metadata")
        except Exception:  # noqa: BLE001 - an unreadable old file is simply replaced
            prev = {}
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
