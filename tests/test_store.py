"""The HDF5 simulation store and the simulation stage: determinism, resume, failure redraws, reading."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from amortized_nlme import __version__
from amortized_nlme.model import Design, IndividualModel, NormalPrior
from amortized_nlme.simulation import (
    SimulationError,
    compute_chunk,
    simulate_batch,
    simulate_batch_counted,
    simulate_to_store,
)
from amortized_nlme.simulation.store import SimulationStore, StoreError, StoreWriter, partial_path
from simulators.mrna_simple import MrnaSimple

DATASETS = ("params", "observations", "design/times", "design/mask", "chunk_failed")


class LineModel(IndividualModel):
    """Test model: y = a + b t + noise on 5 points, last point observed for about half of the individuals.

    Simulations with a > 1 fail (NaN everywhere); masked points are NaN too, which must not count as a failure.
    """

    name = "test_line"
    version = "1"
    param_names = ("a", "b")
    obs_names = ("y",)
    max_time_points = 5
    fail_above = 1.0

    @property
    def prior(self) -> NormalPrior:
        return NormalPrior(self.param_names, np.zeros(2), np.ones(2))

    def sample_design(self, n: int, rng: np.random.Generator) -> Design:
        T = 5
        times = np.broadcast_to(np.arange(T, dtype=np.float64), (n, T)).copy()
        mask = np.ones((n, T), dtype=bool)
        mask[:, -1] = rng.random(n) < 0.5
        return {"times": times, "mask": mask, "dose": rng.uniform(1.0, 2.0, n)}

    def simulate(self, phi: np.ndarray, design: Design, rng: np.random.Generator) -> np.ndarray:
        phi = self.check_phi(phi)
        y = phi[:, :1] + phi[:, 1:] * design["times"] + 0.1 * rng.standard_normal(design["times"].shape)
        y[phi[:, 0] > self.fail_above] = np.nan
        y[~design["mask"]] = np.nan
        return y[..., None]

    def encode(self, observations: np.ndarray, design: Design) -> np.ndarray:
        return np.concatenate([observations, design["mask"][..., None]], axis=-1).astype(np.float32)

    def from_dataset(self, data):
        raise NotImplementedError("test model has no data reader")


class PaddedLineModel(LineModel):
    """Declares 7 padded time points but its designs have 5: the store pads (mask False, zeros)."""

    name = "test_line_padded"
    max_time_points = 7


class AlwaysFails(LineModel):
    name = "test_always_fails"
    fail_above = -np.inf


class CountingMrna(MrnaSimple):
    """mrna_simple that counts ``simulate`` calls and raises KeyboardInterrupt (a Ctrl-C) after ``fail_after``."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.calls = 0
        self.fail_after = fail_after

    def simulate(self, phi: np.ndarray, design: Design, rng: np.random.Generator) -> np.ndarray:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt
        self.calls += 1
        return super().simulate(phi, design, rng)


class MrnaOtherVersion(MrnaSimple):
    version = "99"


def _contents(path: Path) -> dict[str, bytes]:
    with h5py.File(path, "r") as f:
        return {name: f[name][:].tobytes() for name in DATASETS}


