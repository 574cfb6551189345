"""Simulation on Dask (``simulate --dask``): the same store, byte for byte, as one process; resume of unfinished
stores; one-line errors when the scheduler cannot be reached, dask is missing or a worker dies."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from amortized_nlme.cli import main
from amortized_nlme.errors import ConfigError, DaskError, SimulationError
from amortized_nlme.simulation import DaskExecutor, compute_chunk, simulate_on_dask, simulate_to_store
from amortized_nlme.simulation.distributed import parse_dask_address
from amortized_nlme.simulation.store import StoreWriter, partial_path
from simulators import get_model
from simulators.mrna_simple import MrnaSimple

REPO = Path(__file__).resolve().parent.parent
N, CHUNK, SEED = 600, 100, 11
#: attributes that say when and where a store was made, not what it holds
INFORMATIVE_ATTRS = {"created", "finished_utc"}


def _everything(path: Path) -> tuple[dict[str, bytes], dict[str, str]]:
    """Every dataset's bytes (with dtype and shape) and every attribute but the informative ones."""
    data: dict[str, bytes] = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: data.__setitem__(name, (obj.dtype.str, obj.shape, obj[()].tobytes()))
                     if isinstance(obj, h5py.Dataset) else None)
        attrs = {key: repr(value) for key, value in f.attrs.items() if key not in INFORMATIVE_ATTRS}
    return data, attrs


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
            "PYTHONUNBUFFERED": "1", "KERAS_BACKEND": "jax"}


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "amortized_nlme", "simulate", *args], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def client():
    """One LocalCluster of two single-threaded worker processes for the module; a task whose worker dies fails at
    once (no retries), so that the dead-worker test is quick."""
    pytest.importorskip("distributed")
    import dask
    from distributed import Client, LocalCluster

    with (dask.config.set({"distributed.scheduler.allowed-failures": 0}),
          LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster,
          Client(cluster, set_as_default=False) as c):
        yield c


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict[str, Path]:
    """Single-process stores of both test models (N=600 in chunks of 100)."""
    folder = tmp_path_factory.mktemp("ref")
    return {name: simulate_to_store(get_model(name), N, folder / f"{name}.h5", seed=SEED, chunk_size=CHUNK,
                                    progress=False) for name in ("mrna_simple", "pk_1cmt_oral")}


@pytest.mark.parametrize("name", ["mrna_simple", "pk_1cmt_oral"])
def test_dask_store_is_the_single_process_store(tmp_path: Path, client, references: dict[str, Path],
                                                name: str) -> None:
    client.wait_for_workers(2, timeout=30)
    path = simulate_to_store(get_model(name), N, tmp_path / "dask.h5", seed=SEED, chunk_size=CHUNK, progress=False,
                             executor=DaskExecutor(client, numba_threads=1))
    assert path == tmp_path / "dask.h5" and not partial_path(path).exists()
    assert _everything(path) == _everything(references[name])
    with h5py.File(path, "r") as f:
        assert f.attrs["complete"] and f["chunk_done"][:].all()


def test_unfinished_store_is_completed_on_dask(tmp_path: Path, client, references: dict[str, Path],
                                               caplog: pytest.LogCaptureFixture) -> None:
    client.wait_for_workers(2, timeout=30)
    model = MrnaSimple()
    out = tmp_path / "sims.h5"
    writer = StoreWriter(out, model, N, CHUNK, SEED)  # as if an earlier run had written chunks 1 and 4
    for c in (4, 1):
        r = compute_chunk(model, SEED, c, N, CHUNK)
        writer.write_chunk(c, r.params, r.observations, r.design, r.n_failed)
    writer.close()
    with caplog.at_level(logging.INFO, logger="amortized_nlme"):
        simulate_on_dask(model, N, out, client, seed=SEED, chunk_size=CHUNK, progress=False)
    assert "2 of 6 chunks already done" in caplog.text and "4 to do" in caplog.text
    assert _everything(out) == _everything(references["mrna_simple"])


