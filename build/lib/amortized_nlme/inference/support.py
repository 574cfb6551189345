"""Is an individual like the simulations the estimator was trained on? Two checks, per individual:

* **design**: its design features (number of observations, first and last observation time, and whatever the model
  adds, e.g. number of doses) against the range of the model's training design sampler;
* **summary space**: the Mahalanobis distance of its summary-network output from reference simulations of the model
  (prior x training designs), flagged beyond the reference's own 99.9 % quantile.

A flagged individual is not refused: with exact weights its estimate stays unbiased when the proposal still covers
(its k̂ says so), but the estimator had no training data like it, so the result lists it and its status warns.
The reference statistics are computed once per estimator file and cached in the user cache directory.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from amortized_nlme.model import Design, IndividualModel
from amortized_nlme.simulation import simulate_batch

logger = logging.getLogger(__name__)

N_REFERENCE = 2000
REFERENCE_QUANTILE = 0.999
#: designs drawn from the training design sampler to get its feature ranges
N_DESIGNS = 5000
#: continuous design features may exceed the training range by this fraction of its width before they are flagged
RANGE_SLACK = 0.05
#: design features that are counts (no slack)
COUNT_FEATURES = ("observations", "doses")


def design_features(model: IndividualModel, design: Design) -> dict[str, np.ndarray]:
    """Per-individual design features: the model's own (``model.design_features``) or the generic ones."""
    own = getattr(model, "design_features", None)
    if callable(own):
        return own(design)
    mask = np.asarray(design["mask"], dtype=bool)
    if mask.ndim == 3:
        mask = mask.any(axis=2)
    t = np.asarray(design["times"], dtype=np.float64)
    n_obs = mask.sum(axis=1).astype(np.float64)
    first = np.where(mask.any(axis=1), np.min(np.where(mask, t, np.inf), axis=1), np.nan)
    last = np.where(mask.any(axis=1), np.max(np.where(mask, t, -np.inf), axis=1), np.nan)
    return {"observations": n_obs, "first_time": first, "last_time": last}


@dataclass
class SupportCheck:
    """Per-individual outcome of the design and summary-space checks."""

    design_flags: list[list[str]]
    distance: np.ndarray
    threshold: float

    @property
    def flagged(self) -> np.ndarray:
        return np.flatnonzero(np.array([bool(f) for f in self.design_flags], dtype=bool) | (self.distance > self.threshold))

    def summary(self, ids) -> dict:
        flagged = self.flagged
        items = []
        for i in flagged[:200]:
            reasons = list(self.design_flags[i])
            if self.distance[i] > self.threshold:
                reasons.append(f"summary-space distance {self.distance[i]:.1f} > {self.threshold:.1f}")
            items.append({"id": str(ids[i]), "reasons": reasons})
        return {"n_outside": int(flagged.size), "n_design_outside": int(sum(bool(f) for f in self.design_flags)),
                "n_summary_outside": int(np.sum(self.distance > self.threshold)),
                "summary_distance_threshold": self.threshold,
                "summary_distance_median": float(np.median(self.distance)), "individuals": items}


def _reference(estimator, model: IndividualModel, cache_dir: Path | None) -> dict:
    """Design feature ranges and the summary-space reference (mean, inverse covariance, distance threshold)."""
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"support-{estimator.sha256[:16]}.json"
        if path.exists():
            try:
                ref = json.loads(path.read_text())
                return {k: np.asarray(v) if isinstance(v, list) else v for k, v in ref.items()}
            except (OSError, ValueError):
                pass
    rng = np.random.default_rng([20241, 7])
    designs = model.sample_design(N_DESIGNS, rng)
    feats = design_features(model, designs)
    _, obs, des = simulate_batch(model, N_REFERENCE, rng)
    s = estimator.summaries(obs, des)
    mean = s.mean(axis=0)
    cov = np.cov(s, rowvar=False) + 1e-9 * np.eye(s.shape[1])
    prec = np.linalg.inv(cov)
    d = np.sqrt(np.einsum("nk,kl,nl->n", s - mean, prec, s - mean))
    ref = {"features": list(feats), "low": np.array([np.nanmin(v) for v in feats.values()]),
           "high": np.array([np.nanmax(v) for v in feats.values()]), "mean": mean, "precision": prec,
           "threshold": float(np.quantile(d, REFERENCE_QUANTILE))}
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
            tmp.write_text(json.dumps({k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in ref.items()}))
            os.replace(tmp, path)
        except OSError:
            pass
    return ref


def check_support(estimator, model: IndividualModel, observations: np.ndarray, design: Design,
                  cache_dir: Path | None) -> SupportCheck:
    """Design and summary-space checks of every individual against the estimator's training simulations."""
    ref = _reference(estimator, model, cache_dir)
    feats = design_features(model, design)
    flags: list[list[str]] = [[] for _ in range(observations.shape[0])]
    for (name, values), lo, hi in zip(feats.items(), ref["low"], ref["high"]):
        # counts must be within the training range; continuous features within it plus 5 % of its width
        slack = 0.0 if name in COUNT_FEATURES else RANGE_SLACK * (hi - lo) + 1e-3 * max(abs(lo), abs(hi))
        for i in np.flatnonzero((values < lo - slack) | (values > hi + slack)):
            flags[i].append(f"{name.replace('_', ' ')} {values[i]:g} outside the training designs' {lo:g}-{hi:g}")
    s = estimator.summaries(observations, design)
    r = s - ref["mean"]
    d = np.sqrt(np.maximum(np.einsum("nk,kl,nl->n", r, ref["precision"], r), 0.0))
    check = SupportCheck(flags, d, float(ref["threshold"]))
    if check.flagged.size:
        logger.warning("%d of %d individuals are unlike the estimator's training simulations (design: %d, summary "
                       "space: %d); see the results' support section", check.flagged.size, observations.shape[0],
                       sum(bool(f) for f in flags), int(np.sum(d > check.threshold)))
    return check