def _run(tmp_path: Path, name: str, model: IndividualModel, n: int = 1000, **kwargs) -> Path:
    kwargs.setdefault("seed", 7)
    kwargs.setdefault("chunk_size", 300)
    return simulate_to_store(model, n, tmp_path / name, progress=False, **kwargs)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted mrna_simple store: N=1000 in chunks of 300 (4 chunks, the last one short)."""
    return _run(tmp_path_factory.mktemp("ref"), "ref.h5", MrnaSimple())


def test_same_seed_same_bytes(tmp_path: Path, reference: Path) -> None:
    again = _run(tmp_path, "again.h5", MrnaSimple())
    assert _contents(again) == _contents(reference)
    other = _run(tmp_path, "other.h5", MrnaSimple(), seed=8)
    assert _contents(other)["params"] != _contents(reference)["params"]
    assert not partial_path(again).exists()


def test_chunks_written_in_any_order_give_the_same_store(tmp_path: Path, reference: Path) -> None:
    model = MrnaSimple()
    writer = StoreWriter(tmp_path / "byindex.h5", model, 1000, 300, seed=7)
    for c in reversed(writer.pending_chunks()):  # as if they came back from workers out of order
        r = compute_chunk(model, 7, c, 1000, 300)
        writer.write_chunk(c, r.params, r.observations, r.design, r.n_failed)
    path = writer.finalize()
    assert _contents(path) == _contents(reference)


def test_process_pool_gives_the_same_store(tmp_path: Path, reference: Path) -> None:
    path = _run(tmp_path, "pool.h5", MrnaSimple(), workers=2)
    assert _contents(path) == _contents(reference)


def test_interrupted_run_resumes_without_recomputing(tmp_path: Path, reference: Path) -> None:
    final = tmp_path / "sims.h5"
    interrupted = CountingMrna(fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, "sims.h5", interrupted)
    assert not final.exists() and partial_path(final).exists()
    with pytest.raises(StoreError, match="unfinished run"):
        SimulationStore(final)
    with h5py.File(partial_path(final), "r") as f:
        assert f["chunk_done"][:].tolist() == [True, True, False, False]

    resumed = CountingMrna()
    path = _run(tmp_path, "sims.h5", resumed)
    assert resumed.calls == 2  # only the two missing chunks were simulated
    assert path == final and not partial_path(final).exists()
    assert _contents(path) == _contents(reference)

    # a finished store with the same settings is reused as is
    reused = CountingMrna()
    assert _run(tmp_path, "sims.h5", reused) == final and reused.calls == 0


@pytest.mark.parametrize(
    ("change", "message"),
    [({"seed": 8}, "seed"), ({"chunk_size": 200}, "chunk_size"), ({"n": 1200}, "n_total"),
     ({"model": MrnaOtherVersion()}, "model_version")],
)
def test_resume_with_other_settings_is_refused(tmp_path: Path, change: dict, message: str) -> None:
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, "sims.h5", CountingMrna(fail_after=1))
    kwargs = {"model": MrnaSimple(), "n": 1000, **change}
    with pytest.raises(StoreError, match=f"refusing to resume.*{message}"):
        _run(tmp_path, "sims.h5", **kwargs)
    assert partial_path(tmp_path / "sims.h5").exists()
    # overwrite discards the stale partial file and starts over
    path = _run(tmp_path, "sims.h5", overwrite=True, **kwargs)
    with SimulationStore(path) as store:
        assert len(store) == kwargs["n"] and store.meta["model_version"] == kwargs["model"].version


def test_existing_store_with_other_settings_is_refused(tmp_path: Path) -> None:
    _run(tmp_path, "sims.h5", LineModel(), n=100)
    with pytest.raises(StoreError, match="already exists"):
        _run(tmp_path, "sims.h5", LineModel(), n=100, seed=8)


def test_failures_are_redrawn_and_counted(tmp_path: Path) -> None:
    model = LineModel()
    path = _run(tmp_path, "line.h5", model, n=2000)
    with SimulationStore(path, model) as store:
        params, obs, design = store.read(0, len(store))
        with h5py.File(path, "r") as f:
            per_chunk = f["chunk_failed"][:]
        # P(a > 1) = 0.16 for a ~ N(0, 1), so ~0.19 N failures including failed redraws
        assert 0.1 * 2000 < store.n_failed < 0.3 * 2000
        assert store.n_failed == per_chunk.sum() == store.meta["n_failed"]
    assert np.all(params[:, 0] <= 1.0)
    assert np.all(np.isfinite(obs))
    mask = design["mask"]
    assert 0.3 < mask[:, -1].mean() < 0.7  # masked NaNs were not treated as failures
    assert np.all(obs[~mask] == 0.0)
    expected = params[:, :1] + params[:, 1:] * design["times"]
    assert np.all(np.abs(obs[..., 0] - expected)[mask] < 1.0)
    assert design["dose"].shape == (2000,) and np.all((design["dose"] >= 1) & (design["dose"] <= 2))

    p, o, d, n_failed = simulate_batch_counted(model, 500, np.random.default_rng(0))
    assert n_failed > 0 and np.all(p[:, 0] <= 1.0) and np.all(np.isfinite(o))
    p2, o2, d2 = simulate_batch(model, 500, np.random.default_rng(0))
    assert np.array_equal(p, p2) and np.array_equal(o, o2) and np.array_equal(d["mask"], d2["mask"])


def test_always_failing_simulator_raises(tmp_path: Path) -> None:
    with pytest.raises(SimulationError, match="after 3 redraw rounds"):
        simulate_batch(AlwaysFails(), 10, np.random.default_rng(0), max_rounds=3)
    with pytest.raises(SimulationError):
        _run(tmp_path, "fails.h5", AlwaysFails(), n=10, max_rounds=2)
    assert not (tmp_path / "fails.h5").exists()


def test_short_designs_are_padded_to_max_time_points(tmp_path: Path) -> None:
    path = _run(tmp_path, "padded.h5", PaddedLineModel(), n=50)
    with SimulationStore(path) as store:
        _, obs, design = store.read(0, 50)
        assert store.observation_shape == (7, 1) and design["times"].shape == (50, 7)
    assert not design["mask"][:, 5:].any() and np.all(obs[:, 5:] == 0)


def test_reading_ranges_indices_and_split(reference: Path) -> None:
    with SimulationStore(reference, MrnaSimple()) as store:
        n = len(store)
        params, obs, design = store.read(0, n)
        assert params.shape == (n, 6) and obs.shape == (n, 180, 1) and obs.dtype == np.float32
        assert store.n_params == 6 and store.param_names == MrnaSimple.param_names
        assert np.array_equal(store.params, params)

        p, o, d = store.read(290, 610)  # spans three chunks
        assert np.array_equal(p, params[290:610]) and np.array_equal(o, obs[290:610])
        assert np.array_equal(d["times"], design["times"][290:610])

        rng = np.random.default_rng(1)
        idx = np.sort(rng.choice(n, 120, replace=False))
        idx = np.unique(np.concatenate([idx, [0, 1, 2, n - 1]]))  # runs, big gaps and both ends
        for max_gap in (1, 64, n):
            p, o, d = store.read_indices(idx, max_gap=max_gap)
            assert np.array_equal(p, params[idx]) and np.array_equal(o, obs[idx])
            assert all(np.array_equal(d[key], design[key][idx]) for key in design)
        assert store.read_indices(np.array([], dtype=int))[1].shape == (0, 180, 1)
        with pytest.raises(ValueError, match="sorted"):
            store.read_indices(np.array([5, 3]))
        with pytest.raises(IndexError):
            store.read_indices(np.array([n]))

        train, val = store.split(0.1)
        assert (train, val) == (range(0, 900), range(900, 1000))
        assert store.split(50)[1] == range(950, 1000)
        with pytest.raises(ValueError):
            store.split(0)


def test_metadata_and_model_check(reference: Path) -> None:
    with SimulationStore(reference) as store:
        meta = store.meta
    assert meta["model_name"] == "mrna_simple" and meta["model_version"] == MrnaSimple.version
    assert meta["prior_spec"] == MrnaSimple().prior.spec()
    assert meta["seed"] == 7 and meta["n_total"] == 1000 and meta["chunk_size"] == 300 and meta["n_chunks"] == 4
    assert meta["package_version"] == __version__ and meta["n_failed"] == 0 and meta["complete"]
    assert "time_utc" in meta["created"] and "host" in meta["created"]
    with pytest.raises(StoreError, match=f"version {MrnaSimple.version}.*version 99"):
        SimulationStore(reference, MrnaOtherVersion())
    with pytest.raises(StoreError, match="'test_line'"):
        SimulationStore(reference, LineModel())