def test_interrupted_dask_run_resumes(tmp_path: Path, client, references: dict[str, Path],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C (or SIGTERM) while chunks arrive: the chunks written stay, the cluster's work is cancelled, the next run
    does the rest."""
    client.wait_for_workers(2, timeout=30)
    out = tmp_path / "sims.h5"
    write_chunk = StoreWriter.write_chunk
    written: list[int] = []

    def interrupted_after_two(self, chunk_index, *args, **kwargs):
        if len(written) == 2:
            raise KeyboardInterrupt
        write_chunk(self, chunk_index, *args, **kwargs)
        written.append(chunk_index)

    monkeypatch.setattr(StoreWriter, "write_chunk", interrupted_after_two)
    with pytest.raises(KeyboardInterrupt):
        simulate_on_dask(MrnaSimple(), N, out, client, seed=SEED, chunk_size=CHUNK, progress=False)
    monkeypatch.undo()
    assert not out.exists()
    with h5py.File(partial_path(out), "r") as f:
        assert sorted(np.flatnonzero(f["chunk_done"][:]).tolist()) == sorted(written)
    assert client.status == "running"  # a client it was given is left open
    simulate_on_dask(MrnaSimple(), N, out, client, seed=SEED, chunk_size=CHUNK, progress=False)
    assert _everything(out) == _everything(references["mrna_simple"])


class ExitingMrna(MrnaSimple):
    """Ends its worker process on the last (short) chunk, as an out-of-memory kill would."""

    def simulate(self, phi, design, rng):
        if phi.shape[0] == 50:
            os._exit(1)
        return super().simulate(phi, design, rng)


class BrokenMrna(MrnaSimple):
    """Every simulation fails (non-finite observations)."""

    def simulate(self, phi, design, rng):
        return np.full_like(super().simulate(phi, design, rng), np.nan)


def test_worker_errors_come_back_as_messages(tmp_path: Path, client) -> None:
    """A simulation error raised on a worker is the same error here; a dead worker is a DaskError; either way the
    chunks already written stay resumable."""
    import cloudpickle

    client.wait_for_workers(2, timeout=30)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    try:
        with pytest.raises(SimulationError, match="after 2 redraw rounds"):
            simulate_on_dask(BrokenMrna(), 250, tmp_path / "broken.h5", client, seed=SEED, chunk_size=CHUNK,
                             progress=False, max_rounds=2)
        with pytest.raises(DaskError, match=r"died while simulating chunk \d.*resume"):
            simulate_on_dask(ExitingMrna(), 250, tmp_path / "sims.h5", client, seed=SEED, chunk_size=CHUNK,
                             progress=False)
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert partial_path(tmp_path / "sims.h5").exists() and partial_path(tmp_path / "broken.h5").exists()


def test_lost_scheduler_is_a_message_and_the_run_resumes(tmp_path: Path, references: dict[str, Path],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The scheduler goes away after the first chunk is written: a DaskError, the chunk stays; a rerun finishes."""
    pytest.importorskip("distributed")
    from distributed import LocalCluster

    out = tmp_path / "sims.h5"
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        write_chunk = StoreWriter.write_chunk

        def write_then_lose_the_scheduler(self, *args, **kwargs):
            write_chunk(self, *args, **kwargs)
            cluster.close()

        monkeypatch.setattr(StoreWriter, "write_chunk", write_then_lose_the_scheduler)
        with pytest.raises(DaskError, match=r"lost the Dask scheduler \(tcp://.*resume"):
            simulate_on_dask(MrnaSimple(), N, out, cluster.scheduler_address, connect_timeout=2, seed=SEED,
                             chunk_size=CHUNK, progress=False)
    monkeypatch.undo()
    with h5py.File(partial_path(out), "r") as f:
        assert f["chunk_done"][:].sum() == 1
    simulate_to_store(MrnaSimple(), N, out, seed=SEED, chunk_size=CHUNK, progress=False)
    assert _everything(out) == _everything(references["mrna_simple"])


def test_cli_simulates_on_a_local_cluster(tmp_path: Path, references: dict[str, Path]) -> None:
    out = tmp_path / "sims.h5"
    res = _cli("mrna_simple", "-n", str(N), "--chunk-size", str(CHUNK), "--seed", str(SEED), "--out", str(out),
               "--dask", "local:2")
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == str(out)
    assert "Dask local cluster, 2 workers" in res.stderr and "600/600" in res.stderr
    assert _everything(out) == _everything(references["mrna_simple"])


def test_cli_unreachable_scheduler_is_one_line(tmp_path: Path) -> None:
    out = tmp_path / "sims.h5"
    res = _cli("mrna_simple", "-n", "100", "--out", str(out), "--dask", "tcp://127.0.0.1:1", "--dask-timeout", "2")
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "tcp://127.0.0.1:1" in lines[0] and "cannot reach the Dask scheduler" in lines[0]
    assert not out.exists() and not partial_path(out).exists()  # nothing is touched before the cluster is there


def test_missing_dask_says_which_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed -> ImportError
    monkeypatch.setenv("DASK_LOGGING__DISTRIBUTED", "warning")  # what the command line sets
    with pytest.raises(DaskError, match=r"amortized-nlme\[dask\]"), DaskExecutor("tcp://scheduler:8786"):
        pass
    out = tmp_path / "sims.h5"
    assert main(["simulate", "mrna_simple", "-n", "100", "--out", str(out), "--dask", "local"]) == 2
    err = capsys.readouterr().err
    assert "dask.distributed is not installed" in err and "[dask]" in err and "local" in err
    assert not partial_path(out).exists()


def test_package_imports_without_dask() -> None:
    code = ("import sys; sys.modules['dask'] = sys.modules['distributed'] = None\n"
            "import amortized_nlme.simulation, amortized_nlme.cli\n"
            "from amortized_nlme.simulation import DaskExecutor; DaskExecutor('local:3')\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True,
                         timeout=120, check=False)
    assert res.returncode == 0, res.stderr[-3000:]


def test_addresses_and_options(capsys: pytest.CaptureFixture) -> None:
    assert parse_dask_address("local") == (None, 2)
    assert parse_dask_address("local:3") == (None, 3)
    assert parse_dask_address(" tcp://10.0.0.1:8786 ") == ("tcp://10.0.0.1:8786", 0)
    for bad in ("local:0", "local:x", "local:", ""):
        with pytest.raises(ConfigError):
            parse_dask_address(bad)
    assert main(["simulate", "mrna_simple", "-n", "10", "--dask", "local:0"]) == 2
    assert "local:N" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: one or the other
        main(["simulate", "mrna_simple", "--workers", "2", "--dask", "local"])
    assert "not allowed with" in capsys.readouterr().err
    assert main(["simulate", "mrna_simple", "-n", "10", "--dask-timeout", "3"]) == 2
    assert "--dask-timeout needs --dask" in capsys.readouterr().err
    with pytest.raises(ValueError, match="not both"):
        simulate_to_store(MrnaSimple(), 10, "unused.h5", workers=2, executor=DaskExecutor("local"))


@pytest.mark.slow
def test_killed_dask_run_resumes(tmp_path: Path) -> None:
    """``simulate --dask local:2`` killed with SIGKILL while it writes chunks: its workers go too, and the rerun ends
    with the single-process store."""
    pytest.importorskip("distributed")
    import psutil  # a dependency of distributed

    n, chunk = 60_000, 500
    ref = simulate_to_store(MrnaSimple(), n, tmp_path / "ref.h5", seed=SEED, chunk_size=chunk, progress=False)
    out = tmp_path / "sims.h5"
    args = ["mrna_simple", "-n", str(n), "--chunk-size", str(chunk), "--seed", str(SEED), "--out", str(out),
            "--dask", "local:2"]
    log = tmp_path / "killed.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "amortized_nlme", "simulate", *args], cwd=REPO, env=_env(),
                                stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 120
        while not re.search(r"[1-9][0-9.]*k?/60\.0k", log.read_text(errors="replace")):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        workers = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, f"worker processes outlived the killed run: {alive}"
    with h5py.File(partial_path(out), "r") as f:
        done = f["chunk_done"][:]
    assert 0 < done.sum() < done.size and not out.exists()
    res = _cli(*args)
    assert res.returncode == 0 and "resuming" in res.stderr, res.stderr[-3000:]
    assert _everything(out) == _everything(ref)

