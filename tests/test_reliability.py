"""Fault injection through the real commands: kill -9 and Ctrl-C during training and simulation, kills at every
instant of a checkpoint write, swapped and damaged estimator files, two inference runs at once, damaged caches and
temporaries of killed runs, bad option values.

Every command runs as ``python -m amortized_nlme ...`` in a subprocess (the checkout's package, caches under
tmp_path); library-level checks run in-process where the command line adds nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
MODEL = "pk_oral_1cmt"
SHIPPED = REPO / "trained_models" / MODEL
THEO = ["--data", "example:theophylline_nonmem.csv", "--pop", "workflows/populations/theophylline.toml"]
#: the cheapest complete fit: few draws, one start, no profiles, no Monte-Carlo refits, no marginal likelihood
QUICK_FIT = ["--draws", "40", "--starts", "1", "--no-profiles", "--mc-refits", "0", "--marginal", "off"]
EPOCHS = 10

TINY_WORKFLOW = f"""
model = "{MODEL}"
[simulation]
n = 1000
chunk_size = 250
seed = 1
[network]
summary = "time_series"
summary_dim = 8
filters = [8]
kernel_sizes = [3]
strides = [1]
recurrent_dim = 8
skip_steps = 3
flow_depth = 2
flow_transform = "affine"
flow_widths = [16, 16]
[training]
mode = "online"
batch_size = 64
epochs = {EPOCHS}
steps_per_epoch = 4
learning_rate = 5e-4
validation_size = 128
patience = 100
seed = 11
"""


# ----------------------------------------------------------------------------------------------------------------
# running the command


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    """Environment of every command: this checkout's package first on the path (also for scripts), JAX, one BLAS
    thread, every cache under tmp (the XLA compilation cache is shared by the module's processes, which saves each a
    few seconds of compiling)."""
    root = tmp_path_factory.mktemp("env")
    out = {**os.environ, "KERAS_BACKEND": "jax", "OPENBLAS_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "AMORTIZED_NLME_CACHE": str(root / "cache"), "XDG_CACHE_HOME": str(root / "xdg"),
           "AMORTIZED_NLME_JAX_CACHE": str(root / "jax"), "TF_CPP_MIN_LOG_LEVEL": "3"}
    out.pop("AMORTIZED_NLME_HOME", None)
    return out


def cli(env: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "amortized_nlme", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


class Running:
    """A command in the background, its stderr in a file that can be watched."""

    def __init__(self, env: dict, log: Path, *args: str, script: Path | None = None) -> None:
        self.log = log
        cmd = [sys.executable, str(script)] if script else [sys.executable, "-m", "amortized_nlme"]
        self._err = open(log, "w")  # noqa: SIM115 - the child writes to it until finish()
        self.proc = subprocess.Popen([*cmd, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                     stderr=self._err, text=True)  # SIGINT: see conftest.py

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, condition, what: str, timeout: float = 240) -> None:
        """Poll ``condition()`` until true; fails if the process ends first or the time runs out."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if condition():
                return
            if self.proc.poll() is not None:
                pytest.fail(f"process ended (exit {self.proc.returncode}) before {what}:\n{self.stderr()[-3000:]}")
            time.sleep(0.05)
        self.kill()
        pytest.fail(f"timed out waiting for {what}:\n{self.stderr()[-3000:]}")

    def wait_for_log(self, pattern: str, timeout: float = 240) -> re.Match:
        found: list[re.Match] = []

        def seen() -> bool:
            m = re.search(pattern, self.stderr())
            if m:
                found.append(m)
            return m is not None

        self.wait_for(seen, f"log line {pattern!r}", timeout)
        return found[0]

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.finish()

    def finish(self, timeout: float = 240) -> tuple[int, str, str]:
        out, _ = self.proc.communicate(timeout=timeout)
        self._err.close()
        return self.proc.returncode, out, self.stderr()


