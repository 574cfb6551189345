"""Observation-level and individual-level diagnostics of a population fit: the content of ``sdtab.csv`` and
``patab.csv`` (NONMEM's table names) and the numbers behind the goodness-of-fit figures.

Per observation (individual i, time j, observation type o):

* ``PRED``  = f(mu_i(theta)): the prediction at the typical individual with i's covariates and group (eta = 0);
* ``IPRED`` = f(E[phi_i | y_i, theta]): the prediction at i's conditional mean under the fitted population
  (posterior draws importance-reweighted to the population model, :meth:`PopulationObjective.conditional_moments`);
* ``RES`` = DV - PRED, ``IRES`` = DV - IPRED, ``IWRES`` = IRES / sd(IPRED) (the residual error, see
  :mod:`amortized_nlme.report.residuals`);
* ``EPRED`` and ``NPDE``: the mean of, and the normalised prediction distribution error against, K data sets simulated
  from the fitted population model at i's design (Brendel et al. 2006, Comets et al. 2008): the observed vector and
  simulated ones are decorrelated with the mean and the Cholesky factor of the covariance of the simulations,
  pde = fraction of simulated values below the observed one, NPDE = Phi^-1(pde). One change to the published
  method: the mean and covariance come from the first K/2 simulations and the pde compares with the other K/2
  (clipped to [2/K, 1 - 2/K]). Decorrelating the simulations with a covariance estimated from themselves makes them
  exactly white while the observation is not (its variance after whitening is inflated by about 1 + n_i/K, 10% for
  60 observations per individual and K = 1000); with the split, observation and comparison simulations are
  exchangeable under the model, so every NPDE is exactly N(0, 1) up to the 1/K discreteness, whatever n_i. Under
  the model NPDEs are N(0, 1) and (approximately) independent.

Below-LLOQ observations (``BLQ = 1``, see :class:`Censoring`) get no residuals (RES, IRES, IWRES are NaN); their
NPDEs are imputed (see :func:`npde`), so that the NPDEs of a data set with BLQ observations are N(0, 1) under the
model, uncensored and censored together.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import special, stats

from amortized_nlme.model import Design, IndividualModel, take_design
from amortized_nlme.population.fit import FitResult
from amortized_nlme.population.model import PopulationModel
from amortized_nlme.report.censoring import Censoring
from amortized_nlme.report.constants import (
    MAX_NPDE_SIMULATIONS,
    MIN_NPDE_SIMULATIONS,
    NPDE_BLOCK_VALUES,
    NPDE_SIMULATION_BUDGET,
)
from amortized_nlme.report.residuals import (
    ResidualError,
    individual_predictions,
    residual_sd,
    simulate_observations,
)
from amortized_nlme.report.vpc import sample_population

logger = logging.getLogger(__name__)


@dataclass
class Diagnostics:
    """Everything ``sdtab.csv``, ``patab.csv`` and the goodness-of-fit figures show, for every individual. Arrays are
    ``[n, T, d]`` (NaN where there is no observation) or ``[n, k]``."""

    observed: np.ndarray        # [n, T, d] bool: an observation exists (BLQ included)
    blq: np.ndarray             # [n, T, d] bool
    dv: np.ndarray
    times: np.ndarray           # [n, T]
    pred: np.ndarray
    ipred: np.ndarray
    iwres: np.ndarray
    npde: np.ndarray
    epred: np.ndarray
    mu: np.ndarray              # [n, k] population means (typical individual with i's covariates and group)
    cond_mean: np.ndarray       # [n, k]
    cond_sd: np.ndarray         # [n, k]
    param_names: tuple[str, ...]
    random_effects: tuple[str, ...]
    omega_sd: np.ndarray        # [k] sd of each parameter's random effect (kernel width where none)
    obs_names: tuple[str, ...]
    n_npde_simulations: int
    residual_source: str
    eta_shrinkage: dict[str, float] = field(default_factory=dict)
    epsilon_shrinkage: dict[str, float] = field(default_factory=dict)
    npde_failed: int = 0

    @property
    def eta(self) -> np.ndarray:
        """Conditional mean minus population mean ``[n, k]`` (the ETAs of NONMEM's patab)."""
        return self.cond_mean - self.mu

    @property
    def used(self) -> np.ndarray:
        """Observations with residuals: observed and not BLQ."""
        return self.observed & ~self.blq

    def npde_summary(self) -> dict[str, Any]:
        """Mean, variance, skewness, kurtosis of the NPDEs and the tests of the npde R package (t-test of mean 0,
        Fisher test of variance 1, Shapiro-Wilk on at most 5000 values, Kolmogorov-Smirnov against N(0, 1)) and the
        Bonferroni-adjusted global p-value of the first three."""
        x = self.npde[np.isfinite(self.npde)]
        out: dict[str, Any] = {"n_simulations": self.n_npde_simulations, "n": int(x.size)}
        if x.size < 3:
            return out
        n = x.size
        var = float(np.var(x, ddof=1))
        p_mean = float(stats.ttest_1samp(x, 0.0).pvalue)
        chi = (n - 1) * var
        p_var = float(min(1.0, 2.0 * min(stats.chi2.cdf(chi, n - 1), stats.chi2.sf(chi, n - 1))))
        sw = x if n <= 5000 else np.random.default_rng(0).choice(x, 5000, replace=False)
        p_sw = float(stats.shapiro(sw).pvalue)
        p_ks = float(stats.kstest(x, "norm").pvalue)
        out.update({"mean": float(x.mean()), "variance": var, "skewness": float(stats.skew(x)),
                    "kurtosis_excess": float(stats.kurtosis(x)), "p_mean_ttest": p_mean,
                    "p_variance_fisher": p_var, "p_normal_shapiro_wilk": p_sw, "p_normal_ks": p_ks,
                    "p_global_bonferroni": float(min(1.0, 3.0 * min(p_mean, p_var, p_sw))),
                    "shapiro_wilk_on": int(sw.size)})
        return out

    def individual_fit_score(self) -> tuple[np.ndarray, str]:
        """Per individual, how badly the model describes its data: mean squared NPDE (mean squared IWRES where no
        NPDE could be computed; BLQ NPDEs are imputed and count), NaN without observations; and the score's name."""
        with_npde = bool(np.isfinite(self.npde).any())
        use = self.observed if with_npde else self.used
        src, name = (self.npde, "mean NPDE^2") if with_npde else (self.iwres, "mean IWRES^2")
        sq = np.where(use & np.isfinite(src), src * src, 0.0)
        cnt = (use & np.isfinite(src)).sum(axis=(1, 2))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(cnt > 0, sq.sum(axis=(1, 2)) / cnt, np.nan), name


def n_npde_simulations(n_values: int, max_per_individual: int, requested: int | None = None) -> int:
    """K for ``n_values`` observations to simulate (over distinct predictive distributions, see
    :func:`predictive_signatures`): ``requested`` if given, else as many as the budget of simulated values allows
    between
    max(MIN_NPDE_SIMULATIONS, 2 x (the most observations of one individual + 20)) and MAX_NPDE_SIMULATIONS (the
    K/2 simulations that estimate the decorrelation must outnumber an individual's observations)."""
    lo = max(MIN_NPDE_SIMULATIONS, 2 * (max_per_individual + 20))
    if requested is not None:
        if requested // 2 < max_per_individual + 2:
            raise ValueError(f"NPDE needs at least {2 * (max_per_individual + 2)} simulations for individuals with "
                             f"{max_per_individual} observations, got {requested}")
        return int(requested)
    return int(max(lo, min(MAX_NPDE_SIMULATIONS, NPDE_SIMULATION_BUDGET // max(n_values, 1))))


def predictive_signatures(design: Design, mu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Individuals with the same design row and population mean have the same predictive distribution: a signature
    index per individual ``[n]`` and one representative individual per signature."""
    keys = sorted(design)
    n = mu.shape[0]
    rows = [np.ascontiguousarray(np.asarray(design[k])).reshape(n, -1) for k in keys]
    seen: dict[bytes, int] = {}
    sig = np.empty(n, dtype=np.int64)
    reps: list[int] = []
    mu = np.ascontiguousarray(mu, dtype=np.float64)
    for i in range(n):
        key = b"".join(r[i].tobytes() for r in rows) + mu[i].tobytes()
        j = seen.get(key)
        if j is None:
            j = seen[key] = len(reps)
            reps.append(i)
        sig[i] = j
    return sig, np.asarray(reps, dtype=np.int64)


def _impute_censored(R: np.ndarray, censored: np.ndarray, limit: np.ndarray, Linv: np.ndarray, li: np.ndarray,
                     Zs: np.ndarray, Zs_sorted: np.ndarray, rng: np.random.Generator) -> None:
    """Impute censored observations in place, in the decorrelated space and in the order of the decorrelation.

    ``R [m, D]``: observations minus the simulated mean (censored entries hold anything), ``limit`` the limit minus
    the mean; ``Linv [b, D, D]`` and ``Zs [b, D, K2]`` the whitening and the whitened simulations of each member's
    signature ``li``. For a censored entry j, the whitened value z_j is increasing in y_j given the entries before it,
    so y_j < LLOQ is z_j < z_lim; as in the "cdf" method of npde 2.0 (Nguyen et al. 2012) the pde is drawn uniformly
    below the simulated probability of that, F(z_lim), but here F is the distribution of z_j given the preceding
    observations (the whitened simulations) rather than the marginal of y_j, which ignores what the individual's
    other observations say and over-disperses the imputed NPDEs. The entry is set to the value whose z_j is the
    matching quantile of the whitened simulations."""
    K2 = Zs.shape[2]
    for j in range(R.shape[1]):
        rows = np.flatnonzero(censored[:, j])
        if rows.size == 0:
            continue
        w = Linv[li[rows], j, :]                                     # row j of the whitening, [r, D]
        before = np.einsum("rk,rk->r", w[:, :j], R[rows, :j])
        z_lim = before + w[:, j] * limit[rows, j]
        F = (Zs[li[rows], j, :] < z_lim[:, None]).mean(axis=1)
        pde = rng.uniform(0.0, 1.0, rows.size) * F
        z = Zs_sorted[li[rows], j, np.minimum((pde * K2).astype(np.int64), K2 - 1)]
        z = np.minimum(z, z_lim)
        R[rows, j] = (z - before) / w[:, j]


def npde(model: IndividualModel, population: PopulationModel, theta: np.ndarray, observations: np.ndarray,
         design: Design, covariates: Mapping[str, np.ndarray] | None, groups: np.ndarray | None,
         rng: np.random.Generator, n_simulations: int, residual: ResidualError | None = None,
         censoring: Censoring | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """NPDE and EPRED ``[n, T, d]`` (NaN where not observed) from ``n_simulations`` data sets simulated from the
    population model at ``theta`` (each individual's design, covariates and group), and the number of observations
    whose simulated variance was zero (NPDE undefined, NaN).

    Individuals with the same design and population mean (a common sampling grid, the same group and covariates)
    share one set of simulations and one decorrelation (:func:`predictive_signatures`); the work is done in blocks
    of such signatures so that memory stays bounded.

    Censored observations (``censoring.blq``) are imputed (:func:`_impute_censored`): without that the uncensored
    NPDEs alone are truncated and biased upwards."""
    obs = np.asarray(observations, dtype=np.float64)
    n, T, d = obs.shape
    K = int(n_simulations)
    K1 = K // 2                                   # simulations that estimate the decorrelation
    K2 = K - K1                                   # simulations the observation is compared with
    use = np.asarray(design["mask"], dtype=bool)[..., None] & np.ones((1, 1, d), dtype=bool)
    uflat = use.reshape(n, T * d)
    blq = None if censoring is None or not censoring.any else (censoring.blq & use).reshape(n, T * d)
    lloq = None if blq is None else censoring.lloq.reshape(n, T * d)
    obs_flat = obs.reshape(n, T * d)
    mu = population.design(n, covariates, groups).mean(np.asarray(theta, dtype=np.float64))
    sig, reps = predictive_signatures(design, mu)
    members = np.argsort(sig, kind="stable")
    starts = np.searchsorted(sig[members], np.arange(reps.size + 1))
    out = np.full(n * T * d, np.nan)
    epred = np.full(n * T * d, np.nan)
    block = max(1, int(NPDE_BLOCK_VALUES // max(K * T * d, 1)))
    zero_var = 0
    for a in range(0, reps.size, block):
        sigs = np.arange(a, min(reps.size, a + block))
        idx = reps[sigs]
        b = idx.size
        cnt = uflat[idx].sum(axis=1)
        D = int(cnt.max())
        if D == 0:
            continue
        phi = sample_population(population, theta, n, covariates, groups, rng, index=idx, n_replicates=K)
        sims = simulate_observations(model, phi.reshape(-1, phi.shape[-1]), take_design(design, np.tile(idx, K)),
                                     rng, residual)
        sims = np.asarray(sims, dtype=np.float64).reshape(K, b, T * d)
        order = np.argsort(~uflat[idx], axis=1, kind="stable")[:, :D]   # observed entries first
        valid = np.arange(D)[None, :] < cnt[:, None]                      # [b, D]
        S = np.take_along_axis(sims, np.broadcast_to(order[None], (K, b, D)), axis=2)
        if np.isnan(S).any():  # failed simulations: the mean of the others at that point
            m = np.nanmean(np.where(valid[None], S, 0.0), axis=0)
            S = np.where(np.isnan(S), m[None], S)
        # padding: independent N(0, 1) components after the observed ones leave the observed block of the
        # Cholesky factor (lower triangular, observed first) exactly as on the observed entries alone
        S = np.where(valid[None], S, rng.standard_normal(S.shape))
        E = S[:K1].mean(axis=0)                                           # [b, D]
        C = np.transpose(S[:K1] - E[None], (1, 2, 0))                     # [b, D, K1]
        V = C @ np.transpose(C, (0, 2, 1)) / (K1 - 1)                     # [b, D, D]
        dg = np.diagonal(V, axis1=1, axis2=2)
        scale = np.maximum(dg.max(axis=1), 1e-300)
        degenerate = dg <= 1e-12 * scale[:, None]                         # zero simulated variance
        V = V + (1e-9 * scale)[:, None, None] * np.eye(D)[None]
        try:
            L = np.linalg.cholesky(V)
        except np.linalg.LinAlgError:
            L = np.linalg.cholesky(V + (1e-6 * scale)[:, None, None] * np.eye(D)[None])
        Linv = np.linalg.inv(L)                                           # [b, D, D]
        Zs = Linv @ np.transpose(S[K1:] - E[None], (1, 2, 0))             # [b, D, K2]
        mean_all = S.mean(axis=0)
        Zs_sorted = np.sort(Zs, axis=2) if blq is not None else None
        # every member of these signatures
        mem = np.concatenate([members[starts[j]:starts[j + 1]] for j in sigs])
        loc = np.repeat(np.arange(b), [starts[j + 1] - starts[j] for j in sigs])   # signature of each member
        chunk = max(1, int(NPDE_BLOCK_VALUES // max(D * K2, 1)))
        for c0 in range(0, mem.size, chunk):
            mi, li = mem[c0:c0 + chunk], loc[c0:c0 + chunk]
            ok = valid[li]
            R = np.where(ok, np.take_along_axis(obs_flat[mi], order[li], axis=1), 0.0) - E[li]   # [m, D]
            if blq is not None:
                cb = np.take_along_axis(blq[mi], order[li], axis=1) & ok
                if cb.any():
                    lim = np.take_along_axis(lloq[mi], order[li], axis=1)
                    _impute_censored(R, cb, lim - E[li], Linv, li, Zs, Zs_sorted, rng)
            Zo = np.einsum("mij,mj->mi", Linv[li], R)                     # [m, D]
            pde = (Zs[li] < Zo[..., None]).mean(axis=2)
            val = special.ndtri(np.clip(pde, 1.0 / K2, 1.0 - 1.0 / K2))
            good = ok & ~degenerate[li]
            zero_var += int((ok & degenerate[li]).sum())
            flat = mi[:, None] * (T * d) + order[li]                      # positions in the flat output
            out[flat[good]] = val[good]
            epred[flat[ok]] = mean_all[li][ok]
    if zero_var:
        logger.info("NPDE undefined for %d observations with zero simulated variance", zero_var)
    return out.reshape(n, T, d), epred.reshape(n, T, d), zero_var


def population_means(fit: FitResult, n: int, covariates: Mapping[str, np.ndarray] | None,
                     groups: np.ndarray | None) -> np.ndarray:
    """mu_i(theta-hat) ``[n, k]``: each individual's typical log-parameters (its covariates and group, eta = 0)."""
    return fit.model.design(n, covariates, groups).mean(fit.estimate)


def compute_diagnostics(
    fit: FitResult, model: IndividualModel, observations: np.ndarray, design: Design,
    covariates: Mapping[str, np.ndarray] | None, groups: np.ndarray | None, rng: np.random.Generator, *,
    residual: ResidualError | None = None, censoring: Censoring | None = None,
    conditional: tuple[np.ndarray, np.ndarray] | None = None, n_simulations: int | None = None,
    with_npde: bool = True,
) -> Diagnostics:
    """PRED, IPRED, IWRES, NPDE and EPRED for every observation, and the individual conditional moments, ETAs and
    shrinkages (see the module docstring). ``residual`` is the population-level residual error (None: the model's
    own, see :mod:`~amortized_nlme.report.residuals`); ``n_simulations`` the K of the NPDE (None: chosen by
    :func:`n_npde_simulations`)."""
    obs = np.asarray(observations, dtype=np.float64)
    n, T, d = obs.shape
    mask = np.asarray(design["mask"], dtype=bool)
    observed = np.broadcast_to(mask[..., None], obs.shape).copy()
    blq = np.zeros_like(observed) if censoring is None else (censoring.blq & observed)
    if conditional is None:
        conditional = fit.objective.conditional_moments(fit.estimate)
    cmean, csd = conditional
    mu = population_means(fit, n, covariates, groups)
    pred = individual_predictions(model, mu, design)
    ipred = individual_predictions(model, cmean, design)
    sd, source = residual_sd(model, cmean, design, ipred, residual, rng)
    used = observed & ~blq
    with np.errstate(divide="ignore", invalid="ignore"):
        iwres = np.where(used & (sd > 0), (obs - ipred) / sd, np.nan)
    if with_npde:
        _, reps = predictive_signatures(design, mu)  # simulations are per distinct predictive distribution
        K = n_npde_simulations(int(observed[reps].sum()), int(observed.reshape(n, -1).sum(axis=1).max(initial=0)),
                               n_simulations)
        nd, ep, failed = npde(model, fit.model, fit.estimate, obs, design, covariates, groups, rng, K, residual,
                              censoring)
    else:
        K, failed = 0, 0
        nd = np.full(obs.shape, np.nan)
        ep = np.full(obs.shape, np.nan)
    L = fit.model.cholesky(fit.estimate)
    omega = np.sqrt(np.sum(L * L, axis=1))
    names = tuple(model.param_names)
    re = tuple(fit.model.random_effects)
    eta = cmean - mu
    eta_shr = {p: float(1.0 - np.std(eta[:, i], ddof=1) / omega[i]) if n > 1 else float("nan")
               for i, p in enumerate(names) if p in re}
    obs_names = tuple(model.obs_names[o] if o < len(model.obs_names) else f"y{o}" for o in range(d))
    eps_shr = {}
    for o, name in enumerate(obs_names):
        x = iwres[..., o][np.isfinite(iwres[..., o])]
        eps_shr[name] = float(1.0 - np.std(x, ddof=1)) if x.size > 1 else float("nan")
    return Diagnostics(observed=observed, blq=blq, dv=np.where(observed, obs, np.nan),
                       times=np.asarray(design["times"], dtype=np.float64), pred=pred, ipred=ipred, iwres=iwres,
                       npde=nd, epred=ep, mu=mu, cond_mean=cmean, cond_sd=csd, param_names=names,
                       random_effects=re, omega_sd=omega, obs_names=obs_names, n_npde_simulations=K,
                       residual_source=source, eta_shrinkage=eta_shr, epsilon_shrinkage=eps_shr, npde_failed=failed)


# ============================================================================ tables
def sdtab_frame(diag: Diagnostics, ids: Sequence[Any], groups: np.ndarray | None) -> pd.DataFrame:
    """One row per observation (BLQ ones included), in data order: ID, TIME, DV, PRED, IPRED, RES, IRES, IWRES,
    EPRED, NPDE, BLQ, and GROUP (with groups) and DVID/DVNAME (1-based observation type, with more than one)."""
    n, T, d = diag.dv.shape
    ii, jj, oo = np.nonzero(diag.observed)
    ids_arr = np.asarray([str(i) for i in ids], dtype=object)
    used = diag.used[ii, jj, oo]
    cols: dict[str, Any] = {"ID": ids_arr[ii], "TIME": diag.times[ii, jj]}
    if groups is not None:
        cols["GROUP"] = np.asarray(groups).astype(str)[ii]
    if d > 1:
        cols["DVID"] = oo + 1
        cols["DVNAME"] = np.asarray(diag.obs_names, dtype=object)[oo]
    dv, pred, ipred = diag.dv[ii, jj, oo], diag.pred[ii, jj, oo], diag.ipred[ii, jj, oo]
    cols.update({
        "DV": dv, "PRED": pred, "IPRED": ipred,
        "RES": np.where(used, dv - pred, np.nan), "IRES": np.where(used, dv - ipred, np.nan),
        "IWRES": diag.iwres[ii, jj, oo], "EPRED": diag.epred[ii, jj, oo], "NPDE": diag.npde[ii, jj, oo],
        "BLQ": diag.blq[ii, jj, oo].astype(np.int8),
    })
    return pd.DataFrame(cols)


def patab_frame(diag: Diagnostics, ids: Sequence[Any], groups: np.ndarray | None,
                covariates: Mapping[str, np.ndarray] | None,
                derived_values: Mapping[str, np.ndarray] | None = None) -> pd.DataFrame:
    """One row per individual: ID, GROUP, covariates, the natural-scale individual parameters exp(E[log p | y])
    (``<p>``), their conditional sd on the log scale (``<p>_sd_log``), derived parameters at the conditional means,
    and the ETAs of the random effects (``ETA_<p>`` = conditional mean minus the individual's population mean)."""
    cols: dict[str, Any] = {"ID": [str(i) for i in ids]}
    if groups is not None:
        cols["GROUP"] = np.asarray(groups).astype(str)
    for name, values in (covariates or {}).items():
        cols[name] = np.asarray(values).reshape(-1)
    for p, name in enumerate(diag.param_names):
        cols[name] = np.exp(diag.cond_mean[:, p])
        cols[f"{name}_sd_log"] = diag.cond_sd[:, p]
    for name, values in (derived_values or {}).items():
        cols[name] = np.asarray(values, dtype=np.float64)
    eta = diag.eta
    for p, name in enumerate(diag.param_names):
        if name in diag.random_effects:
            cols[f"ETA_{name}"] = eta[:, p]
    return pd.DataFrame(cols)


def binned_smooth(x: np.ndarray, y: np.ndarray, n_bins: int = 20, q: Sequence[float] = (0.5,)
                  ) -> tuple[np.ndarray, np.ndarray]:
    """A robust trend for scatter plots: quantiles ``q`` of y in ``n_bins`` equal-count bins of x (fewer for small
    data: at least 20 points a bin), at the bins' median x (``[B]``, ``[B, len(q)]``)."""
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size < 10:
        return np.empty(0), np.empty((0, len(q)))
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    nb = int(min(n_bins, max(2, x.size // 20)))
    parts = np.array_split(np.arange(x.size), nb)
    xs = np.array([np.median(x[p]) for p in parts])
    ys = np.array([np.quantile(y[p], q) for p in parts]).reshape(len(parts), len(q))
    return xs, ys


def is_log_scale(name: str) -> bool:
    """Whether an observation type is already on a log scale (by its name: ``log...``)."""
    return name.lower().startswith("log")
