"""Training stage: store -> train -> save -> load -> sample, resume, safety checks, JAX -> TensorFlow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from amortized_nlme.config import load_workflow
from amortized_nlme.estimator import EstimatorError, TrainedEstimator, train
from simulators import get_model

REPO = Path(__file__).resolve().parent.parent


def tiny_config(mode: str = "online"):
    cfg = load_workflow("mrna_simple")
    cfg.network.recurrent_dim = 8
    cfg.network.summary_dim = 8
    cfg.network.filters = [8, 8]
    cfg.network.flow_depth = 2
    cfg.network.flow_widths = [16, 16]
    cfg.training.mode = mode
    cfg.training.epochs = 2
    cfg.training.steps_per_epoch = 4
    cfg.training.batch_size = 64
    cfg.training.validation_size = 128
    return cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("est") / "mrna_simple"
    assert train(tiny_config(), get_model("mrna_simple"), out, verbose=0)
    return out


def test_export_and_meta(trained: Path) -> None:
    meta = json.loads((trained / "meta.json").read_text())
    assert meta["model"] == {"name": "mrna_simple", "version": "1"}
    assert meta["param_names"] == list(get_model("mrna_simple").param_names)
    assert meta["keras_backend"] == "jax"
    assert meta["training"]["epochs"] == 2
    assert meta["training"]["simulations_seen"] == 2 * 4 * 64
    assert len(meta["training"]["history"]) == 2
    assert len(meta["file_sha256"]) == 64


def test_sample_and_log_prob_consistent(trained: Path) -> None:
    model = get_model("mrna_simple")
    est = TrainedEstimator.load(trained, model)
    rng = np.random.default_rng(3)
    phi = model.prior.sample(5, rng)
    design = model.sample_design(5, rng)
    obs = model.simulate(phi, design, rng)
    draws = est.sample(obs, design, 40, seed=1, batch_size=2)  # batched over individuals
    assert draws.shape == (5, 40, 6)
    assert np.all(np.isfinite(draws))
    # the same draws for the same seed
    np.testing.assert_allclose(draws, est.sample(obs, design, 40, seed=1, batch_size=2))
    lp = est.log_prob(draws, obs, design)
    # our batched log density (summary once per individual) equals BayesFlow's own log_prob on tiled inputs
    enc = model.encode(obs, design)
    ref = est.approximator.log_prob({"phi": draws[2], "encoded": np.repeat(enc[2:3], 40, axis=0)})
    np.testing.assert_allclose(lp[2], ref, rtol=1e-4, atol=1e-4)


def test_version_mismatch_refused(trained: Path) -> None:
    model = get_model("mrna_simple")
    model.version = "999"  # instance attribute shadows the class attribute
    with pytest.raises(EstimatorError, match="trained for"):
        TrainedEstimator.load(trained, model)
    with pytest.raises(EstimatorError, match="not a trained estimator"):
        TrainedEstimator.load(trained.parent, get_model("mrna_simple"))


def test_resume_after_time_budget(tmp_path: Path) -> None:
    cfg = tiny_config()
    cfg.training.epochs = 3
    model = get_model("mrna_simple")
    assert not train(cfg, model, tmp_path, max_minutes=0.0, verbose=0)  # stops after its first epoch
    state = json.loads((tmp_path / "checkpoint" / "state.json").read_text())
    assert state["epoch"] == 1
    assert not (tmp_path / "approximator.keras").exists()
    assert train(cfg, model, tmp_path, verbose=0)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert [h["epoch"] for h in meta["training"]["history"]] == [1, 2, 3]
    # a changed configuration must not silently continue the old checkpoint
    (tmp_path / "approximator.keras").unlink()
    state["epoch"] = 1
    (tmp_path / "checkpoint" / "state.json").write_text(json.dumps(state))
    cfg.training.learning_rate = 1e-2
    with pytest.raises(EstimatorError, match="another model or configuration"):
        train(cfg, model, tmp_path, verbose=0)


def test_offline_training_from_store(tmp_path: Path) -> None:
    from amortized_nlme.simulate import simulate_to_store

    model = get_model("mrna_simple")
    store = simulate_to_store(model, 1200, tmp_path / "sims.h5", seed=5, chunk_size=400, progress=False)
    cfg = tiny_config("offline")
    assert train(cfg, model, tmp_path / "est", store_path=str(store), verbose=0)
    meta = json.loads((tmp_path / "est" / "meta.json").read_text())
    assert meta["training"]["simulations_in_store"] == 1200
    with pytest.raises(EstimatorError, match="needs a simulation store"):
        train(cfg, model, tmp_path / "est2", verbose=0)


def test_jax_estimator_loads_and_samples_under_tensorflow(trained: Path) -> None:
    pytest.importorskip("tensorflow")
    model = get_model("mrna_simple")
    rng = np.random.default_rng(11)
    phi = model.prior.sample(3, rng)
    design = model.sample_design(3, rng)
    obs = model.simulate(phi, design, rng)
    lp_jax = TrainedEstimator.load(trained, model).log_prob(phi[:, None, :], obs, design)
    np.save(trained.parent / "obs.npy", obs)
    np.save(trained.parent / "phi.npy", phi)
    script = textwrap.dedent(f"""
        import numpy as np, keras
        from amortized_nlme.estimator import TrainedEstimator
        from simulators import get_model
        assert keras.backend.backend() == "tensorflow"
        m = get_model("mrna_simple")
        est = TrainedEstimator.load({str(trained)!r}, m)
        obs = np.load({str(trained.parent / "obs.npy")!r}); phi = np.load({str(trained.parent / "phi.npy")!r})
        d = m.sample_design(3, np.random.default_rng(0))
        s = est.sample(obs, d, 20)
        assert s.shape == (3, 20, 6) and np.isfinite(s).all()
        print(repr(est.log_prob(phi[:, None, :], obs, d).ravel().tolist()))
    """)
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"}
    res = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    lp_tf = np.array(eval(res.stdout.strip().splitlines()[-1]))
    np.testing.assert_allclose(lp_tf, lp_jax.ravel(), rtol=1e-4, atol=1e-4)
