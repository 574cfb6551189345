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
from amortized_nlme.errors import EstimatorError
from amortized_nlme.posterior import TrainedEstimator
from amortized_nlme.training import latest_checkpoint, train
from amortized_nlme.model import take_design
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
    assert meta["model"] == get_model("mrna_simple").identity() == {"name": "mrna_simple", "version": "2"}
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
    state_file = latest_checkpoint(tmp_path / "checkpoint") / "state.json"
    state = json.loads(state_file.read_text())
    assert state["epoch"] == 1
    assert not (tmp_path / "approximator.keras").exists()
    assert train(cfg, model, tmp_path, verbose=0)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert [h["epoch"] for h in meta["training"]["history"]] == [1, 2, 3]
    # a changed configuration must not silently continue the old checkpoint
    (tmp_path / "approximator.keras").unlink()
    state["epoch"] = 1
    (latest_checkpoint(tmp_path / "checkpoint") / "state.json").write_text(json.dumps(state))
    cfg.training.learning_rate = 1e-2
    with pytest.raises(EstimatorError, match="another model or configuration"):
        train(cfg, model, tmp_path, verbose=0)


def test_offline_training_from_store(tmp_path: Path) -> None:
    from amortized_nlme.simulation import simulate_to_store

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
        from amortized_nlme.posterior import TrainedEstimator
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


# ----------------------------------------------------------------------------------------------------------------
# the compiled (jax.jit) inference path against BayesFlow's own sampling and densities


def _population(model, n: int, seed: int):
    rng = np.random.default_rng(seed)
    phi = model.prior.sample(n, rng)
    design = model.sample_design(n, rng)
    return phi, model.simulate(phi, design, rng), design


def test_compiled_path_reproduces_bayesflow_sample_given_its_latent_noise(trained: Path) -> None:
    import jax
    import jax.numpy as jnp

    model = get_model("mrna_simple")
    est = TrainedEstimator.load(trained, model)
    flow = est._compiled()
    assert flow is not None  # the tiny estimator is eligible under JAX
    _, obs, design = _population(model, 5, 21)
    enc = model.encode(obs, design)
    n_draws, seed = 37, 13  # 5 * 37 rows: not a multiple of the compiled call size, so the last call is padded
    ref = est.approximator.sample(num_samples=n_draws, conditions={"encoded": enc}, seed=seed)["phi"]
    # BayesFlow draws its latent normals with keras.random.normal(seed=SeedGenerator(seed)), whose first key under
    # JAX is [seed, 0]: the same noise through our compiled networks must give the same draws
    eps = np.asarray(jax.random.normal(jnp.array([seed, 0], dtype=jnp.uint32), (5 * n_draws, 6)))
    fast = est._draws_from_noise(flow, enc, eps.reshape(5, n_draws, 6))
    assert fast.shape == (5, n_draws, 6) and fast.dtype == np.float64
    np.testing.assert_allclose(fast, ref, rtol=1e-5, atol=1e-5)
    # ... and equal the network's own inverse called directly, independently of how BayesFlow seeds its noise
    summaries = np.asarray(est.approximator.summarize({"encoded": enc}))
    x = est.approximator.inference_network(eps, conditions=np.repeat(summaries, n_draws, axis=0), inverse=True)
    direct = est.approximator.adapter({"inference_variables": np.asarray(x)}, inverse=True, strict=False)["phi"]
    np.testing.assert_allclose(fast, np.asarray(direct).reshape(5, n_draws, 6), rtol=1e-5, atol=1e-5)


def test_compiled_sample_is_seeded_and_matches_bayesflow_draws(trained: Path) -> None:
    model = get_model("mrna_simple")
    est = TrainedEstimator.load(trained, model)
    _, obs, design = _population(model, 3, 22)
    fast = est.sample(obs, design, 4000, seed=5)
    assert fast.shape == (3, 4000, 6) and np.all(np.isfinite(fast))
    # same seed -> same draws, whatever the batch size; another seed or no seed -> other draws
    np.testing.assert_array_equal(fast, est.sample(obs, design, 4000, seed=5, batch_size=1))
    assert not np.allclose(fast, est.sample(obs, design, 4000, seed=6))
    assert not np.allclose(est.sample(obs, design, 50), est.sample(obs, design, 50))
    # the draws of an individual do not depend on how many individuals are sampled with it
    np.testing.assert_array_equal(fast[:2], est.sample(obs[:2], take_design(design, slice(0, 2)), 4000, seed=5))
    est.use_jit = False
    ref = est.sample(obs, design, 4000, seed=5)
    # the same distribution: means agree within Monte-Carlo error (5 standard errors) and standard deviations within
    # 10% (4000 draws each: the standard deviation's relative error is about 1.1%)
    se = np.sqrt(fast.var(axis=1) / 4000 + ref.var(axis=1) / 4000)
    assert np.all(np.abs(fast.mean(axis=1) - ref.mean(axis=1)) < 5 * se)
    np.testing.assert_allclose(fast.std(axis=1), ref.std(axis=1), rtol=0.1)
    assert np.all(np.abs(np.corrcoef(fast[0].T) - np.corrcoef(ref[0].T)) < 0.1)