def assert_message_exit(res: subprocess.CompletedProcess, code: int, *fragments: str) -> None:
    """Exit ``code``, a message with every fragment on stderr, never a traceback."""
    assert res.returncode == code, f"exit {res.returncode}:\n{res.stderr[-3000:]}"
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    for f in fragments:
        assert f in res.stderr, f"{f!r} not in:\n{res.stderr[-3000:]}"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``folder`` but the training lock: content hash and modification time."""
    return {str(p.relative_to(folder)): (sha(p), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def hidden_temporaries(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if ".tmp" in p.name)


# ----------------------------------------------------------------------------------------------------------------
# 1, 2, 7: training killed, interrupted, paused and finished; a kill at every instant of a checkpoint write


#: runs the real command line (``amortized_nlme.cli.main``) with the checkpoint write observed: before every
#: file-system operation of ``write_checkpoint`` it copies the checkpoint folder, i.e. keeps what a kill at that
#: instant would leave on disk; at ``KILL_AT`` (epoch:operation) it kills itself for real with SIGKILL
DRIVER = r'''
import hashlib, json, os, shutil, signal, sys
from pathlib import Path

import amortized_nlme.training.trainer as trainer
from amortized_nlme.cli import main

assert Path(trainer.__file__).resolve().is_relative_to(Path.cwd().resolve()), trainer.__file__
snapshots = Path(os.environ["SNAPSHOTS"])
snapshots.mkdir(parents=True, exist_ok=True)
kill_epoch, kill_op = os.environ["KILL_AT"].split(":")
now = {"epoch": None, "n": 0, "folder": None, "busy": False}
_copytree = shutil.copytree


def instant(op):
    if now["epoch"] is None or now["busy"]:
        return
    now["busy"] = True
    try:
        e, n = now["epoch"], now["n"]
        now["n"] += 1
        if e == int(kill_epoch) and op == kill_op:
            os.kill(os.getpid(), signal.SIGKILL)
        _copytree(now["folder"], snapshots / f"e{e}-{n:02d}-{op}", symlinks=True,
                  ignore=shutil.ignore_patterns(".lock"))
    finally:
        now["busy"] = False


def before(op, fn):
    def wrapped(*args, **kwargs):
        instant(op)
        return fn(*args, **kwargs)
    return wrapped


for module, name in ((os, "rename"), (os, "replace"), (os, "link"), (os, "unlink"), (os, "mkdir"),
                     (shutil, "rmtree"), (shutil, "copy2"), (Path, "unlink"), (Path, "mkdir"),
                     (Path, "write_text"), (Path, "rename"), (Path, "replace")):
    setattr(module, name, before(name, getattr(module, name)))

original = trainer.write_checkpoint


def write_checkpoint(ckpt_dir, model, state, improved):
    for name in ("save", "save_weights"):
        object.__setattr__(model, name, before(name, getattr(type(model), name).__get__(model)))
    now.update(epoch=int(state["epoch"]), n=0, folder=ckpt_dir)
    try:
        final = original(ckpt_dir, model, state, improved)
        instant("done")
    finally:
        now["epoch"] = None
        for name in ("save", "save_weights"):
            object.__delattr__(model, name)
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in final.iterdir()}
    log = snapshots / "fingerprints.json"
    known = json.loads(log.read_text()) if log.exists() else {}
    known[final.name] = files
    log.write_text(json.dumps(known))
    return final


trainer.write_checkpoint = write_checkpoint
sys.exit(main(sys.argv[1:]))
'''


#: the real command with every epoch end slowed by a second, so that a Ctrl-C "at a random instant" lands before the
#: tiny run finishes even on a loaded 2-core machine (its epochs take ~0.4 s)
SLOW_EPOCHS_DRIVER = r'''
import sys, time
import amortized_nlme.training.trainer as trainer
from amortized_nlme.cli import main

original = trainer.write_checkpoint


def write_checkpoint(*args, **kwargs):
    time.sleep(1.0)
    return original(*args, **kwargs)


trainer.write_checkpoint = write_checkpoint
sys.exit(main(sys.argv[1:]))
'''


def checkpoint_epoch(ckpt: Path, fingerprints: dict | None = None) -> int | None:
    """The epoch training resumes from, after checking that the newest complete folder is one consistent set:
    its state names its epoch and a history of that many epochs, the best weights are those of its best epoch, and
    (with ``fingerprints``) its files are byte for byte those written at that epoch. None: no complete checkpoint."""
    dirs = sorted(p for p in ckpt.iterdir() if p.is_dir() and re.fullmatch(r"epoch-\d{4}", p.name))
    if not dirs:
        return None
    newest = dirs[-1]
    epoch = int(newest.name[6:])
    assert sorted(p.name for p in newest.iterdir()) == ["best.weights.h5", "last.keras", "state.json"], newest
    state = json.loads((newest / "state.json").read_text())
    assert state["epoch"] == epoch
    assert [h["epoch"] for h in state["history"]] == list(range(1, epoch + 1))
    assert 1 <= state["best_epoch"] <= epoch
    assert zipfile.ZipFile(newest / "last.keras").testzip() is None
    with h5py.File(newest / "best.weights.h5", "r"):
        pass
    if fingerprints is not None:
        files = {p.name: sha(p) for p in newest.iterdir()}
        assert files == fingerprints[newest.name], f"{newest} holds files of another epoch"
        best_of = fingerprints[f"epoch-{state['best_epoch']:04d}"]["best.weights.h5"]
        assert files["best.weights.h5"] == best_of, f"{newest}: best weights are not those of the best epoch"
    return epoch


@pytest.fixture(scope="module")
def tiny_workflow(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("workflow") / "tiny.toml"
    path.write_text(TINY_WORKFLOW)
    return path


def test_training_survives_kills_ctrl_c_pauses_and_reruns(tmp_path: Path, env: dict, tiny_workflow: Path) -> None:
    """Defects 1, 2 and 7 through ``amortized-nlme train``: (2, 1a) a run killed with SIGKILL inside its third
    checkpoint write, every instant of the first two writes kept and checked; (1c) a resume paused by
    --max-minutes; (1b) a resume stopped by Ctrl-C at a random instant; then a resume that finishes, and (1d) a
    rerun with nothing to do. Each resume continues from the newest consistent checkpoint; the estimator loads and
    holds every epoch once; (7) meta.json records the training prior, every simulation counted once. (A SIGKILL at
    a random instant of a training epoch: ``test_each_interruption_alone_resumes_to_a_full_estimator``, slow.)"""
    from amortized_nlme.posterior import TrainedEstimator
    from simulators import get_model

    out = tmp_path / "est"
    ckpt = out / "checkpoint"
    train = ["train", MODEL, "--config", str(tiny_workflow), "--out", str(out)]
    rng = random.Random(20240611)

    # (2, 1a) the observed run: killed for real with SIGKILL just before it writes the third epoch's state file,
    # i.e. with the epoch-3 folder half written under its temporary name
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    snapshots = tmp_path / "snapshots"
    run = Running({**env, "SNAPSHOTS": str(snapshots), "KILL_AT": "3:write_text"}, tmp_path / "driver.log",
                  *train, script=script)
    code, _, err = run.finish()
    assert code == -signal.SIGKILL, err[-3000:]
    fingerprints = json.loads((snapshots / "fingerprints.json").read_text())
    assert sorted(fingerprints) == ["epoch-0001", "epoch-0002"]
    instants = sorted(p for p in snapshots.iterdir() if p.is_dir())
    for e in (1, 2):  # every file-system step of both writes was seen (folder, files, state, rename, clean-up)
        assert sum(p.name.startswith(f"e{e}-") for p in instants) >= 6, [p.name for p in instants]
    resumed_from = [checkpoint_epoch(p, fingerprints) for p in instants]
    # before the first folder is renamed into place there is nothing to resume, after it always the newest epoch
    assert set(resumed_from) == {None, 1, 2}
    assert resumed_from == sorted(resumed_from, key=lambda e: e or 0)
    leftover = [p.name for p in ckpt.iterdir() if p.name.startswith(".epoch-")]
    assert leftover == [f".epoch-0003.tmp-{run.pid}"] and checkpoint_epoch(ckpt, fingerprints) == 2
    assert sorted(p.name for p in (ckpt / leftover[0]).iterdir()) == ["best.weights.h5", "last.keras"]

    def ckpt_files() -> list[str]:
        return sorted(p.name for p in ckpt.iterdir() if p.name != ".lock")

    # (1c) resume after that kill, under a time budget of 0 minutes: the half-written folder is removed, one more
    # epoch is trained, then a pause (exit 0, says how to go on)
    res = cli(env, *train, "--max-minutes", "0")
    assert_message_exit(res, 0, "resuming pk_oral_1cmt from epoch 2", "training paused",
                        "run the same command again to resume")
    assert ckpt_files() == ["epoch-0003"] and not (out / "approximator.keras").exists()
    assert checkpoint_epoch(ckpt) == 3
    epoch = 3

    # (1b) resume, Ctrl-C at a random instant after its first epoch: exit 130 and how to resume
    slow = tmp_path / "slow_epochs.py"
    slow.write_text(SLOW_EPOCHS_DRIVER)
    run = Running(env, tmp_path / "ctrl-c.log", *train, script=slow)
    run.wait_for_log(rf"epoch {epoch + 1}/{EPOCHS}")
    time.sleep(rng.uniform(0.0, 1.5))
    run.signal(signal.SIGINT)
    code, _, err = run.finish()
    assert code == 130, err[-3000:]
    assert "Traceback" not in err and "interrupted; run the same command again to resume" in err, err[-3000:]
    stopped_at = checkpoint_epoch(ckpt)
    assert epoch <= stopped_at < EPOCHS
    assert not [p for p in ckpt_files() if p.startswith(".")]  # Ctrl-C cleans up after itself

    # resume to the end: a loadable estimator with every epoch once
    res = cli(env, *train)
    assert_message_exit(res, 0, f"resuming pk_oral_1cmt from epoch {stopped_at}")
    assert res.stdout.strip().endswith(str(out))
    assert ckpt_files() == [f"epoch-{EPOCHS:04d}"] and hidden_temporaries(out) == []
    meta = json.loads((out / "meta.json").read_text())
    training = meta["training"]
    assert [h["epoch"] for h in training["history"]] == list(range(1, EPOCHS + 1))
    assert training["epochs"] == EPOCHS and training["simulations_seen"] == EPOCHS * 4 * 64
    model = get_model(MODEL)
    est = TrainedEstimator.load(out, model)
    assert est.sha256 == sha(out / "approximator.keras") == meta["file_sha256"]

    # (7) the effective training prior: every simulation counted once across the kills, the pause and Ctrl-C
    prior = training["training_prior"]
    assert prior["simulations_drawn"] == EPOCHS * 4 * 64 + prior["simulations_failed_and_redrawn"]
    assert 0.0 <= prior["failure_fraction"] < 1.0
    assert prior["failure_fraction"] == pytest.approx(prior["simulations_failed_and_redrawn"]
                                                      / prior["simulations_drawn"])
    assert sorted(prior["accepted_parameters"]) == sorted(model.param_names)
    for name, moments in prior["accepted_parameters"].items():
        assert all(np.isfinite(moments[k]) for k in ("mean", "sd", "min", "max", "prior_mean", "prior_sd")), name
        assert moments["min"] <= moments["mean"] <= moments["max"] and moments["sd"] > 0

    # (1d) a rerun of the finished command: nothing to do, nothing rewritten
    before = tree(out)
    res = cli(env, *train)
    assert_message_exit(res, 0, "nothing to do")
    assert tree(out) == before


def test_second_training_run_into_the_same_folder_is_refused(tmp_path: Path, tiny_workflow: Path) -> None:
    """Two trainings into one folder would interleave checkpoints: the second is refused while the first holds the
    folder's lock (the kernel releases it however the first ends)."""
    import fcntl

    from amortized_nlme.config import load_workflow
    from amortized_nlme.errors import EstimatorError
    from amortized_nlme.training import train
    from simulators import get_model

    (tmp_path / "checkpoint").mkdir()
    with open(tmp_path / "checkpoint" / ".lock", "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        fh.write("4242")
        fh.flush()
        with pytest.raises(EstimatorError, match=r"being trained by another process \(pid 4242\)"):
            train(load_workflow(tiny_workflow), get_model(MODEL), tmp_path, verbose=0)


def test_training_prior_counts_failures_once_per_batch() -> None:
    """(7) The tally behind ``training.training_prior``: failed simulations are counted, a batch fetched twice
    (Keras and BayesFlow fetch the first one again to build the networks) counts once, and the accepted parameters
    show the truncation that redrawing failures causes."""
    from amortized_nlme.training.feeding import TrainingPriorTally, online_dataset
    from amortized_nlme.training.networks import make_adapter
    from simulators import get_model

    base = get_model(MODEL)

    class FailsForFastAbsorption(type(base)):  # the simulator "breaks down" for log ka > 1
        def simulate(self, phi, design, rng):
            obs = np.array(super().simulate(phi, design, rng))
            obs[phi[:, 0] > 1.0] = np.nan
            return obs

    model = FailsForFastAbsorption()
    tally = TrainingPriorTally(model.param_names)
    data = online_dataset(model, 32, 3, 5, make_adapter(model.prior), tally)
    data[0]  # the build batch
    for i in range(3):
        data[i]
    data.on_epoch_end()
    data[0]
    assert tally.n_accepted == 4 * 32
    summary = tally.summary(model.prior)
    assert summary["simulations_drawn"] == 4 * 32 + summary["simulations_failed_and_redrawn"]
    assert 0.1 < summary["failure_fraction"] < 0.5  # P(log ka > 1) = 0.28 under the prior
    ka = summary["accepted_parameters"]["ka"]
    assert ka["max"] <= 1.0 and ka["mean"] < ka["prior_mean"] - 0.2
    restored = TrainingPriorTally(model.param_names)
    restored.restore(json.loads(json.dumps(tally.state())))
    assert restored.summary(model.prior) == summary


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["sigkill", "ctrl-c", "pause"])
def test_each_interruption_alone_resumes_to_a_full_estimator(tmp_path: Path, env: dict, tiny_workflow: Path,
                                                             stop: str) -> None:
    """(1) Each way of stopping, from a fresh start, followed by a resume that finishes."""
    out = tmp_path / "est"
    train = ["train", MODEL, "--config", str(tiny_workflow), "--out", str(out)]
    if stop == "pause":
        assert_message_exit(cli(env, *train, "--max-minutes", "0"), 0, "run the same command again to resume")
    else:
        slow = tmp_path / "slow_epochs.py"
        slow.write_text(SLOW_EPOCHS_DRIVER)
        run = Running(env, tmp_path / "run.log", *train, script=slow)
        run.wait_for_log(rf"epoch 2/{EPOCHS}")
        time.sleep(0.5)
        run.signal(signal.SIGKILL if stop == "sigkill" else signal.SIGINT)
        code, _, err = run.finish()
        assert code == (-signal.SIGKILL if stop == "sigkill" else 130), err[-3000:]
    epoch = checkpoint_epoch(out / "checkpoint")
    assert epoch is not None and epoch >= 1
    res = cli(env, *train)
    assert_message_exit(res, 0, f"resuming pk_oral_1cmt from epoch {epoch}")
    meta = json.loads((out / "meta.json").read_text())
    assert [h["epoch"] for h in meta["training"]["history"]] == list(range(1, EPOCHS + 1))
    assert hidden_temporaries(out) == []


