"""Observations below the lower limit of quantification (BLQ): what the report needs to know about censoring."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Censoring:
    """Observations below the lower limit of quantification (BLQ, Beal's M3 data): ``blq [n, T, d]`` True where an
    observation is censored (its DV holds the limit, as the reader lays it out) and ``lloq [n, T, d]`` the limit (NaN
    where none is known). Simulated values below the limit count as BLQ in the VPC; where the limit of an
    uncensored observation is unknown, the largest known limit of the same individual and observation type is used,
    else the median limit of that observation type."""

    blq: np.ndarray
    lloq: np.ndarray

    def __post_init__(self) -> None:
        blq = np.asarray(self.blq, dtype=bool)
        lloq = np.asarray(self.lloq, dtype=np.float64)
        if blq.ndim == 2:
            blq = blq[..., None]
        if lloq.ndim == 2:
            lloq = lloq[..., None]
        if blq.shape != lloq.shape:
            raise ValueError(f"censoring flags {blq.shape} and limits {lloq.shape} differ in shape")
        if np.any(blq & ~np.isfinite(lloq)):
            raise ValueError("every BLQ observation needs its limit of quantification")
        object.__setattr__(self, "blq", blq)
        object.__setattr__(self, "lloq", lloq)

    @property
    def any(self) -> bool:
        return bool(self.blq.any())

    def filled_lloq(self) -> np.ndarray:
        """The limit at every observation ``[n, T, d]`` (NaN only for observation types without any known limit)."""
        lloq = self.lloq.copy()
        with np.errstate(all="ignore"):
            per_ind = np.nanmax(np.where(np.isfinite(lloq), lloq, -np.inf), axis=1, keepdims=True)
        per_ind = np.where(np.isfinite(per_ind), per_ind, np.nan)
        lloq = np.where(np.isfinite(lloq), lloq, np.broadcast_to(per_ind, lloq.shape))
        for o in range(lloq.shape[2]):
            known = self.lloq[..., o][np.isfinite(self.lloq[..., o])]
            if known.size:
                lloq[..., o] = np.where(np.isfinite(lloq[..., o]), lloq[..., o], float(np.median(known)))
        return lloq

    def take(self, index: np.ndarray | slice) -> Censoring:
        return Censoring(self.blq[index], self.lloq[index])
