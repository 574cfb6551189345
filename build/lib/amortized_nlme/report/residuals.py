"""The residual error of the fitted model: the one place the report turns predictions into observations and back.

Every use of the residual error in the results folder goes through this module: the individual weighted residuals
(IWRES = (DV - IPRED) / sd at IPRED) and the simulated observations behind NPDE and the VPCs. The residual error is
described by a :class:`ResidualError` (kind and sds, scalars or one value per individual). Where it comes from:

1. ``residual=`` given to :func:`amortized_nlme.report.write_results` (e.g. built by the inference stage);
2. otherwise population parameters of the fit named ``log_sigma_add`` / ``log_sigma_prop`` (log sds;
   :meth:`ResidualError.from_population`);
3. otherwise individual parameters of the model named ``sigma`` / ``sigma_add`` (additive sd, log scale) and
   ``sigma_prop`` (proportional sd, log scale), as in every shipped simulator today (:func:`individual_residual_error`);
   the error then varies with each individual's parameters and simulations use the model's own ``simulate``;
4. otherwise a Monte-Carlo estimate of the sd from the model's ``simulate`` (:func:`monte_carlo_residual_sd`).

With a :class:`ResidualError` that is not individual (cases 1 and 2), observations are simulated as
``predict(phi) + sd(predict(phi)) * z``; without one, by the model's own ``simulate``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from amortized_nlme.model import Design, IndividualModel, take_design

logger = logging.getLogger(__name__)

KINDS = ("additive", "proportional", "combined", "combined1")
#: individual (log-scale) parameter names read as residual sds by :func:`individual_residual_error`
ADDITIVE_NAMES = ("sigma", "sigma_add")
PROPORTIONAL_NAMES = ("sigma_prop",)
#: population parameter names read by :meth:`ResidualError.from_population`
POPULATION_ADDITIVE = "log_sigma_add"
POPULATION_PROPORTIONAL = "log_sigma_prop"


@dataclass(frozen=True)
class ResidualError:
    """Gaussian residual error on the observation scale, sd as a function of the noise-free prediction f:

    * ``additive``: a;  ``proportional``: b |f|;  ``combined``: sqrt(a^2 + b^2 f^2) (Monolix combined2, NONMEM's
      usual additive + proportional); ``combined1``: a + b |f| (Monolix combined1).

    ``add`` and ``prop`` are sds on the natural scale: scalars, one value per observation type ``[d]``, or one per
    individual ``[n]`` / ``[n, d]`` (when the error is an individual parameter). ``individual`` says that the values
    came from the individuals' own parameters (then simulations use the model's ``simulate``, which draws them with
    the parameters)."""

    kind: str
    add: np.ndarray | float = 0.0
    prop: np.ndarray | float = 0.0
    individual: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"residual error kind must be one of {KINDS}, got {self.kind!r}")
        object.__setattr__(self, "add", np.asarray(self.add, dtype=np.float64))
        object.__setattr__(self, "prop", np.asarray(self.prop, dtype=np.float64))
        if np.any(self.add < 0) or np.any(self.prop < 0):
            raise ValueError("residual sds must be non-negative")

    def _shape(self, v: np.ndarray, like: np.ndarray) -> np.ndarray:
        """Broadcast a scalar, ``[d]`` (shared) or ``[n]`` / ``[n, d]`` (individual) value against ``[n, T, d]``."""
        if v.ndim == 0:
            return v
        if not self.individual:
            return v.reshape(1, 1, -1)
        return v[:, None, None] if v.ndim == 1 else v[:, None, :]

    def sd(self, pred: np.ndarray) -> np.ndarray:
        """Residual sd at the predictions ``pred [n, T, d]`` (same shape)."""
        pred = np.asarray(pred, dtype=np.float64)
        a = self._shape(self.add, pred)
        b = self._shape(self.prop, pred)
        if self.kind == "additive":
            out = a + 0.0 * pred
        elif self.kind == "proportional":
            out = b * np.abs(pred)
        elif self.kind == "combined":
            out = np.sqrt(a * a + (b * pred) ** 2)
        else:
            out = a + b * np.abs(pred)
        return np.broadcast_to(out, pred.shape)

    def take(self, index: np.ndarray | slice) -> ResidualError:
        """The error of individuals ``index`` (per-individual values subset, shared values kept)."""
        def pick(v: np.ndarray) -> np.ndarray:
            return v[index] if self.individual and v.ndim >= 1 else v
        return ResidualError(self.kind, pick(self.add), pick(self.prop), self.individual)

    def describe(self) -> dict:
        """Plain description for summary.json."""
        out: dict = {"kind": self.kind, "source": "individual parameters" if self.individual else "population"}
        for key, v in (("add", self.add), ("prop", self.prop)):
            if self.kind in ({"additive", "combined", "combined1"} if key == "add" else
                             {"proportional", "combined", "combined1"}):
                out[key] = float(v) if v.ndim == 0 else (f"per individual (median {float(np.median(v)):.4g})"
                                                         if self.individual else v.tolist())
        return out

    @classmethod
    def from_population(cls, parameter_names: Sequence[str], theta: np.ndarray) -> ResidualError | None:
        """The residual error held by population parameters ``log_sigma_add`` / ``log_sigma_prop`` (log sds), or
        None when the fit has neither."""
        names = list(parameter_names)
        theta = np.asarray(theta, dtype=np.float64)
        a = float(np.exp(theta[names.index(POPULATION_ADDITIVE)])) if POPULATION_ADDITIVE in names else None
        b = float(np.exp(theta[names.index(POPULATION_PROPORTIONAL)])) if POPULATION_PROPORTIONAL in names else None
        if a is None and b is None:
            return None
        kind = "combined" if a is not None and b is not None else ("additive" if a is not None else "proportional")
        return cls(kind, a or 0.0, b or 0.0, individual=False)


def individual_residual_error(model: IndividualModel, phi: np.ndarray) -> ResidualError | None:
    """The residual error carried by the individual parameters ``phi [n, k]`` (log sds named ``sigma``/``sigma_add``
    and ``sigma_prop``), or None when the model has no such parameter. The combined form is sqrt(a^2 + b^2 f^2), as
    in the shipped PK simulator."""
    names = list(model.param_names)
    phi = np.asarray(phi, dtype=np.float64)
    add = next((names.index(p) for p in ADDITIVE_NAMES if p in names), None)
    prop = next((names.index(p) for p in PROPORTIONAL_NAMES if p in names), None)
    if add is None and prop is None:
        return None
    a = np.exp(phi[:, add]) if add is not None else 0.0
    b = np.exp(phi[:, prop]) if prop is not None else 0.0
    kind = "combined" if add is not None and prop is not None else ("additive" if add is not None else "proportional")
    return ResidualError(kind, a, b, individual=True)


def individual_predictions(model: IndividualModel, phi: np.ndarray, design: Design, block: int = 4096
                           ) -> np.ndarray:
    """Noise-free predictions ``[n, T, d]`` at one parameter vector per individual (PRED at the typical values,
    IPRED at the conditional means), computed in blocks of individuals; NaN where masked (everywhere when the model
    has no ``predict``)."""
    phi = np.asarray(phi, dtype=np.float64)
    n = phi.shape[0]
    mask = np.asarray(design["mask"], dtype=bool)
    try:
        parts = [model.predict(phi[a:a + block], take_design(design, slice(a, a + block)))
                 for a in range(0, n, block)]
    except NotImplementedError:
        logger.warning("%s has no noise-free predictions: PRED, IPRED and residuals are NaN", model.name)
        return np.full((*mask.shape, model.n_obs_types), np.nan)
    pred = np.concatenate(parts, axis=0).astype(np.float64)
    return np.where(mask[..., None], pred, np.nan)


def monte_carlo_residual_sd(model: IndividualModel, phi: np.ndarray, design: Design, rng: np.random.Generator,
                            n_replicates: int = 200, block: int = 256) -> np.ndarray:
    """Residual sd ``[n, T, d]`` at ``phi``: the sd of ``n_replicates`` simulations of the model at ``phi`` (for
    models whose residual error is not among the recognised parameters; about 5% relative error at 200)."""
    phi = np.asarray(phi, dtype=np.float64)
    n = phi.shape[0]
    out = []
    for a in range(0, n, block):
        idx = np.arange(a, min(n, a + block))
        rep = take_design(design, np.tile(idx, n_replicates))
        sim = np.asarray(model.simulate(np.tile(phi[idx], (n_replicates, 1)), rep, rng), dtype=np.float64)
        sim = sim.reshape(n_replicates, idx.size, *sim.shape[1:])
        out.append(np.nanstd(sim, axis=0, ddof=1))
    return np.concatenate(out, axis=0)


def resolve_residual(model: IndividualModel, parameter_names: Sequence[str], theta: np.ndarray,
                     residual: ResidualError | None) -> ResidualError | None:
    """The population-level residual error to use: ``residual`` if given, else the fit's ``log_sigma_*`` parameters,
    else None (the error lives in the individual parameters or only in the model's ``simulate``)."""
    if residual is not None:
        return residual
    return ResidualError.from_population(parameter_names, theta)


def residual_sd(model: IndividualModel, phi: np.ndarray, design: Design, pred: np.ndarray,
                residual: ResidualError | None, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """Residual sd ``[n, T, d]`` at predictions ``pred`` made from ``phi`` and a phrase saying where it came from."""
    if not np.isfinite(pred).any():
        return np.full(pred.shape, np.nan), "none (the model has no noise-free predictions)"
    if residual is not None and not residual.individual:
        return residual.sd(pred), f"population residual error ({residual.kind})"
    own = residual if residual is not None else individual_residual_error(model, phi)
    if own is not None:
        return own.sd(pred), f"individual residual parameters ({own.kind})"
    logger.info("residual sd of %s estimated by simulation (no recognised residual-error parameter)", model.name)
    return monte_carlo_residual_sd(model, phi, design, rng), "Monte-Carlo estimate from the model's simulate"


def simulate_observations(model: IndividualModel, phi: np.ndarray, design: Design, rng: np.random.Generator,
                          residual: ResidualError | None = None) -> np.ndarray:
    """Observations ``[n, T, d]`` simulated at ``phi [n, k]``: the model's own ``simulate`` when ``residual`` is None
    (or individual), else the noise-free prediction plus Gaussian noise of ``residual.sd`` (0 where masked, as the
    model's simulate)."""
    if residual is None or residual.individual:
        return model.simulate(phi, design, rng)
    pred = np.asarray(model.predict(phi, design), dtype=np.float64)
    y = pred + residual.sd(pred) * rng.standard_normal(pred.shape)
    return np.where(np.asarray(design["mask"], dtype=bool)[..., None], y, 0.0)


def residual_description(residual: ResidualError | None, model: IndividualModel) -> Mapping[str, object]:
    """What summary.json says about the residual error used for IWRES and simulations."""
    if residual is not None and not residual.individual:
        return residual.describe()
    names = [p for p in (*ADDITIVE_NAMES, *PROPORTIONAL_NAMES) if p in model.param_names]
    if names:
        return {"source": "individual parameters", "parameters": names,
                "simulation": f"{model.name}.simulate"}
    return {"source": f"{model.name}.simulate (sd estimated by simulation for IWRES)"}