# ----------------------------------------------------------------------------------------------------------------
# 3, 4: swapped and damaged estimator files


def _copy_estimator(dest: Path) -> Path:
    shutil.copytree(SHIPPED, dest, ignore=shutil.ignore_patterns("phase1", "diagnostics"))
    return dest


def _record_hash(folder: Path) -> None:
    """Make meta.json describe the file as it is now (damage that happened before the hash was taken), so that
    the loader itself meets the damage."""
    meta = json.loads((folder / "meta.json").read_text())
    meta["file_sha256"] = sha(folder / "approximator.keras")
    (folder / "meta.json").write_text(json.dumps(meta))


def _truncated_weights(src: Path, dest: Path) -> None:
    """A valid zip archive whose weights file is cut in half."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item)
            zout.writestr(item, data[: len(data) // 2] if item.filename.endswith(".h5") else data)


def _damage(kind: str, folder: Path) -> tuple[str, list[str]]:
    """Damage the estimator copy ``folder``; returns the damaged file and the message fragments expected."""
    file = folder / "approximator.keras"
    meta = folder / "meta.json"
    if kind == "swapped":
        shutil.copy(SHIPPED / "phase1" / "approximator.keras", file)  # another valid network, meta.json unchanged
        return str(file), ["does not match", str(meta)]
    if kind == "random-bytes":
        file.write_bytes(np.random.default_rng(0).bytes(file.stat().st_size))
        return str(file), ["does not match", str(meta)]
    if kind == "random-bytes-hashed":
        file.write_bytes(np.random.default_rng(1).bytes(50_000))
        _record_hash(folder)
        return str(file), ["cannot load the estimator"]
    if kind == "truncated":
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
        _record_hash(folder)
        return str(file), ["cannot load the estimator"]
    if kind == "truncated-weights":
        _truncated_weights(SHIPPED / "approximator.keras", file)
        _record_hash(folder)
        return str(file), ["cannot load the estimator"]
    if kind == "invalid-meta":
        meta.write_text('{"model": {"name": "pk_oral_1cmt", "version": ')
        return str(meta), ["not valid JSON"]
    if kind == "meta-not-object":
        meta.write_text("[1, 2, 3]")
        return str(meta), ["expected a JSON object"]
    if kind == "meta-without-hash":
        data = json.loads(meta.read_text())
        del data["file_sha256"]
        meta.write_text(json.dumps(data))
        return str(meta), ["records no file_sha256"]
    if kind == "missing-approximator":
        file.unlink()
        return str(folder), ["approximator.keras missing"]
    if kind == "missing-meta":
        meta.unlink()
        return str(folder), ["meta.json missing"]
    if kind == "approximator-is-a-folder":
        file.unlink()
        file.mkdir()
        return str(folder), ["approximator.keras missing"]
    if kind == "missing-folder":
        shutil.rmtree(folder)
        return str(folder), ["no such estimator folder"]
    raise ValueError(kind)


#: run as separate commands: the swap, and the damage that the Keras loader meets last (a valid archive)
THROUGH_THE_COMMAND = ["swapped", "truncated-weights"]
#: the others through the command line's entry point, in-process
IN_PROCESS = ["random-bytes", "random-bytes-hashed", "truncated", "invalid-meta", "meta-not-object",
              "meta-without-hash", "missing-approximator", "missing-meta", "approximator-is-a-folder",
              "missing-folder"]


def test_swapped_or_damaged_estimator_is_refused_by_infer(tmp_path: Path, env: dict) -> None:
    """(3, 4) ``infer`` with a swapped approximator.keras (another valid network, meta.json unchanged), or with a
    valid archive whose weights are truncated and that meta.json's hash describes (so that the loader meets it):
    exit 2, a message naming the file, no traceback, nothing sampled or written."""
    cases = []
    for kind in THROUGH_THE_COMMAND:
        folder = _copy_estimator(tmp_path / kind)
        named, fragments = _damage(kind, folder)
        cases.append((kind, folder, named, fragments))
    cache = tmp_path / "cache"

    def run(case):
        kind, folder, _, _ = case
        return cli({**env, "AMORTIZED_NLME_CACHE": str(cache)}, "infer", MODEL, *THEO, *QUICK_FIT,
                   "--estimator", str(folder), "--out", str(tmp_path / f"results-{kind}"))

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(run, cases))
    for (kind, _, named, fragments), res in zip(cases, results):
        assert_message_exit(res, 2, named, *fragments)
        assert not (tmp_path / f"results-{kind}").exists(), kind
    assert not cache.exists()  # refused before any posterior draw


@pytest.mark.parametrize("kind", IN_PROCESS)
def test_damaged_estimator_message(tmp_path: Path, kind: str, capsys: pytest.CaptureFixture,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """(3, 4) The other kinds of damage through the command line's entry point, in-process: random bytes (hash
    mismatch, or described by the hash), a truncated archive, invalid or incomplete meta.json, missing files."""
    from amortized_nlme.cli import main

    monkeypatch.setenv("AMORTIZED_NLME_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("AMORTIZED_NLME_JAX_CACHE", "off")

    folder = _copy_estimator(tmp_path / "est")
    named, fragments = _damage(kind, folder)
    code = main(["infer", MODEL, *THEO, *QUICK_FIT, "--estimator", str(folder), "--out", str(tmp_path / "res")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    for f in [named, *fragments]:
        assert f in err, err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "res").exists()


def test_estimator_replaced_while_loading_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """(3) The file is hashed, loaded, and hashed again: a file swapped between the check and the load (another
    process exporting into the folder) is refused, not used under the hash of the file it replaced."""
    from amortized_nlme.errors import EstimatorError
    from amortized_nlme.posterior import TrainedEstimator
    from amortized_nlme.posterior import estimator as estimator_module
    from simulators import get_model

    folder = _copy_estimator(tmp_path / "est")

    def load_then_swap(file):  # stands for Keras reading the file, while another process replaces it
        shutil.copy(SHIPPED / "phase1" / "approximator.keras", file)
        return object()

    monkeypatch.setattr(estimator_module, "load_approximator", load_then_swap)
    with pytest.raises(EstimatorError, match="changed while it was being loaded"):
        TrainedEstimator.load(folder, get_model(MODEL))


# ----------------------------------------------------------------------------------------------------------------
# 5: two runs at once, a damaged draw cache, temporaries of a killed run


def test_concurrent_runs_damaged_cache_and_killed_run(tmp_path: Path, env: dict) -> None:
    """(5) Two ``infer`` runs of the same draws at once (same data, estimator, seed and cache) both succeed with
    identical draws; a run killed while writing its results leaves temporaries that the next run removes, as it
    removes a dead process's cache temporary; a truncated cache file is detected, resampled, and the run succeeds.
    (3) The results record the hash of the estimator file actually loaded."""
    env = {**env, "AMORTIZED_NLME_CACHE": str(tmp_path / "cache")}
    draws_dir = tmp_path / "cache" / "draws"
    res_dir = tmp_path / "results"
    estimator = _copy_estimator(tmp_path / "est")
    infer = ["infer", MODEL, *THEO, *QUICK_FIT, "--estimator", str(estimator)]

    # three runs at once; the third is killed while it writes its results folder
    with ThreadPoolExecutor(2) as pool:
        both = pool.map(lambda name: cli(env, *infer, "--out", str(res_dir / name)), ["a", "b"])
        run = Running(env, tmp_path / "killed.log", *infer, "--out", str(res_dir / "c"))
        run.wait_for(lambda: res_dir.is_dir() and any(p.name.startswith(".c.tmp-") for p in res_dir.iterdir()),
                     "the results being written")
        run.signal(signal.SIGKILL)
        assert run.finish()[0] == -signal.SIGKILL
        a, b = both
    for res in (a, b):
        assert_message_exit(res, 0)
    assert not (res_dir / "c").exists()
    left = [p.name for p in res_dir.iterdir() if p.name.startswith(".")]
    assert left and all(name.startswith(f".c.tmp-{run.pid}-") for name in left), left
    cached = sorted(draws_dir.iterdir())
    # the first draws (seed 0) and any extension rounds (their own seeds), each once; no temporaries
    assert all(p.suffix == ".h5" for p in cached), cached
    first = [p for p in cached if p.stem.endswith("-M40-s0")]
    assert len(first) == 1, cached
    with h5py.File(first[0], "r") as fh:
        draws = fh["draws"][...]
    assert draws.shape == (12, 40, 4)
    for name in ("individual_estimates.csv", "estimates.csv"):  # both fits used the same draws
        assert (res_dir / "a" / name).read_bytes() == (res_dir / "b" / name).read_bytes()
    summary = json.loads((res_dir / "a" / "summary.json").read_text())
    assert summary["inputs"]["estimator"]["sha256"] == sha(estimator / "approximator.keras")

    # what a kill during a cache write would leave, and the cache file cut in half
    stale = draws_dir / f"{first[0].stem}.tmp-{run.pid}-12345"
    stale.write_bytes(b"partial")
    first[0].write_bytes(first[0].read_bytes()[: first[0].stat().st_size // 2])

    res = cli(env, *infer, "--out", str(res_dir / "c"))
    assert_message_exit(res, 0, "damaged")
    assert hidden_temporaries(tmp_path) == []
    assert sorted(draws_dir.iterdir()) == cached
    with h5py.File(first[0], "r") as fh:
        np.testing.assert_array_equal(fh["draws"][...], draws)  # resampled: the same seed gives the same draws
    assert (res_dir / "c" / "individual_estimates.csv").read_bytes() == \
        (res_dir / "a" / "individual_estimates.csv").read_bytes()


def test_results_folder_replaced_by_a_concurrent_run_in_between(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """(5) Two runs writing the same results folder: when the other run's folder lands between our two renames,
    neither fails, the last one wins, and no temporaries are left."""
    from amortized_nlme.report import writer

    out = tmp_path / "results"
    real_replace = os.replace
    raced = []

    def replace(src, dst):
        if Path(dst) == out and not raced:  # just before our folder moves into place, the other run's lands there
            raced.append(True)
            with writer._atomic_directory(out) as other:
                (other / "who").write_text("other")
        return real_replace(src, dst)

    monkeypatch.setattr(writer.os, "replace", replace)
    with writer._atomic_directory(out) as mine:
        (mine / "who").write_text("mine")
    assert raced and (out / "who").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]


# ----------------------------------------------------------------------------------------------------------------
# 6: option values refused before anything is sampled


BAD_INFER_OPTIONS = [["--max-individuals", "0"], ["--max-individuals", "-3"], ["--seed", "-1"], ["--starts", "0"]]
MORE_BAD_INFER_OPTIONS = [["--draws", "1"], ["--draws", "6", "--mc-refits", "4"], ["--mc-refits", "1"],
                          ["--mc-target", "0"], ["--mc-target", "-0.5"], ["--max-draws", "1"]]


def test_bad_infer_options_are_refused_before_sampling(tmp_path: Path, env: dict) -> None:
    """(6) Each bad value, as a command: exit 2, a message naming the option and the value, nothing sampled or
    written."""
    cache = tmp_path / "cache"

    def run(option):
        return cli({**env, "AMORTIZED_NLME_CACHE": str(cache)}, "infer", MODEL, *THEO, *option,
                   "--out", str(tmp_path / "res"))

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(run, BAD_INFER_OPTIONS))
    for option, res in zip(BAD_INFER_OPTIONS, results):
        assert_message_exit(res, 2, f"{option[0]} must", f"not {option[1]}")
    assert not cache.exists() and not (tmp_path / "res").exists()


@pytest.mark.parametrize("option", MORE_BAD_INFER_OPTIONS, ids=" ".join)
def test_more_bad_infer_options(tmp_path: Path, option: list[str], capsys: pytest.CaptureFixture,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    """(6) Further bad values through the command line's entry point, in-process."""
    from amortized_nlme.cli import main

    monkeypatch.setenv("AMORTIZED_NLME_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("AMORTIZED_NLME_JAX_CACHE", "off")
    assert main(["infer", MODEL, *THEO, *option, "--out", str(tmp_path / "res")]) == 2
    err = capsys.readouterr().err
    assert option[-2] in err and "Traceback" not in err, err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "res").exists()


