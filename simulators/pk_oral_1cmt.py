"""One-compartment pharmacokinetics with first-order oral absorption (theophylline-like studies).

    C(t) = sum_doses D ka / (V (ka - ke)) (exp(-ke tau) - exp(-ka tau)),   tau = t - t_dose > 0
    y    = C + N(0, sigma_add^2)                                      (error_model="additive")
    y    = C + N(0, sigma_add^2 + (sigma_prop C)^2)                   (error_model="combined")

Parameters (log scale): log ka [1/h], log ke [1/h], log V [L], log sigma_add [mg/L] (+ log sigma_prop, unitless,
for the combined error model). Doses in mg, concentrations in mg/L, times in hours after the (single) dose.

Prior (independent normal, VARIANCE 1 on every log parameter), centred on theophylline (ka 1.5/h, ke 0.09/h, V 32 L,
residual 0.5 mg/L, proportional 10 %): +-2 sd covers ka 0.2-11/h, ke 0.012-0.67/h (half-lives 1-58 h), V 4-240 L,
sigma_add 0.07-3.7 mg/L -- most small-molecule oral drugs at mg/L scale. P(ka < ke) (flip-flop) is about 3 %.

Design: dose log-uniform on 50-1000 mg; 6-15 samples per subject at irregular times over 0-24 h (a pre-dose sample
at t=0 with probability 1/4, then about half early (0.1-4 h) and half late (4-24 h), uniform within each and
sorted), padded to 15 with ``mask``.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from amortized_nlme.model import Design, IndividualModel, NormalPrior

MAX_OBS = 15
TIME_SCALE = 24.0
CONC_SCALE = 10.0
DOSE_REF = 300.0
DOSE_RANGE = (50.0, 1000.0)
_LOG_2PI = float(np.log(2.0 * np.pi))


@nb.njit(cache=True)
def oral_1cmt_concentration(t: float, dose_times: np.ndarray, amounts: np.ndarray, ka: float, ke: float,
                            V: float) -> float:
    """Concentration at ``t`` after oral boluses (superposition); expm1 on the rate gap keeps ka ~ ke exact."""
    c = 0.0
    a = min(ka, ke)
    gap = abs(ka - ke)
    for d in range(dose_times.size):
        tau = t - dose_times[d]
        if tau <= 0.0:
            continue
        if gap * tau < 1e-10:
            shape = tau * np.exp(-a * tau)
        else:
            shape = np.exp(-a * tau) * (-np.expm1(-gap * tau)) / gap
        c += amounts[d] * ka / V * shape
    return c


@nb.njit(parallel=True, cache=True)
def _predict(phi: np.ndarray, times: np.ndarray, mask: np.ndarray, dose: np.ndarray) -> np.ndarray:
    """Concentrations after a single dose at time 0, 0 where masked."""
    n, T = times.shape
    out = np.zeros((n, T))
    for i in nb.prange(n):
        ka = np.exp(phi[i, 0])
        ke = np.exp(phi[i, 1])
        V = np.exp(phi[i, 2])
        dt = np.zeros(1)
        amt = np.full(1, dose[i])
        for j in range(T):
            if mask[i, j]:
                out[i, j] = oral_1cmt_concentration(times[i, j], dt, amt, ka, ke, V)
    return out


class PkOral1Cmt(IndividualModel):
    """One-compartment oral-absorption PK model with additive (default) or combined residual error."""

    name = "pk_oral_1cmt"
    version = "1"
    param_names: tuple[str, ...] = ("ka", "ke", "V", "sigma_add")
    obs_names = ("concentration",)
    max_time_points = MAX_OBS
    time_unit = "h"
    error_params: tuple[str, ...] = ("sigma_add",)
    error_kind = "additive"

    def __init__(self, error_model: str = "additive") -> None:
        if error_model not in ("additive", "combined"):
            raise ValueError(f"error_model must be 'additive' or 'combined', got {error_model!r}")
        self.error_model = error_model
        mean = [np.log(1.5), np.log(0.09), np.log(32.0), np.log(0.5)]
        if error_model == "combined":
            # a different name, so that an estimator trained for one error model is never used with the other
            self.name = "pk_oral_1cmt_combined"
            self.param_names = ("ka", "ke", "V", "sigma_add", "sigma_prop")
            self.error_params = ("sigma_add", "sigma_prop")
            self.error_kind = "combined"
            mean.append(np.log(0.1))
        self._prior = NormalPrior(self.param_names, np.array(mean), np.ones(len(mean)))

    @property
    def prior(self) -> NormalPrior:
        return self._prior

    def sample_design(self, n: int, rng: np.random.Generator) -> Design:
        times = np.zeros((n, MAX_OBS))
        mask = np.zeros((n, MAX_OBS), dtype=bool)
        lo, hi = np.log(DOSE_RANGE[0]), np.log(DOSE_RANGE[1])
        dose = np.exp(rng.uniform(lo, hi, size=n))
        n_obs = rng.integers(6, MAX_OBS + 1, size=n)
        predose = rng.random(n) < 0.25
        for i in range(n):
            m = n_obs[i] - int(predose[i])
            n_early = min(max(rng.binomial(m, 0.5), 2), m - 2)
            t = np.concatenate([rng.uniform(0.1, 4.0, n_early), rng.uniform(4.0, 24.0, m - n_early)])
            t = np.sort(t)
            if predose[i]:
                t = np.concatenate([[0.0], t])
            times[i, : t.size] = t
            mask[i, : t.size] = True
        return {"times": times, "mask": mask, "dose": dose}

    def mirror_map(self) -> np.ndarray | None:
        """(log ka, log ke, log V) -> (log ke, log ka, log V + log ke - log ka): the flip-flop image, same
        concentrations after any oral doses; residual sds kept."""
        A = np.eye(len(self.param_names))
        A[0, 0], A[0, 1], A[1, 0], A[1, 1] = 0.0, 1.0, 1.0, 0.0
        A[2, 0], A[2, 1] = -1.0, 1.0
        return A

    def typical_value_warnings(self, typical: dict[str, float]) -> list[str]:
        """Flip-flop (ka < ke): see :func:`simulators.pk_library.flip_flop_warning`."""
        from simulators.pk_library import flip_flop_warning

        if "ka" in typical and "ke" in typical and typical["ka"] < typical["ke"]:
            return [flip_flop_warning(typical["ka"], typical["ke"])]
        return []

    def predict(self, phi: np.ndarray, design: Design) -> np.ndarray:
        times = np.ascontiguousarray(design["times"], dtype=np.float64)
        mask = np.ascontiguousarray(design["mask"], dtype=np.bool_)
        dose = np.ascontiguousarray(design["dose"], dtype=np.float64)
        return _predict(self.check_phi(phi), times, mask, dose)[..., None]

    def _residual_sd(self, phi: np.ndarray, conc: np.ndarray) -> np.ndarray:
        """Residual standard deviation ``[n, T, 1]`` at the predicted concentrations."""
        sd_add = np.exp(phi[:, 3])[:, None, None]
        if self.error_model == "additive":
            return np.broadcast_to(sd_add, conc.shape)
        sd_prop = np.exp(phi[:, 4])[:, None, None]
        return np.sqrt(sd_add**2 + (sd_prop * conc) ** 2)

    def simulate(self, phi: np.ndarray, design: Design, rng: np.random.Generator) -> np.ndarray:
        phi = self.check_phi(phi)
        conc = self.predict(phi, design)
        y = conc + self._residual_sd(phi, conc) * rng.standard_normal(conc.shape)
        return np.where(design["mask"][..., None], y, 0.0)

    def log_likelihood(self, phi: np.ndarray, observations: np.ndarray, design: Design) -> np.ndarray:
        phi = self.check_phi(phi)
        conc = self.predict(phi, design)
        sd = self._residual_sd(phi, conc)
        z = (observations - conc) / sd
        point = -0.5 * z * z - np.log(sd) - 0.5 * _LOG_2PI
        return np.sum(np.where(design["mask"][..., None], point, 0.0), axis=(1, 2))

    def encode(self, observations: np.ndarray, design: Design) -> np.ndarray:
        """Channels: time/24, C*100/dose (dose-normalised, identifies V), C/10, log(dose/300), observed flag."""
        mask = design["mask"].astype(np.float32)
        c = observations[..., 0].astype(np.float64)
        dose = np.asarray(design["dose"], dtype=np.float64)[:, None]
        t = design["times"] / TIME_SCALE
        channels = [t, c * 100.0 / dose, c / CONC_SCALE, np.broadcast_to(np.log(dose / DOSE_REF), c.shape)]
        out = np.stack([np.asarray(ch, dtype=np.float32) * mask for ch in channels] + [mask], axis=-1)
        return out.astype(np.float32)

    def from_dataset(self, data) -> tuple[np.ndarray, Design]:
        """Lay a single-oral-dose study out like simulations; anything else is a :class:`DataError`."""
        from amortized_nlme.errors import DataError

        n = data.n_individuals
        times = np.zeros((n, MAX_OBS))
        mask = np.zeros((n, MAX_OBS), dtype=bool)
        obs = np.zeros((n, MAX_OBS, 1))
        dose = np.zeros(n)
        for i in range(n):
            rows = data.source_rows[i] if data.source_rows else np.empty(0, dtype=int)
            where = f"{data.path}: ID {data.ids[i]}" + (f" (rows {int(rows[0])}-{int(rows[-1])})" if rows.size else "")
            doses = np.atleast_2d(np.asarray(data.doses[i], dtype=np.float64))
            if doses.shape[0] != 1:
                raise DataError(f"{where}, column AMT: {self.name} needs exactly one dose per individual, "
                                f"got {doses.shape[0]}")
            if doses.shape[1] > 4 and (doses[0, 3] != 0.0 or doses[0, 4] != 0.0):  # duration, ss (DOSE_COLUMNS)
                raise DataError(f"{where}, column {'RATE' if doses[0, 3] != 0.0 else 'SS'}: {self.name} needs a "
                                "single oral bolus dose, got an infusion or a steady-state dose")
            if doses[0, 0] != 0.0:
                raise DataError(f"{where}, column TIME: the dose must be at time 0 (got {doses[0, 0]:g}); "
                                "shift times so that TIME is time after dose")
            if not doses[0, 1] > 0.0:
                raise DataError(f"{where}, column AMT: dose amount must be > 0 (got {doses[0, 1]:g})")
            t = np.asarray(data.times[i], dtype=np.float64)
            dv = np.asarray(data.dv[i], dtype=np.float64)
            if t.size > MAX_OBS:
                raise DataError(f"{where}, column DV: {self.name} takes at most {MAX_OBS} observations per "
                                f"individual, got {t.size}")
            if t.size == 0:
                raise DataError(f"{where}, column DV: no observations")
            if np.any(t < 0.0):
                bad = int(np.flatnonzero(t < 0.0)[0])
                row = f"row {int(rows[bad])}, " if rows.size else ""
                raise DataError(f"{data.path}: {row}column TIME: observation before the dose (time {t[bad]:g})")
            obs_type = np.asarray(data.obs_type[i]) if data.obs_type else np.empty(0)
            if obs_type.size and np.unique(obs_type).size > 1:
                raise DataError(f"{where}, column CMT: {self.name} has one observation type, got "
                                f"{sorted(np.unique(obs_type).tolist())}")
            times[i, : t.size] = t
            mask[i, : t.size] = True
            obs[i, : t.size, 0] = dv
            dose[i] = doses[0, 1]
        return obs, {"times": times, "mask": mask, "dose": dose}


class PkOral1CmtCombined(PkOral1Cmt):
    """:class:`PkOral1Cmt` with the combined (additive + proportional) residual error model."""

    def __init__(self, error_model: str = "combined") -> None:
        super().__init__(error_model=error_model)
