"""The linear pharmacokinetic model library: one- and two-compartment models with IV (bolus, infusion) or first-order
oral absorption, for NONMEM data sets as they are (any dosing record: repeated doses, infusions, steady state,
resets; BLQ observations), in the parameterisation pharmacometricians report.

    pk_1cmt_iv    CL, V                 (NONMEM ADVAN1: CMT 1 = central)
    pk_1cmt_oral  CL, V, ka [, tlag]    (ADVAN2: CMT 1 = depot, 2 = central)
    pk_2cmt_iv    CL, V1, Q, V2         (ADVAN3: CMT 1 = central, 2 = peripheral)
    pk_2cmt_oral  CL, V1, Q, V2, ka [, tlag]  (ADVAN4: CMT 1 = depot, 2 = central, 3 = peripheral)

Concentrations come from the closed forms of :mod:`simulators.pk_closed_form` (superposition over the dosing record,
checked against scipy's ODE solvers). The residual error is not an individual parameter: the estimator integrates it
out over a broad prior (additive, proportional and combined errors, BLQ censoring), so one estimator serves every
residual-error model, whose sds the population fit estimates through the exact likelihood.

**Units do not matter.** Linear PK is equivariant under rescaling time, amounts and concentrations: with an
individual's time scale a (first dose to last observation), dose scale c (largest dose) and concentration scale b
(median observed concentration), the encoder hands the network normalised data, and the network learns the
normalised parameters CL a b / c, V b / c, Q a b / c, ka a, tlag / a. Their log is the log-parameter plus a shift
that depends on the data only (:meth:`LinearPK.parameter_shift`), so q(phi | y) is exact in any units: mg/L or
ng/mL, hours or days, without retraining.
"""

from __future__ import annotations

import numpy as np

from amortized_nlme.errors import DataError
from amortized_nlme.model import Design, IndividualModel, NormalPrior
from simulators import pk_closed_form as pkc

MAX_OBS = 48
MAX_DOSES = 60
MAX_TOKENS = MAX_OBS + MAX_DOSES
N_CHANNELS = 14
_LOG_FLOOR = 1e-4  # normalised concentrations below this are encoded at the floor on the log channel
#: log-parameters beyond +-PHI_LIMIT give NaN predictions (see ``LinearPK.predict``)
PHI_LIMIT = 200.0
#: simulations whose normalised parameters lie beyond this many prior sds are redrawn (see ``simulate``)
TARGET_LIMIT_SD = 5.0

#: model name -> (closed-form code, structural parameters, oral)
STRUCTURES = {
    "pk_1cmt_iv": (pkc.ONE_CMT_IV, ("CL", "V"), False),
    "pk_1cmt_oral": (pkc.ONE_CMT_ORAL, ("CL", "V", "ka"), True),
    "pk_2cmt_iv": (pkc.TWO_CMT_IV, ("CL", "V1", "Q", "V2"), False),
    "pk_2cmt_oral": (pkc.TWO_CMT_ORAL, ("CL", "V1", "Q", "V2", "ka"), True),
}
#: prior in normalised units (time span 1, dose 1, concentration ~1): log-mean and log-sd of each parameter.
#: k = CL / V spans half-lives from 1/100 to 100 times the sampling span; absorption half-lives 1e-3 to 1 span.
PRIOR = {"CL": (0.0, 2.5), "V": (0.0, 1.5), "V1": (0.0, 1.5), "Q": (0.0, 2.5), "V2": (0.5, 1.5),
         "ka": (2.5, 1.8), "tlag": (np.log(0.02), 1.2)}
#: how each parameter's log shifts with the log time (a), concentration (b) and dose (c) scales
SHIFT = {"CL": (1, 1, -1), "V": (0, 1, -1), "V1": (0, 1, -1), "Q": (1, 1, -1), "V2": (0, 1, -1),
         "ka": (1, 0, 0), "tlag": (-1, 0, 0)}
