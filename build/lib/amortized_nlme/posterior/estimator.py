"""A trained estimator as inference uses it: load ``trained_models/<model>/`` (under JAX or TensorFlow), verify it is
the file its ``meta.json`` describes and made for this model, and draw posterior samples and evaluate posterior
log-densities for batches of individuals.

The artifact: ``approximator.keras`` (a BayesFlow 2 approximator: the model's encoder output as summary variables,
log-parameters standardized by the prior inside its adapter) and ``meta.json`` (model identity, parameter names,
prior, encoder, network and training configuration, package versions, diagnostics, and the sha256 of the
approximator file, checked at every load).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")

import numpy as np  # noqa: E402

from amortized_nlme.errors import ConfigError, EstimatorError  # noqa: E402
from amortized_nlme.model import Design, IndividualModel, NormalPrior  # noqa: E402
from amortized_nlme.posterior.compiled import (  # noqa: E402
    GROUP_ROWS, NOISE_BLOCK, NOISE_TAG, CompiledFlow)
from amortized_nlme.provenance import file_sha256, read_json  # noqa: E402

logger = logging.getLogger(__name__)

APPROXIMATOR_FILE = "approximator.keras"
META_FILE = "meta.json"
#: keys of the data dict the approximator's adapter expects
PARAM_KEY = "phi"
SUMMARY_KEY = "encoded"


def _keras():
    import keras

    return keras


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
        self._compiled_flow: CompiledFlow | None = None
        self._sha256 = ""

    @classmethod
    def load(cls, path: str | os.PathLike, model: IndividualModel) -> "TrainedEstimator":
        """Load ``path`` (a ``trained_models/<model>`` folder) for ``model``.

        Refused with an :class:`EstimatorError` that names the file: a missing folder or file, an invalid
        ``meta.json``, an estimator made for another model or model version, an ``approximator.keras`` whose sha256
        is not the one recorded in ``meta.json`` (replaced or modified after training), and a file Keras cannot load
        (truncated, corrupted, not an estimator)."""
        folder = Path(path)
        meta = read_meta(folder)
        if meta.get("model") != model.identity():
            raise EstimatorError(
                f"estimator {folder} was trained for {meta.get('model')}, but the simulator is {model.identity()}; "
                "retrain it for this model version")
        file = folder / APPROXIMATOR_FILE
        actual = _sha256_of(file)
        recorded = meta.get("file_sha256")
        if not recorded:
            raise EstimatorError(f"{folder / META_FILE} records no file_sha256 for {APPROXIMATOR_FILE}; cannot verify "
                                 "the estimator (export it again with `amortized-nlme train`)")
        if actual != recorded:
            raise EstimatorError(
                f"{file} does not match {folder / META_FILE} (its sha256 is {actual[:12]}..., {META_FILE} records "
                f"{str(recorded)[:12]}... from training): the file was replaced or modified after training; restore "
                "it or retrain")
        approximator = load_approximator(file)
        if _sha256_of(file) != actual:  # replaced while Keras read it: what was loaded is not what was verified
            raise EstimatorError(f"{file} changed while it was being loaded (another process is writing the "
                                 "estimator?); run again when it is finished")
        estimator = cls(approximator, model, meta, folder)
        estimator._sha256 = actual
        return estimator

    @property
    def sha256(self) -> str:
        """sha256 of the approximator file actually loaded (keys caches and is recorded with results)."""
        return self._sha256 or self.meta.get("file_sha256", "")

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
        out = self._sample_encoded(encoded, n_draws, seed, progress, batch_size)  # in the network's parameter space
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
        shift = self.model.parameter_shift(observations, design)
        if shift is not None:  # back from the normalised parameters the network learned to the data's units
            out -= shift[:, None, :]
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

    def summaries(self, observations: np.ndarray, design: Design, *, batch_size: int = 512) -> np.ndarray:
        """The summary network's output ``[n, summary_dim]`` for each individual (what the flow is conditioned on;
        used to tell individuals unlike anything seen in training)."""
        encoded = self.encode(observations, design)
        flow = self._compiled()
        if flow is not None:
            return np.asarray(flow.summarize(self._summary_variables(encoded)), dtype=np.float64)
        keras = _keras()
        parts = [np.asarray(keras.ops.convert_to_numpy(self.approximator.summarize({SUMMARY_KEY: encoded[a:a + batch_size]})))
                 for a in range(0, encoded.shape[0], batch_size)]
        return np.concatenate(parts).astype(np.float64)

    def log_prob(self, phi: np.ndarray, observations: np.ndarray, design: Design, *, batch_size: int = 256
                 ) -> np.ndarray:
        """log q(phi_ij | y_i) for draws ``phi [n, M, k]``: the summary is computed once per individual
        (``batch_size``, individuals per call, applies to the BayesFlow path only)."""
        keras = _keras()
        phi = np.asarray(phi, dtype=np.float64)
        n, M, k = phi.shape
        encoded = self.encode(observations, design)
        shift = self.model.parameter_shift(observations, design)
        if shift is not None:
            phi = phi + shift[:, None, :]
        prior = self.model.prior
        z = ((phi - prior.mean) / prior.std).astype(np.float32)
        log_det = -float(np.sum(np.log(prior.std)))
        out = np.empty((n, M))
        flow = self._compiled()
        if flow is not None:
            if n * M == 0:
                return out
            flow.warm_up(encoded.shape[1:], self._summary_dim(flow, encoded), k, ("log_prob",))
            group = max(1, GROUP_ROWS // M)
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

    def _compiled(self) -> CompiledFlow | None:
        """The compiled networks, or None where the BayesFlow path must be used (other backend, other networks)."""
        if not self.use_jit:
            return None
        if self._compiled_flow is None:
            reason = CompiledFlow.unsupported_reason(self.approximator)
            if reason is not None:
                logger.debug("posterior sampling through BayesFlow: %s", reason)
                self.use_jit = False
                return None
            self._compiled_flow = CompiledFlow(self.approximator)
        return self._compiled_flow

    def _summary_variables(self, encoded: np.ndarray) -> np.ndarray:
        """The summary network's input, through the estimator's own adapter (as in ``approximator.sample``)."""
        adapted = self.approximator.adapter({SUMMARY_KEY: encoded}, strict=False)
        return np.asarray(adapted["summary_variables"], dtype=np.float32)

    @staticmethod
    def _summary_dim(flow: CompiledFlow, encoded: np.ndarray) -> int | None:
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
        ``NOISE_BLOCK`` individuals comes from ``default_rng([tag, seed, b])``, whatever the batching."""
        b0, b1 = start // NOISE_BLOCK, -(-stop // NOISE_BLOCK)
        blocks = [np.random.default_rng([NOISE_TAG, seed, b]).standard_normal((NOISE_BLOCK, n_draws, dim),
                                                                                 dtype=np.float32)
                  for b in range(b0, b1)]
        eps = np.concatenate(blocks) if len(blocks) > 1 else blocks[0]
        return eps[start - b0 * NOISE_BLOCK:stop - b0 * NOISE_BLOCK]

    def _draws_from_noise(self, flow: CompiledFlow, encoded: np.ndarray, eps: np.ndarray, progress=None
                          ) -> np.ndarray:
        """Posterior draws ``[n, M, k]`` (unstandardized log-parameters) of the latent noise ``eps [n, M, k]``."""
        n, M, k = eps.shape
        summaries = flow.summarize(self._summary_variables(encoded))
        x = flow.inverse(np.repeat(summaries, M, axis=0), eps.reshape(-1, k), progress=progress)
        # the adapter's inverse (standardized by the prior), in float64
        prior = self.model.prior
        return x.reshape(n, M, k).astype(np.float64) * prior.std + prior.mean

    def _sample_compiled(self, flow: CompiledFlow, encoded: np.ndarray, n_draws: int, seed: int | None,
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
        group = max(NOISE_BLOCK, GROUP_ROWS // n_draws // NOISE_BLOCK * NOISE_BLOCK)
        for g0 in range(0, n, group):
            g1 = min(n, g0 + group)
            eps = self._latent_noise(noise_seed, g0, g1, n_draws, k)
            out[g0:g1] = self._draws_from_noise(flow, encoded[g0:g1], eps, progress=bar.update if bar else None)
        if bar is not None:
            bar.close()
        return out


def read_meta(folder: str | os.PathLike) -> dict:
    """The ``meta.json`` of an estimator folder; a missing folder or file or invalid JSON is an
    :class:`EstimatorError` naming the file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EstimatorError(f"{folder}: no such estimator folder (train one with `amortized-nlme train`, or see "
                             "`amortized-nlme models` for the shipped ones)")
    missing = [f for f in (APPROXIMATOR_FILE, META_FILE) if not (folder / f).is_file()]
    if missing:
        raise EstimatorError(f"{folder} is not a trained estimator: {' and '.join(missing)} missing")
    try:
        meta = read_json(folder / META_FILE, "estimator metadata")
    except ConfigError as exc:
        raise EstimatorError(str(exc)) from None
    if not isinstance(meta, dict):
        raise EstimatorError(f"{folder / META_FILE}: expected a JSON object, got {type(meta).__name__}")
    return meta


def _sha256_of(file: Path) -> str:
    try:
        return file_sha256(file)
    except OSError as exc:
        raise EstimatorError(f"{file}: cannot read the estimator ({exc.strerror or exc})") from None


def load_approximator(file: str | os.PathLike):
    """``keras.saving.load_model`` in safe mode with BayesFlow's classes registered; any failure (truncated or corrupted
    archive, missing weights, not a Keras file) is an :class:`EstimatorError` naming the file."""
    keras = _keras()
    import bayesflow  # noqa: F401 - registers BayesFlow's serializable classes before Keras deserializes

    file = Path(file)
    try:
        return keras.saving.load_model(file, safe_mode=True)
    except Exception as exc:  # noqa: BLE001 - Keras raises many kinds here (zipfile, h5py OSError, TypeError, ...)
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise EstimatorError(f"{file}: cannot load the estimator ({type(exc).__name__}: {detail}); the file is "
                             "truncated, corrupted or not a Keras estimator: restore it or retrain") from None


def load_estimator(path: str | os.PathLike, model: IndividualModel) -> TrainedEstimator:
    """Shorthand for :meth:`TrainedEstimator.load`."""
    return TrainedEstimator.load(path, model)