def test_compiled_log_prob_matches_bayesflow(trained: Path) -> None:
    model = get_model("mrna_simple")
    est = TrainedEstimator.load(trained, model)
    _, obs, design = _population(model, 4, 23)
    draws = est.sample(obs, design, 300, seed=2)
    lp = est.log_prob(draws, obs, design)
    assert lp.shape == (4, 300)
    enc = model.encode(obs, design)
    for i in (0, 3):
        ref = est.approximator.log_prob({"phi": draws[i], "encoded": np.repeat(enc[i:i + 1], 300, axis=0)})
        np.testing.assert_allclose(lp[i], ref, rtol=1e-4, atol=1e-4)
    est.use_jit = False
    np.testing.assert_allclose(lp, est.log_prob(draws, obs, design), rtol=1e-4, atol=1e-4)


class _OutlierEstimator(TrainedEstimator):
    """Untruncated draws are standard normal around the prior mean, except that the first call puts absurd values
    (1e6 prior sds, NaN) into a few known slots, as an affine coupling flow occasionally does."""

    def __init__(self, model) -> None:
        super().__init__(approximator=None, model=model, meta={})
        self.calls = 0
        self.planted: list[tuple[int, int]] = []

    def _sample_encoded(self, encoded, n_draws, seed, progress, batch_size):
        rng = np.random.default_rng([0 if seed is None else seed, self.calls])
        prior = self.model.prior
        out = prior.mean + prior.std * rng.standard_normal((encoded.shape[0], n_draws, self.model.n_params))
        if self.calls == 0:
            self.planted = [(0, 3), (2, 0), (2, 1), (5, 7)]
            for i, (row, j) in enumerate(self.planted):
                out[row, j, i % self.model.n_params] = np.nan if i == 1 else prior.mean[0] + 1e6 * prior.std[0]
        self.calls += 1
        return out


def test_draws_outside_the_prior_support_are_redrawn() -> None:
    from amortized_nlme.posterior import SUPPORT_SD
    from amortized_nlme.simulation import simulate_batch

    model = get_model("pk_oral_1cmt")
    _, obs, design = simulate_batch(model, 6, np.random.default_rng(1))
    est = _OutlierEstimator(model)
    draws = est.sample(obs, design, 10, seed=3)
    reference = _OutlierEstimator(model)._sample_encoded(np.zeros((6, 1)), 10, 3, False, 0)  # same first call
    prior = model.prior
    assert np.all(np.isfinite(draws)) and np.all(np.abs(draws - prior.mean) <= SUPPORT_SD * prior.std)
    assert est.last_replaced == len(est.planted)
    planted = np.zeros((6, 10), bool)
    for row, j in est.planted:
        planted[row, j] = True
    np.testing.assert_array_equal(draws[~planted], reference[~planted])  # nothing else touched
    assert not np.allclose(draws[planted], reference[planted], equal_nan=True)


@pytest.mark.parametrize("rate", [0.0, 0.05])
def test_flow_dropout_follows_the_config(rate: float) -> None:
    """BayesFlow's coupling MLPs default to dropout 0.05, which over-disperses narrow posteriors: the workflow's
    ``flow_dropout`` (0 by default) must be what the flow gets."""
    import keras

    from amortized_nlme.config import NetworkConfig
    from amortized_nlme.training.networks import build_approximator
    from amortized_nlme.training.trainer import _first_batch

    model = get_model("pk_oral_1cmt")
    cfg = NetworkConfig(flow_dropout=rate, flow_widths=[16, 16], flow_depth=2, summary_dim=8, recurrent_dim=8,
                        filters=[8, 8])
    assert NetworkConfig().flow_dropout == 0.0
    approximator = build_approximator(model, cfg)
    approximator.build_from_data(_first_batch(model, approximator))
    rates = [la.rate for la in approximator.inference_network._flatten_layers()
             if isinstance(la, keras.layers.Dropout)]
    assert (rates == []) if rate == 0 else (len(rates) > 0 and set(rates) == {rate})