#: NONMEM compartment numbers of the dose records -> route (0 depot, 1 central); 0 = the default dose compartment
CMT_ROUTES = {False: {0: 1, 1: 1}, True: {0: 0, 1: 0, 2: 1}}
ERROR_KINDS = ("additive", "proportional", "combined")


def flip_flop_warning(ka: float, k: float) -> str:
    """The status line for a fit whose typical absorption is slower than its elimination."""
    return (f"flip-flop kinetics at the estimate: typical ka {ka:.3g} is below the terminal elimination rate "
            f"{k:.3g} (per time unit of the data); from oral-dose concentrations alone absorption and elimination "
            "can trade places (an oral one-compartment model fits every individual equally well with ka and CL/V "
            "swapped), so this may be the mirror of the solution you expect; if absorption is known to be the "
            "faster process (immediate release), treat these estimates as not identified by this design")


class LinearPK(IndividualModel):
    """A linear compartmental PK model with superposition over arbitrary NONMEM dosing records."""

    version = "1"
    obs_names = ("concentration",)
    max_time_points = MAX_TOKENS
    time_unit = ""
    supports_censoring = True
    error_params: tuple[str, ...] = ()
    error_kind = "combined"  # the default residual error of a population fit (additive + proportional)

    def __init__(self, structure: str, lag_time: bool = False) -> None:
        if structure not in STRUCTURES:
            raise ValueError(f"unknown PK structure {structure!r}; one of {sorted(STRUCTURES)}")
        code, params, oral = STRUCTURES[structure]
        if lag_time and not oral:
            raise ValueError("a lag time applies to oral (depot) doses only")
        self.code, self.oral, self.lag_time = code, oral, bool(lag_time)
        self.name = structure + ("_lag" if lag_time else "")
        self.param_names = params + (("tlag",) if lag_time else ())
        mean = np.array([PRIOR[p][0] for p in self.param_names])
        sd = np.array([PRIOR[p][1] for p in self.param_names])
        self._prior = NormalPrior(self.param_names, mean, sd**2)
        self._shift = np.array([SHIFT[p] for p in self.param_names], dtype=np.float64)  # [k, 3]

    @property
    def prior(self) -> NormalPrior:
        return self._prior

    def design_description(self) -> str:
        routes = "oral (depot) doses, optionally with IV doses" if self.oral else "IV bolus and infusion doses"
        return (f"{routes}; single, repeated (2-50) and steady-state (SS=1) dosing with regular or irregular "
                f"intervals; 1-{MAX_OBS} observations per subject (sparse to rich), at most {MAX_DOSES} dose records; "
                "additive, proportional or combined residual error and BLQ censoring; any units (data normalised "
                "by each subject's time, dose and concentration scales)")

    def mirror_map(self) -> np.ndarray | None:
        """One-compartment oral: (log CL, log V, log ka) -> (log CL, log CL - log ka, log CL - log V), i.e. ka and
        k = CL/V swapped with CL kept, gives the same concentrations after any number of oral doses (lag kept)."""
        if self.code != pkc.ONE_CMT_ORAL:
            return None
        i = {p: j for j, p in enumerate(self.param_names)}
        A = np.eye(len(self.param_names))
        A[i["V"]] = 0.0
        A[i["V"], i["CL"]], A[i["V"], i["ka"]] = 1.0, -1.0
        A[i["ka"]] = 0.0
        A[i["ka"], i["CL"]], A[i["ka"], i["V"]] = 1.0, -1.0
        return A

    def typical_value_warnings(self, typical: dict[str, float]) -> list[str]:
        """Flip-flop: a typical ka below the terminal elimination rate. From concentrations after oral doses alone an
        oral one-compartment model cannot tell absorption from elimination (ka <-> CL/V with V -> CL/ka fits every
        individual exactly as well); two compartments blur the same way."""
        if not self.oral or not all(p in typical for p in self.param_names if p != "tlag"):
            return []
        ka, cl = typical["ka"], typical["CL"]
        if "V" in typical:
            k = cl / typical["V"]
        else:
            k10, k12, k21 = cl / typical["V1"], typical["Q"] / typical["V1"], typical["Q"] / typical["V2"]
            total = k10 + k12 + k21
            k = 0.5 * (total - np.sqrt(max(total * total - 4.0 * k10 * k21, 0.0)))
        return [flip_flop_warning(ka, k)] if ka < k else []

    # ------------------------------------------------------------------------------------------- designs
    def sample_design(self, n: int, rng: np.random.Generator) -> Design:
        """Designs in normalised units (doses ~1, the sampling span ~1), covering single, repeated and
        steady-state dosing, infusions, sparse and rich sampling, and the residual-error and BLQ nuisances."""
        doses = np.zeros((n, MAX_DOSES, 7))
        n_doses = np.zeros(n, dtype=np.int64)
        times = np.zeros((n, MAX_OBS))
        mask = np.zeros((n, MAX_OBS), dtype=bool)
        for i in range(n):
            d, m = self._regimen(rng)
            doses[i, :m] = d
            n_doses[i] = m
            t = self._sampling(d[:m], rng)
            times[i, : t.size] = t
            mask[i, : t.size] = True
        kind = rng.integers(0, 3, size=n)
        prop = np.exp(rng.uniform(np.log(0.03), np.log(0.4), size=n))
        add = np.exp(rng.uniform(np.log(0.01), np.log(0.3), size=n)) * np.where(kind == 2, 0.3, 1.0)
        lloq_q = np.where(rng.random(n) < 0.25, rng.uniform(0.05, 0.5, size=n), 0.0)
        return {"times": times, "mask": mask, "censored": np.zeros((n, MAX_OBS), dtype=bool), "doses": doses,
                "n_doses": n_doses, "error_kind": kind.astype(np.int64), "sigma_prop": prop,
                "sigma_add_rel": add, "sigma_add": np.zeros(n), "lloq_quantile": lloq_q}

    def _regimen(self, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        """One subject's dose records (time, amount, route, duration, ss, ii, reset)."""
        u = rng.random()
        amount = np.exp(rng.uniform(np.log(0.5), np.log(2.0)))
        infusion = (not self.oral) and rng.random() < 0.4
        if u < 0.35:  # single dose
            times = np.array([0.0])
            ii = 1.0
            ss = np.zeros(1)
        elif u < 0.8:  # repeated doses
            m = int(rng.integers(2, 51))
            span = rng.uniform(0.2, 1.0)
            ii = span / m
            times = np.arange(m) * ii
            if rng.random() < 0.3:  # irregular intervals
                times = times + rng.uniform(-0.2, 0.2, size=m) * ii
                times[0] = 0.0
                times = np.sort(times)
            ss = np.zeros(m)
        else:  # steady state, then 0-10 further doses at the same interval
            ii = np.exp(rng.uniform(np.log(0.05), np.log(0.6)))
            m = 1 + int(rng.integers(0, 11))
            times = np.arange(m) * ii
            ss = np.zeros(m)
            ss[0] = 1.0
        m = times.size
        amounts = np.full(m, amount)
        if m > 1 and rng.random() < 0.2:
            amounts[0] *= rng.uniform(1.5, 3.0)  # loading dose
        if rng.random() < 0.1:
            amounts *= np.exp(rng.uniform(np.log(0.5), np.log(2.0), size=m))
        route = np.full(m, 0.0 if self.oral else 1.0)
        if self.oral and rng.random() < 0.1:
            route[0] = 1.0  # an IV loading dose
        duration = np.zeros(m)
        if infusion:
            duration[:] = np.exp(rng.uniform(np.log(0.01), np.log(0.8))) * min(ii, 1.0)
            if ss[0]:
                duration[:] = np.minimum(duration, 0.9 * ii)
        d = np.zeros((m, 7))
        d[:, pkc.TIME], d[:, pkc.AMT], d[:, pkc.ROUTE], d[:, pkc.DUR] = times, amounts, route, duration
        d[:, pkc.SS] = ss
        d[:, pkc.II] = np.where(ss > 0, ii, 0.0)
        return d, m

    def _sampling(self, doses: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Observation times: sparse, moderate or rich, uniform over the dosing horizon, clustered after a dose, or
        troughs before doses."""
        r = rng.random()
        n = int(rng.integers(1, 5)) if r < 0.35 else int(rng.integers(5, 13)) if r < 0.7 else int(
            rng.integers(13, MAX_OBS + 1))
        last_dose = doses[-1, pkc.TIME]
        ii = doses[0, pkc.II] if doses[0, pkc.SS] else (np.median(np.diff(doses[:, pkc.TIME])) if doses.shape[0] > 1
                                                         else 1.0)
        horizon = last_dose + ii * rng.uniform(0.5, 3.0)
        style = rng.random()
        if style < 0.4:  # uniform over the horizon
            t = rng.uniform(0.0, horizon, size=n)
        elif style < 0.8:  # rich after one dose, log-spaced
            k = int(rng.integers(0, doses.shape[0]))
            t = doses[k, pkc.TIME] + np.exp(rng.uniform(np.log(0.01 * ii), np.log(2.0 * ii), size=n))
        else:  # troughs and peaks around the doses
            k = rng.integers(0, doses.shape[0], size=n)
            t = doses[k, pkc.TIME] + np.where(rng.random(n) < 0.5, -1e-3 * ii, 0.3 * ii * rng.random(n))
            t = np.clip(t, 0.0, None)
        return np.sort(t)

    # ------------------------------------------------------------------------------------------ simulation
    def _natural(self, phi: np.ndarray) -> np.ndarray:
        """Closed-form parameter rows (natural scale, tlag column last, 0 without lag)."""
        p = np.exp(self.check_phi(phi))
        if not self.lag_time:
            p = np.concatenate([p, np.zeros((p.shape[0], 1))], axis=1)
        return np.ascontiguousarray(p)

    def predict(self, phi: np.ndarray, design: Design) -> np.ndarray:
        """Central concentrations ``[n, T, 1]``; NaN for parameter rows beyond e^+-200 (no drug has them, and the
        closed forms would under- or overflow: a proposal's far tail may propose them)."""
        phi = self.check_phi(phi)
        sane = np.all(np.abs(phi) < PHI_LIMIT, axis=1)
        if not sane.all():
            out = np.full((*np.shape(design["times"]), 1), np.nan)
            if sane.any():
                rows = np.flatnonzero(sane)
                out[rows] = self.predict(phi[rows], {k: v[rows] for k, v in design.items()})
            return out
        conc = pkc.predict_batch(self.code, self._natural(phi), np.ascontiguousarray(design["doses"], np.float64),
                                 np.ascontiguousarray(design["n_doses"], np.int64),
                                 np.ascontiguousarray(design["times"], np.float64),
                                 np.ascontiguousarray(design["mask"], np.bool_))
        return conc[..., None]

    def simulate(self, phi: np.ndarray, design: Design, rng: np.random.Generator) -> np.ndarray:
        """Concentrations with the design's residual error (additive / proportional / combined, sds relative to the
        subject's median concentration) and BLQ censoring (``design['censored']`` is filled in: censored values
        hold the limit)."""
        f = self.predict(phi, design)[..., 0]
        mask = np.asarray(design["mask"], bool)
        level = np.array([np.median(np.abs(f[i][mask[i]])) if mask[i].any() else 1.0 for i in range(f.shape[0])])
        level = np.where(level > 0, level, 1.0)
        kind = np.asarray(design["error_kind"])[:, None]
        add = (np.asarray(design["sigma_add_rel"]) * level)[:, None]
        prop = np.asarray(design["sigma_prop"])[:, None]
        if "sigma_add" in design:
            design["sigma_add"][...] = add[:, 0]  # the absolute additive sd, for the likelihood of simulated data
        sd = np.where(kind == 0, add, np.where(kind == 1, prop * np.abs(f), np.sqrt(add**2 + (prop * f) ** 2)))
        sd = np.maximum(sd, 1e-12 * level[:, None])
        y = f + sd * rng.standard_normal(f.shape)
        q = np.asarray(design["lloq_quantile"])
        cens = np.zeros_like(mask)
        for i in np.flatnonzero(q > 0):
            if mask[i].sum() >= 2:
                lloq = np.quantile(f[i][mask[i]], q[i])
                cens[i] = mask[i] & (y[i] < lloq)
                y[i] = np.where(cens[i], lloq, y[i])
        if "censored" in design:
            design["censored"][...] = cens
        out = np.where(mask, y, 0.0)[..., None]
        # subjects whose normalised parameters land far outside the prior (concentrations vanishing to ~e^-50 at
        # every sample) are failed simulations: redrawn, counted, and the training prior recorded as truncated there
        target = self.check_phi(phi) + self.parameter_shift(out, design)
        z = np.abs(target - self._prior.mean) / self._prior.std
        out[z.max(axis=1) > TARGET_LIMIT_SD] = np.nan
        return out

    def log_likelihood(self, phi: np.ndarray, observations: np.ndarray, design: Design) -> np.ndarray:
        """log p(y | phi) of *simulated* data, whose design carries the residual error it was simulated with (the
        calibration check's proposal quality uses it); real data have a population residual error instead, which
        the inference stage handles (:mod:`amortized_nlme.inference.likelihood`)."""
        if "error_kind" not in design or "sigma_add" not in design:
            raise NotImplementedError(f"{self.name}: the residual error of real data is a population parameter")
        from scipy.special import log_ndtr

        f = self.predict(phi, design)[..., 0]
        y = np.asarray(observations, np.float64)[..., 0]
        mask = np.asarray(design["mask"], bool)
        cens = np.asarray(design.get("censored", np.zeros_like(mask)), bool)
        kind = np.asarray(design["error_kind"])[:, None]
        add = np.asarray(design["sigma_add"], np.float64)[:, None]
        prop = np.asarray(design["sigma_prop"], np.float64)[:, None]
        sd = np.where(kind == 0, add, np.where(kind == 1, prop * np.abs(f), np.sqrt(add**2 + (prop * f) ** 2)))
        with np.errstate(divide="ignore", invalid="ignore"):
            z = (y - f) / sd
            point = np.where(cens, log_ndtr(z), -0.5 * z * z - np.log(sd) - 0.5 * np.log(2 * np.pi))
        out = np.sum(np.where(mask, point, 0.0), axis=1)
        return np.where(np.isfinite(out), out, -np.inf)

    # --------------------------------------------------------------------------------------- normalisation
    def _scales(self, observations: np.ndarray, design: Design) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                          np.ndarray]:
        """Per subject: time origin (first dose), time scale a, concentration scale b, dose scale c."""
        n = observations.shape[0]
        mask = np.asarray(design["mask"], bool)
        times = np.asarray(design["times"], np.float64)
        doses = np.asarray(design["doses"], np.float64)
        n_doses = np.asarray(design["n_doses"], np.int64)
        cens = np.asarray(design.get("censored", np.zeros_like(mask)), bool)
        y = np.asarray(observations, np.float64)[..., 0]
        t0, a, b, c = np.zeros(n), np.ones(n), np.ones(n), np.ones(n)
        for i in range(n):
            m = n_doses[i]
            ti = times[i][mask[i]]
            t0[i] = doses[i, 0, pkc.TIME] if m else (ti.min() if ti.size else 0.0)
            # the time scale: first dose to last observation, or (odd designs) any other span the data give;
            # every candidate scales with the time unit, so the normalisation stays exact
            spans = [ti.max() - t0[i] if ti.size else 0.0]
            if m:
                spans += [doses[i, m - 1, pkc.TIME] - t0[i], doses[i, :m, pkc.II].max(), doses[i, :m, pkc.DUR].max()]
            if ti.size:
                spans.append(np.abs(ti - t0[i]).max())
            span = max(spans)
            a[i] = span if span > 0 else 1.0
            if m:
                amt = doses[i, :m, pkc.AMT]
                c[i] = amt.max() if amt.max() > 0 else 1.0
            obs = y[i][mask[i] & ~cens[i]]
            pos = np.abs(obs[obs != 0])
            lim = y[i][mask[i] & cens[i]]
            b[i] = np.median(pos) if pos.size else (np.median(np.abs(lim)) if lim.size and np.any(lim != 0) else 1.0)
        return t0, a, b, c

    def parameter_shift(self, observations: np.ndarray, design: Design) -> np.ndarray:
        _, a, b, c = self._scales(observations, design)
        logs = np.stack([np.log(a), np.log(b), np.log(c)], axis=1)  # [n, 3]
        return logs @ self._shift.T

    def encode(self, observations: np.ndarray, design: Design) -> np.ndarray:
        """One token per dose record and per observation, in time order (normalised time; for observations the
        normalised value, its log and a censoring flag; for doses the normalised amount, route, duration, steady
        state and interval), padded to ``MAX_TOKENS`` with a mask channel."""
        t0, a, b, c = self._scales(observations, design)
        n = observations.shape[0]
        mask = np.asarray(design["mask"], bool)
        times = np.asarray(design["times"], np.float64)
        doses = np.asarray(design["doses"], np.float64)
        n_doses = np.asarray(design["n_doses"], np.int64)
        cens = np.asarray(design.get("censored", np.zeros_like(mask)), bool)
        y = np.asarray(observations, np.float64)[..., 0]
        out = np.zeros((n, MAX_TOKENS, N_CHANNELS), dtype=np.float32)
        for i in range(n):
            m = int(n_doses[i])
            oi = np.flatnonzero(mask[i])
            tok = np.zeros((m + oi.size, N_CHANNELS))
            tt = np.concatenate([doses[i, :m, pkc.TIME], times[i, oi]])
            tok[:, 0] = (tt - t0[i]) / a[i]
            tok[m:, 1] = 1.0
            yv = y[i, oi] / b[i]
            tok[m:, 2] = np.clip(yv, -50.0, 50.0)
            tok[m:, 3] = np.log(np.maximum(yv, _LOG_FLOOR)) / 4.0
            tok[m:, 4] = cens[i, oi]
            tok[:m, 5] = 1.0
            tok[:m, 6] = doses[i, :m, pkc.AMT] / c[i]
            tok[:m, 7] = doses[i, :m, pkc.ROUTE]
            tok[:m, 8] = np.minimum(doses[i, :m, pkc.DUR] / a[i], 10.0)
            tok[:m, 9] = doses[i, :m, pkc.SS]
            tok[:m, 10] = np.minimum(doses[i, :m, pkc.II] / a[i], 10.0)
            tok[:, 11] = 1.0
            tok[:, 12] = oi.size / MAX_OBS
            tok[:, 13] = m / MAX_DOSES
            order = np.argsort(tt, kind="stable")  # doses before observations at the same time
            out[i, : order.size] = tok[order]
        return out

    # ------------------------------------------------------------------------------------------ real data
    def from_dataset(self, data) -> tuple[np.ndarray, Design]:
        """Lay a NONMEM data set out as the training designs: dose records with routes from CMT (see the module
        docstring), observations with their BLQ flags; anything the model cannot represent is refused."""
        n = data.n_individuals
        obs = np.zeros((n, MAX_OBS, 1))
        times = np.zeros((n, MAX_OBS))
        mask = np.zeros((n, MAX_OBS), dtype=bool)
        censored = np.zeros((n, MAX_OBS), dtype=bool)
        doses = np.zeros((n, MAX_DOSES, 7))
        n_doses = np.zeros(n, dtype=np.int64)
        routes = CMT_ROUTES[self.oral]
        for i in range(n):
            where = f"{data.path}: ID {data.ids[i]}"
            rows = data.dose_rows[i] if getattr(data, "dose_rows", None) else None
            d = np.asarray(data.doses[i], dtype=np.float64).reshape(-1, 7)
            if d.shape[0] == 0:
                raise DataError(f"{where}, column AMT: no dose records; {self.name} needs the dosing history")
            if d.shape[0] > MAX_DOSES:
                raise DataError(f"{where}, column AMT: {d.shape[0]} dose records (after ADDL expansion); the "
                                f"{self.name} estimator takes at most {MAX_DOSES} per subject")
            for j, cmt in enumerate(d[:, 2]):
                if int(cmt) not in routes:
                    row = f"row {int(rows[j])}, " if rows is not None and len(rows) > j else ""
                    numbering = ("1 = depot (oral), 2 = central (IV)" if self.oral else "1 = central")
                    raise DataError(f"{data.path}, {row}column CMT: dose into compartment {int(cmt)}; {self.name} "
                                    f"doses into {numbering} (NONMEM {'ADVAN2/4' if self.oral else 'ADVAN1/3'} "
                                    "numbering; 0 or empty = default)")
            route = np.array([routes[int(x)] for x in d[:, 2]], dtype=np.float64)
            if self.oral is False and np.any(route == 0):
                raise DataError(f"{where}: depot doses in an IV model")
            rec = d.copy()
            rec[:, 2] = route
            doses[i, : d.shape[0]] = rec
            n_doses[i] = d.shape[0]
            t = np.asarray(data.times[i], dtype=np.float64)
            if t.size > MAX_OBS:
                raise DataError(f"{where}, column DV: {t.size} observations; the {self.name} estimator takes at most "
                                f"{MAX_OBS} per subject")
            if data.obs_type and np.unique(np.asarray(data.obs_type[i])).size > 1:
                raise DataError(f"{where}, column CMT: {self.name} observes one compartment (the central "
                                "concentration); the data have several observation types")
            times[i, : t.size] = t
            mask[i, : t.size] = True
            obs[i, : t.size, 0] = data.dv[i]
            if getattr(data, "censored", None):
                censored[i, : t.size] = data.censored[i]
        return obs, {"times": times, "mask": mask, "censored": censored, "doses": doses, "n_doses": n_doses}

    def design_features(self, design: Design) -> dict[str, np.ndarray]:
        """Features compared with the training designs: observations and doses per subject, and the sampling span
        in units of the dosing interval (the time scale the encoder cannot normalise away)."""
        mask = np.asarray(design["mask"], bool)
        n_doses = np.asarray(design["n_doses"], np.int64)
        return {"observations": mask.sum(axis=1).astype(float), "doses": n_doses.astype(float)}

    def residual_scale(self, kind, observations, design):
        """Residual sds start around 10 % of the median observed concentration (additive) and 10 % (proportional)."""
        return super().residual_scale(kind, observations, design)


def make(structure: str):
    """A registry factory per structure (``simulators.MODELS`` points at these)."""

    class Model(LinearPK):
        __doc__ = f"{structure}: linear PK, {', '.join(STRUCTURES[structure][1])} (+ tlag with lag_time = true)"

        def __init__(self, lag_time: bool = False) -> None:
            super().__init__(structure, lag_time=lag_time)

    Model.__name__ = Model.__qualname__ = "".join(w.capitalize() for w in structure.split("_"))
    return Model


Pk1CmtIv = make("pk_1cmt_iv")
Pk1CmtOral = make("pk_1cmt_oral")
Pk2CmtIv = make("pk_2cmt_iv")
Pk2CmtOral = make("pk_2cmt_oral")
