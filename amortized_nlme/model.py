"""The individual-model contract shared by all three stages.

An individual model maps log-parameters ``phi`` (one row per individual) and a *design* (what else varies between
individuals: sampling times, doses, ...) to observations. Every model in ``simulators/`` subclasses
:class:`IndividualModel`; the simulation store, the estimator and the inference stage only ever talk to this class.

Array conventions (``n`` individuals, ``k`` parameters, ``T`` padded time points, ``d`` observation types):

* ``phi``           float64 ``[n, k]``   log-scale parameters, columns in ``param_names`` order
* ``design``        ``dict[str, ndarray]`` with at least ``times [n, T]`` (float64, padded) and ``mask [n, T]``
                    (bool, True where an observation exists); models add their own entries (e.g. ``dose [n]``)
* ``observations``  float64 ``[n, T, d]`` on the model's observation scale (e.g. log fluorescence), 0 where masked
* ``encode(...)``   float32 ``[n, T, c]`` the summary network's input; real data and simulations both go through it
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from amortized_nlme.data import Dataset

Design = dict[str, np.ndarray]

_LOG_2PI = float(np.log(2.0 * np.pi))


#: residual-error models: sd a (additive), b |f| (proportional), sqrt(a^2 + b^2 f^2) (combined)
RESIDUAL_KINDS = ("additive", "proportional", "combined")


@dataclass(frozen=True)
class ResidualError:
    """Which residual-error model the population fits and the names of its parameters (log sds in theta).

    ``names``: the individual model's names of the sds, in the order (additive, proportional) that ``kind`` uses:
    one name for additive or proportional, two for combined. ``center``/``scale``: log-scale centre and spread used
    for optimisation bounds and start points (``bounds``: centre +- 4 * scale)."""

    kind: str
    names: tuple[str, ...]
    center: tuple[float, ...]
    scale: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.kind not in RESIDUAL_KINDS:
            raise ValueError(f"residual error kind must be one of {RESIDUAL_KINDS}, got {self.kind!r}")
        need = 2 if self.kind == "combined" else 1
        if len(self.names) != need or len(self.center) != need or len(self.scale) != need:
            raise ValueError(f"a {self.kind} residual error has {need} parameter(s), got names {self.names}")

    @property
    def theta_names(self) -> tuple[str, ...]:
        return tuple(f"log_{n}" for n in self.names)

    @property
    def n(self) -> int:
        return len(self.names)

    def sds(self, values: np.ndarray) -> tuple[float, float]:
        """(additive sd, proportional sd) from the log-scale theta values (0 for a part the kind does not have)."""
        v = np.exp(np.asarray(values, dtype=np.float64))
        if self.kind == "additive":
            return float(v[0]), 0.0
        if self.kind == "proportional":
            return 0.0, float(v[0])
        return float(v[0]), float(v[1])

    def to_dict(self) -> dict:
        return {"kind": self.kind, "names": list(self.names), "center": list(self.center), "scale": list(self.scale)}

    @classmethod
    def from_dict(cls, d: dict) -> "ResidualError":
        return cls(d["kind"], tuple(d["names"]), tuple(d["center"]), tuple(d["scale"]))


@dataclass(frozen=True)
class NormalPrior:
    """Independent normal prior on log-parameters; its density is the importance-weight denominator, so it is exact."""

    names: tuple[str, ...]
    mean: np.ndarray
    variance: np.ndarray

    def __post_init__(self) -> None:
        mean = np.asarray(self.mean, dtype=np.float64).reshape(-1)
        var = np.asarray(self.variance, dtype=np.float64).reshape(-1)
        if not (len(self.names) == mean.size == var.size):
            raise ValueError("prior names, mean and variance must have the same length")
        if np.any(var <= 0):
            raise ValueError("prior variances must be positive")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "variance", var)

    @property
    def dim(self) -> int:
        return len(self.names)

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.variance)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Draw ``n`` parameter vectors, shape ``[n, k]``."""
        return self.mean + self.std * rng.standard_normal((n, self.dim))

    def log_prob(self, phi: np.ndarray) -> np.ndarray:
        """Exact log density of ``phi [..., k]``, summed over parameters (one parameter at a time: a sum over a short
        last axis of a large array is slow in numpy, and this runs on every posterior draw)."""
        phi = np.asarray(phi, dtype=np.float64)
        quad = np.zeros(phi.shape[:-1])
        for p in range(phi.shape[-1]):
            z = (phi[..., p] - self.mean[p]) * (1.0 / self.std[p])
            quad += z * z
        return -0.5 * (quad + float(np.sum(np.log(self.variance))) + phi.shape[-1] * _LOG_2PI)

    def subset(self, names: tuple[str, ...] | list[str]) -> "NormalPrior":
        """The marginal prior of some of the parameters (independent, so just those entries)."""
        idx = [self.names.index(n) for n in names]
        return NormalPrior(tuple(names), self.mean[idx], self.variance[idx])

    def spec(self) -> dict[str, Any]:
        """JSON-serializable description, stored with simulations and estimators."""
        return {
            "family": "independent_normal_log",
            "names": list(self.names),
            "mean": self.mean.tolist(),
            "variance": self.variance.tolist(),
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "NormalPrior":
        if spec.get("family") != "independent_normal_log":
            raise ValueError(f"unknown prior family {spec.get('family')!r}")
        return cls(tuple(spec["names"]), np.asarray(spec["mean"]), np.asarray(spec["variance"]))


class IndividualModel(ABC):
    """An individual (subject- or cell-level) model that can be simulated.

    Subclasses set the class attributes and implement the abstract methods. ``simulate`` must be vectorized over
    individuals (numba ``prange`` inside), never a Python loop per individual.
    """

    #: short identifier, used for file names and to match estimators with simulators
    name: str = ""
    #: bump whenever the simulator, prior, design sampler or encoder changes what an estimator learns
    version: str = ""
    #: log-scale parameter names, in column order
    param_names: tuple[str, ...] = ()
    #: number of observation types ``d``
    n_obs_types: int = 1
    #: names of the observation types (e.g. ``("log_fluorescence",)``)
    obs_names: tuple[str, ...] = ("y",)
    #: maximum number of time points ``T`` after padding
    max_time_points: int = 0
    #: unit of the design times, for plot labels
    time_unit: str = ""
    #: residual-error sds among the parameters (log scale), in the order (additive, proportional): with exact
    #: inference, those without random effect become population parameters (see :meth:`residual_error`)
    error_params: tuple[str, ...] = ()
    #: the simulator's residual-error model ("additive", "proportional", "combined"; on the observation scale)
    error_kind: str | None = None
    #: whether the model handles censored observations (BLQ, design entry ``censored``)
    supports_censoring: bool = False

    @property
    @abstractmethod
    def prior(self) -> NormalPrior:
        """The broad training prior p(phi)."""

    @abstractmethod
    def sample_design(self, n: int, rng: np.random.Generator) -> Design:
        """Draw designs for ``n`` simulated individuals (times, mask and model-specific entries)."""

    @abstractmethod
    def simulate(self, phi: np.ndarray, design: Design, rng: np.random.Generator) -> np.ndarray:
        """Simulate noisy observations ``[n, T, d]`` for parameters ``phi [n, k]`` under ``design``."""

    @abstractmethod
    def encode(self, observations: np.ndarray, design: Design) -> np.ndarray:
        """Turn observations + design into the summary network input ``[n, T, c]`` (float32, padded)."""

    @abstractmethod
    def from_dataset(self, data: "Dataset") -> tuple[np.ndarray, Design]:
        """Convert a read data set into ``(observations [n, T, d], design)`` exactly as simulations are laid out."""

    def predict(self, phi: np.ndarray, design: Design) -> np.ndarray:
        """Noise-free model output ``[n, T, d]`` on the observation scale (for fits and predictive checks)."""
        raise NotImplementedError(f"{self.name} does not provide noise-free predictions")

    def log_likelihood(self, phi: np.ndarray, observations: np.ndarray, design: Design) -> np.ndarray:
        """log p(y_i | phi_i) for each row ``[n]``; masked points do not count."""
        raise NotImplementedError(f"{self.name} does not provide an individual likelihood")

    def residual_kinds(self) -> tuple[str, ...]:
        """The residual-error models a population may fit with this model's estimator: the simulator's own when its
        sds are parameters; any of additive/proportional/combined when the estimator integrates the error out."""
        if self.error_params:
            return (self.error_kind,) if self.error_kind else ()
        return ("additive", "proportional", "combined") if self.has_likelihood else ()

    def residual_error(self, kind: str | None = None, observations: np.ndarray | None = None,
                       design: Design | None = None) -> ResidualError:
        """The residual-error parameters of a population fit (``kind`` None: the model's own), with a centre and
        scale for optimisation bounds: the prior's for sds that are parameters; data-derived for models whose
        estimator integrates the residual error out (override :meth:`residual_scale`)."""
        kind = kind or self.error_kind
        if kind not in self.residual_kinds():
            raise ValueError(f"{self.name} supports the residual-error models {list(self.residual_kinds())}, not "
                             f"{kind!r}")
        if self.error_params:
            idx = [self.param_names.index(p) for p in self.error_params]
            return ResidualError(kind, tuple(self.error_params), tuple(float(self.prior.mean[i]) for i in idx),
                                 tuple(float(self.prior.std[i]) for i in idx))
        names = {"additive": ("sigma_add",), "proportional": ("sigma_prop",),
                 "combined": ("sigma_add", "sigma_prop")}[kind]
        center, scale = self.residual_scale(kind, observations, design)
        return ResidualError(kind, names, center, scale)

    def residual_scale(self, kind: str, observations: np.ndarray | None, design: Design | None
                       ) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Log-scale centre and spread of the residual sds (additive in observation units, proportional as a
        fraction), used for bounds and starts: by default 10 % of the typical observed magnitude and 10 %."""
        level = 1.0
        if observations is not None and design is not None:
            y = np.abs(np.asarray(observations)[..., 0][np.asarray(design["mask"], bool)])
            y = y[np.isfinite(y) & (y > 0)]
            level = float(np.median(y)) if y.size else 1.0
        add, prop = (float(np.log(0.1 * level)),), (float(np.log(0.1)),)
        center = {"additive": add, "proportional": prop, "combined": add + prop}[kind]
        return center, (2.5,) * len(center)

    def observation_points(self, observations: np.ndarray, design: Design
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Observations flattened to points for the residual-error likelihood: ``y [n, P]``, ``observed [n, P]``
        and ``censored [n, P]`` (y holds the limit), P = T * d, in the order of ``predict(...).reshape(n, -1)``."""
        obs = np.asarray(observations, dtype=np.float64)
        n, T, d = obs.shape
        mask = np.asarray(design["mask"], dtype=bool)
        observed = np.broadcast_to(mask[..., None] if mask.ndim == 2 else mask, (n, T, d)).reshape(n, -1)
        cens = design.get("censored")
        censored = (np.zeros((n, T * d), dtype=bool) if cens is None else
                    np.broadcast_to(np.asarray(cens, bool)[..., None] if np.ndim(cens) == 2 else np.asarray(cens, bool),
                                    (n, T, d)).reshape(n, -1))
        return obs.reshape(n, -1), observed.copy(), censored & observed

    def parameter_shift(self, observations: np.ndarray, design: Design) -> np.ndarray | None:
        """Per-individual shift ``s [n, k]`` of the log-parameters that the estimator works in: it learns
        q'(phi + s | y) from data the encoder normalised by data-derived scales (units, time scale), so that
        q(phi | y) = q'(phi + s | y) exactly (a shift has unit Jacobian). None (the default): no normalisation."""
        return None

    def data_prior(self, observations: np.ndarray, design: Design) -> NormalPrior:
        """The training prior expressed in the data's units (bounds and start points of population fits): the prior
        itself, or for normalising models the prior shifted back by the individuals' median shift."""
        shift = self.parameter_shift(observations, design)
        if shift is None:
            return self.prior
        return NormalPrior(self.prior.names, self.prior.mean - np.median(shift, axis=0), self.prior.variance)

    @property
    def has_likelihood(self) -> bool:
        """Whether the model has a tractable individual likelihood (then inference can use exact weights)."""
        own = type(self).log_likelihood is not IndividualModel.log_likelihood
        # models whose estimator integrates the residual error out: predictions + a population residual error
        integrated = not self.error_params and type(self).predict is not IndividualModel.predict
        return own or integrated

    def design_description(self) -> str:
        """What designs the model's estimator is trained on (shown by ``amortized-nlme models``)."""
        return ""

    def mirror_map(self) -> np.ndarray | None:
        """A linear involution A of the log-parameters (|det A| = 1) under which individual likelihoods can be
        identical (p(y | A phi) = p(y | phi) for the designs where it holds, e.g. flip-flop in oral PK): proposal
        refinement then covers both images of every mode, so a fit cannot miss the other branch because its draws
        never went there. Default: None."""
        return None

    def typical_value_warnings(self, typical: dict[str, float]) -> list[str]:
        """Warnings about a fitted population's typical individual (natural-scale parameter values by name, those
        the population estimates), e.g. a known non-identifiability the data cannot resolve. Default: none."""
        return []

    @property
    def n_params(self) -> int:
        return len(self.param_names)

    def identity(self) -> dict[str, str]:
        """Name and version, checked when an estimator is loaded for this model."""
        return {"name": self.name, "version": self.version}

    def check_phi(self, phi: np.ndarray) -> np.ndarray:
        """Validate and return ``phi`` as float64 ``[n, k]``."""
        phi = np.ascontiguousarray(phi, dtype=np.float64)
        if phi.ndim != 2 or phi.shape[1] != self.n_params:
            raise ValueError(f"{self.name}: expected parameters of shape [n, {self.n_params}], got {phi.shape}")
        return phi


def fixed_grid_design(n: int, times: np.ndarray) -> Design:
    """Design with the same observation grid for every individual (e.g. 180 time-lapse frames)."""
    times = np.asarray(times, dtype=np.float64)
    return {
        "times": np.broadcast_to(times, (n, times.size)).copy(),
        "mask": np.ones((n, times.size), dtype=bool),
    }


def take_design(design: Design, index: np.ndarray | slice) -> Design:
    """Rows ``index`` of every design array (all design arrays have individuals on axis 0)."""
    return {key: value[index] for key, value in design.items()}