@pytest.mark.parametrize("args", [
    ["simulate", MODEL, "-n", "0"], ["simulate", MODEL, "--seed", "-1"], ["simulate", MODEL, "--chunk-size", "0"],
    ["simulate", MODEL, "--workers", "0"], ["train", MODEL, "--max-minutes", "-1"],
    ["train", MODEL, "--max-minutes", "nan"],
], ids=lambda a: " ".join(a))
def test_bad_simulate_and_train_options_are_refused(tmp_path: Path, env: dict, args: list[str]) -> None:
    res = cli(env, *args, "--out", str(tmp_path / "out"))
    assert_message_exit(res, 2, args[2])
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------------
# simulate: killed with SIGKILL, rerun, the same store


def _contents(path: Path) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    with h5py.File(path, "r") as fh:
        fh.visititems(lambda name, obj: out.__setitem__(name, obj[()].tobytes())
                      if isinstance(obj, h5py.Dataset) else None)
    return out


def test_simulate_killed_and_rerun_gives_the_same_store(tmp_path: Path, env: dict) -> None:
    """``simulate`` killed with SIGKILL while it writes chunks, then rerun: it resumes the unfinished file and ends
    with the same store as an uninterrupted run."""
    from amortized_nlme.simulation import simulate_to_store
    from amortized_nlme.simulation.store import partial_path
    from simulators import get_model

    n, chunk = 12_000, 100
    ref = simulate_to_store(get_model("mrna_simple"), n, tmp_path / "ref.h5", seed=3, chunk_size=chunk,
                            progress=False)
    out = tmp_path / "sims.h5"
    args = ["simulate", "mrna_simple", "-n", str(n), "--chunk-size", str(chunk), "--seed", "3", "--out", str(out)]
    run = Running(env, tmp_path / "killed.log", *args)
    run.wait_for_log(r"[1-9][0-9]*\.?[0-9]*k?/12\.0k")  # chunks are being written
    time.sleep(random.Random(7).uniform(0.0, 0.5))
    run.signal(signal.SIGKILL)
    assert run.finish()[0] == -signal.SIGKILL
    assert partial_path(out).exists() and not out.exists(), run.stderr()[-2000:]
    with h5py.File(partial_path(out), "r") as fh:
        done = fh["chunk_done"][:]
    assert 0 < done.sum() < done.size
    res = cli(env, *args)
    assert_message_exit(res, 0, "resuming")
    assert not partial_path(out).exists()
    assert _contents(out) == _contents(ref)
