"""Per-individual importance proposals for the exact likelihood, their diagnostics and their refinement.

The trained estimator q(phi | y_i) is the default proposal g_i. Its quality for the weights that matter — those at the
fitted population, w_ij = p(y_i | psi_ij) N(psi_ij; mu_i, Sigma) / g_i(phi_ij) — is judged per individual by the
Pareto-k̂ of PSIS (Vehtari et al. 2024; computed by ArviZ) and the effective sample size. Where k̂ > 0.7 the proposal
missed: the individual's posterior under the fitted population is located by Newton's method from its best draws
(several starts, so that symmetric models keep every mode), and g_i becomes a defensive mixture

    g_i = alpha q(phi | y_i) + (1 - alpha) sum_c pi_c t_5(psi; mode_c, kappa Laplace covariance_c) r_i(s | psi)

(r_i: the auxiliary conditional, for residual sds that are population parameters), drawn with exact stratified
proportions so that the importance estimate stays unbiased. The mixture does not depend on theta once built, so the
objective remains a valid likelihood estimate everywhere; individuals still failing after the last round are listed in
the results.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.special import gammaln, logsumexp

from amortized_nlme.inference.likelihood import (
    AuxiliaryConditional, WeightPlan, individual_loglik, residual_statistics)
from amortized_nlme.model import Design, IndividualModel, take_design
from amortized_nlme.population.objective import PopulationObjective
from amortized_nlme.population.model import whiten_inverse
from amortized_nlme.population.residual import draw_logliks
from amortized_nlme.posterior import TrainedEstimator, posterior_draws

logger = logging.getLogger(__name__)

#: Pareto-k̂ above which an individual's importance weights are unreliable (Vehtari et al.)
KHAT_THRESHOLD = 0.7
#: degrees of freedom of the Student-t components
T_DF = 5.0
#: share of the draws that stay with the estimator in a refined proposal (the defensive part)
ALPHA = 0.2
#: kinds of mixture component: at an individual's population mean, or at a posterior mode / the weights' moments
POPULATION, MODE = 0, 1
#: share of a refined proposal's t part at posterior modes when it also has population components
MODE_SHARE = 0.6
#: starts optimised together (memory: 2k^2 model evaluations per start at once)
MODE_BLOCK = 256
#: the refinement's target is -inf beyond this many training-prior sds (the estimator's support is 10)
TARGET_SUPPORT_SD = 12.0


# ------------------------------------------------------------------------------------------------- diagnostics


def pareto_khat(log_weights: np.ndarray) -> np.ndarray:
    """PSIS Pareto-k̂ of each row of ``log_weights [n, M]`` (ArviZ); rows with fewer than 2 finite weights get inf."""
    from arviz_stats.base.array import array_stats

    lw = np.asarray(log_weights, dtype=np.float64)
    finite = np.isfinite(lw)
    lw = np.where(finite, lw, -1e300)
    lw = lw - lw.max(axis=1, keepdims=True)
    with np.errstate(all="ignore"):  # arviz_stats' psislw takes log-likelihoods (LOO): log weights enter negated
        _, khat = array_stats.psislw(-lw, r_eff=1.0, axis=-1)
    khat = np.asarray(khat, dtype=np.float64)
    khat[finite.sum(axis=1) < 2] = np.inf
    return np.where(np.isfinite(khat), khat, np.inf)


def effective_sample_size(log_weights: np.ndarray) -> np.ndarray:
    """(sum w)^2 / sum w^2 of each row of ``log_weights [n, M]``."""
    lw = np.asarray(log_weights, dtype=np.float64)
    lw = lw - np.max(np.where(np.isfinite(lw), lw, -np.inf), axis=1, keepdims=True)
    w = np.exp(np.where(np.isfinite(lw), lw, -np.inf))
    s = w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(s > 0, s * s / np.sum(w * w, axis=1), 0.0)


@dataclass
class ProposalDiagnostics:
    """Per-individual quality of the importance weights at a theta."""

    khat: np.ndarray
    ess: np.ndarray
    n_draws: int

    @property
    def flagged(self) -> np.ndarray:
        return np.flatnonzero(~(self.khat <= KHAT_THRESHOLD))

    def summary(self, ids) -> dict:
        flagged = self.flagged
        order = flagged[np.argsort(-self.khat[flagged])]
        return {"khat_median": float(np.median(self.khat)), "khat_p90": float(np.quantile(self.khat, 0.9)),
                "khat_max": float(np.max(self.khat)), "n_khat_above_0.7": int(flagged.size),
                "ess_median": float(np.median(self.ess)), "ess_min": float(np.min(self.ess)), "n_draws": self.n_draws,
                "individuals_khat_above_0.7": [{"id": str(ids[i]), "khat": float(self.khat[i]),
                                                "ess": float(self.ess[i])} for i in order[:200]]}


def diagnose(objective: PopulationObjective, theta: np.ndarray) -> ProposalDiagnostics:
    """k̂ and ESS of every individual's weights at ``theta``."""
    lw = objective.log_weights(theta)
    return ProposalDiagnostics(pareto_khat(lw), effective_sample_size(lw), lw.shape[1])


# ------------------------------------------------------------------------------------------- t mixtures


@dataclass
class TMixture:
    """Student-t components over psi for one individual, and the share alpha kept by the estimator."""

    loc: np.ndarray  # [C, kp]
    chol: np.ndarray  # [C, kp, kp]
    log_pi: np.ndarray  # [C]
    alpha: float = ALPHA
    df: float = T_DF
    rounds: np.ndarray | None = None  # refinement round of each component (see ProposalSet.add_mixtures)
    #: what each component is: POPULATION (at the population mean) or MODE (at a posterior mode / weighted moments)
    kinds: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.kinds is None:
            self.kinds = np.full(self.loc.shape[0], MODE, dtype=np.int8)

    def joined(self, other: "TMixture") -> "TMixture":
        """This mixture's components and ``other``'s, each set with half of the t part."""
        a = self.log_pi - logsumexp(self.log_pi) - math.log(2.0)
        b = other.log_pi - logsumexp(other.log_pi) - math.log(2.0)
        return TMixture(np.concatenate([self.loc, other.loc]), np.concatenate([self.chol, other.chol]),
                        np.concatenate([a, b]), self.alpha, self.df, kinds=np.concatenate([self.kinds, other.kinds]))

    def with_images(self, A: np.ndarray) -> "TMixture":
        """These components and their images under the linear map ``A`` (each image a t with location A mu and
        scale A Sigma A^T), the two sets sharing every component's weight equally."""
        cov = np.einsum("cij,ckj->cik", self.chol, self.chol)
        image_cov = np.einsum("ij,cjk,lk->cil", A, cov, A)
        image_chol = np.linalg.cholesky(0.5 * (image_cov + np.swapaxes(image_cov, 1, 2)))
        half = self.log_pi - math.log(2.0)
        return TMixture(np.concatenate([self.loc, self.loc @ A.T]), np.concatenate([self.chol, image_chol]),
                        np.concatenate([half, half]), self.alpha, self.df, kinds=np.concatenate([self.kinds,
                                                                                                 self.kinds]))

    def counts(self, m: int) -> tuple[int, np.ndarray]:
        """Draws from q and from each component for ``m`` draws: exact, deterministic (stratified) allocation."""
        m_q = max(1, int(round(self.alpha * m)))
        rest = m - m_q
        share = np.exp(self.log_pi - logsumexp(self.log_pi)) * rest
        c = np.floor(share).astype(int)
        c[np.argsort(-(share - c))[: rest - c.sum()]] += 1
        return m_q, c

    def sample(self, counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        out = []
        k = self.loc.shape[1]
        for c, m in enumerate(counts):
            if m == 0:
                continue
            z = rng.standard_normal((m, k))
            u = rng.chisquare(self.df, size=m) / self.df
            out.append(self.loc[c] + (z @ self.chol[c].T) / np.sqrt(u)[:, None])
        return np.concatenate(out) if out else np.zeros((0, k))

    def log_prob(self, x: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """log of sum_c (m_c / m_t) t_c(x) with the realised allocation ``counts`` (m_t = counts.sum())."""
        k = self.loc.shape[1]
        total = counts.sum()
        parts = []
        for c, m in enumerate(counts):
            if m == 0:
                continue
            r = np.linalg.solve(self.chol[c], (x - self.loc[c]).T).T
            delta = np.sum(r * r, axis=1)
            logdet = np.sum(np.log(np.diag(self.chol[c])))
            lt = (gammaln(0.5 * (self.df + k)) - gammaln(0.5 * self.df) - 0.5 * k * math.log(self.df * math.pi)
                  - logdet - 0.5 * (self.df + k) * np.log1p(delta / self.df))
            parts.append(math.log(m / total) + lt)
        return logsumexp(np.stack(parts), axis=0)


@dataclass
class ProposalSet:
    """The proposals g_i of every individual: the estimator, with t mixtures for refined individuals."""

    estimator: TrainedEstimator
    model: IndividualModel
    plan: WeightPlan
    observations: np.ndarray
    design: Design
    data_hash: str
    cache_dir: Path | None
    aux: AuxiliaryConditional | None = None
    mixtures: dict[int, TMixture] = field(default_factory=dict)

    def add_mixtures(self, mixtures: dict[int, TMixture], keep_population_rounds: int = 2) -> None:
        """Add refined components. Components at posterior modes are never dropped (a mode found once stays
        covered wherever the fit goes next: dropping them collapsed the effective sample size of individuals the
        population components do not cover); population components are kept for the last
        ``keep_population_rounds`` rounds. Shares of the t part: :data:`MODE_SHARE` for the modes (an equal share
        per round, the Laplace proportions within it), the rest for the population components (equal per round);
        all of it to whichever kind an individual has alone. For a model with a mirror symmetry (see
        :meth:`~amortized_nlme.model.IndividualModel.mirror_map`) every component comes with its mirror image, so
        that both branches stay covered wherever the fit is."""
        mirror = self.mirror_on_psi()
        for i, new in mixtures.items():
            if mirror is not None:
                new = new.with_images(mirror)
            old = self.mixtures.get(i)
            if old is None:
                loc, chol, log_pi, kinds = new.loc, new.chol, new.log_pi, new.kinds
                rounds = np.zeros(new.loc.shape[0], dtype=np.int64)
            else:
                loc, chol = np.concatenate([old.loc, new.loc]), np.concatenate([old.chol, new.chol])
                log_pi, kinds = np.concatenate([old.log_pi, new.log_pi]), np.concatenate([old.kinds, new.kinds])
                rounds = np.concatenate([old.rounds, np.full(new.loc.shape[0], old.rounds.max() + 1)])
            population = kinds == POPULATION
            kept_pop_rounds = np.unique(rounds[population])[-keep_population_rounds:]
            keep = ~population | np.isin(rounds, kept_pop_rounds)
            log_pi = np.array(log_pi, dtype=np.float64)
            has_modes, has_pop = bool(np.any(keep & ~population)), bool(np.any(keep & population))
            for kind, share in ((MODE, MODE_SHARE if has_pop else 1.0), (POPULATION, 1.0 - MODE_SHARE if has_modes else 1.0)):
                groups = np.unique(rounds[keep & (kinds == kind)])
                for g in groups:  # the kind's share split equally over its rounds, the round's proportions within
                    sel = keep & (kinds == kind) & (rounds == g)
                    log_pi[sel] = log_pi[sel] - logsumexp(log_pi[sel]) + math.log(share / groups.size)
            self.mixtures[i] = TMixture(loc[keep], chol[keep], log_pi[keep], new.alpha, new.df,
                                        rounds=rounds[keep], kinds=kinds[keep])

    def mirror_on_psi(self) -> np.ndarray | None:
        """The model's mirror map restricted to the coordinates the population covers (None when it has none, or
        when it would mix them with auxiliary coordinates)."""
        A = self.model.mirror_map()
        if A is None:
            return None
        psi, aux = self.plan.psi_index, self.plan.aux_index
        if aux.size and (np.any(A[np.ix_(psi, aux)]) or np.any(A[np.ix_(aux, psi)])):
            return None
        return np.asarray(A, dtype=np.float64)[np.ix_(psi, psi)]

    def draw(self, m: int, seed: int, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``m`` draws per individual (``rows``; default all) and their log proposal densities ``[n, m]``."""
        all_rows = rows is None
        rows = np.arange(self.observations.shape[0]) if rows is None else np.asarray(rows)
        obs, des = self.observations[rows], take_design(self.design, rows)
        if all_rows:
            phi = posterior_draws(self.estimator, obs, des, m, seed, self.data_hash, self.cache_dir)
        else:
            phi = self.estimator.sample(obs, des, m, seed=seed)
        phi = np.asarray(phi, dtype=np.float64)
        log_g = np.asarray(self.estimator.log_prob(phi, obs, des), dtype=np.float64)
        mixed = [(r, i) for r, i in enumerate(rows) if int(i) in self.mixtures]
        if mixed:
            self._mix(phi, log_g, mixed, m, seed)
        return phi, log_g

    def _mix(self, phi: np.ndarray, log_g: np.ndarray, mixed: list[tuple[int, int]], m: int, seed: int) -> None:
        """Replace the refined individuals' draws by stratified mixture draws and set their exact log densities."""
        k = phi.shape[2]
        pi_ = self.plan.psi_index
        local = np.array([r for r, _ in mixed])
        data_rows = np.array([i for _, i in mixed])
        plans = []
        for r, i in mixed:
            mix = self.mixtures[i]
            m_q, counts = mix.counts(m)
            rng = np.random.default_rng([int(seed) % (1 << 63), 0x7A5E, int(i)])
            psi_t = mix.sample(counts, rng)
            full = np.empty((psi_t.shape[0], k))
            full[:, pi_] = psi_t
            if self.plan.aux_index.size:
                full[:, self.plan.aux_index] = self.aux.sample(psi_t[None], np.array([i]), rng)[0]
            phi[r, m_q:] = full
            plans.append((m_q, counts))
        # log q at every draw of the refined individuals (their new draws included)
        log_q = np.asarray(self.estimator.log_prob(phi[local], self.observations[data_rows],
                                                   take_design(self.design, data_rows)), dtype=np.float64)
        for (r, i), lq, (m_q, counts) in zip(mixed, log_q, plans):
            mix = self.mixtures[i]
            lt = mix.log_prob(phi[r][:, pi_], counts)
            if self.plan.aux_index.size:
                lt = lt + self.aux.log_prob(phi[r][None], np.array([i]))[0]
            log_g[r] = np.logaddexp(math.log(m_q / m) + lq, math.log((m - m_q) / m) + lt)


# ------------------------------------------------------------------------------------------ refinement


class TargetDensity:
    """log of each individual's posterior under the population model at theta, over psi, up to a constant:
    log p(y_i | psi; residual sds) + log N(psi; mu_i(theta), Sigma(theta))."""

    def __init__(self, objective: PopulationObjective, theta: np.ndarray, model: IndividualModel, plan: WeightPlan,
                 observations: np.ndarray, design: Design, aux: AuxiliaryConditional | None) -> None:
        self.model, self.plan, self.obs, self.design, self.aux = model, plan, observations, design, aux
        self.mu = objective.design.mean(theta)
        self.A = whiten_inverse(objective.model.cholesky(theta))
        self.sds = objective.residual_sds(theta)
        self.prior = plan.prior(model)

    def __call__(self, psi: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Target at points ``psi [r, kp]``, row r belonging to individual ``rows[r]`` (-inf far outside the training
        prior, where the model is not even evaluated: a line search may step anywhere)."""
        out = np.full(psi.shape[0], -np.inf)
        inside = np.all(np.abs(psi - self.prior.mean) <= TARGET_SUPPORT_SD * self.prior.std, axis=1)
        inside &= np.all(np.isfinite(psi), axis=1)
        if inside.any():
            out[inside] = self._evaluate(psi[inside], rows[inside])
        return out

    def _evaluate(self, psi: np.ndarray, rows: np.ndarray) -> np.ndarray:
        z = (psi - self.mu[rows]) @ self.A.T
        log_pop = -0.5 * np.sum(z * z, axis=1)
        k = self.model.n_params
        if self.plan.residual is None:
            ll = individual_loglik(self.model, psi[:, None, :], self.obs[rows], take_design(self.design, rows))[:, 0]
        else:
            full = np.zeros((psi.shape[0], 1, k))
            full[:, 0, self.plan.psi_index] = psi
            if self.plan.aux_index.size:
                full[:, 0, self.plan.aux_index] = self.aux.ms[rows]
            stats, failed = residual_statistics(self.model, full, self.obs, self.design, self.plan.residual.kind,
                                                rows)
            ll = draw_logliks(stats, *self.sds)[:, 0]
            ll[failed[:, 0]] = -np.inf
        out = ll + log_pop
        return np.where(np.isfinite(out), out, -np.inf)


def _fd_derivatives(target: TargetDensity, x: np.ndarray, rows: np.ndarray, h: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Value, central-difference gradient and Hessian of ``target`` at ``x [r, k]`` (one vectorised call)."""
    r, k = x.shape
    pts = [x]
    E = np.eye(k)
    for a in range(k):
        pts += [x + h[:, a:a + 1] * E[a], x - h[:, a:a + 1] * E[a]]
    pairs = [(a, b) for a in range(k) for b in range(a)]
    for a, b in pairs:
        ea, eb = h[:, a:a + 1] * E[a], h[:, b:b + 1] * E[b]
        pts += [x + ea + eb, x + ea - eb, x - ea + eb, x - ea - eb]
    P = np.stack(pts, axis=1)  # [r, E, k]
    vals = target(P.reshape(-1, k), np.repeat(rows, P.shape[1])).reshape(r, -1)
    f0 = vals[:, 0]
    g = np.empty((r, k))
    H = np.empty((r, k, k))
    for a in range(k):
        fp, fm = vals[:, 1 + 2 * a], vals[:, 2 + 2 * a]
        g[:, a] = (fp - fm) / (2 * h[:, a])
        H[:, a, a] = (fp - 2 * f0 + fm) / h[:, a] ** 2
    base = 1 + 2 * k
    for q, (a, b) in enumerate(pairs):
        v = vals[:, base + 4 * q: base + 4 * q + 4]
        H[:, a, b] = H[:, b, a] = (v[:, 0] - v[:, 1] - v[:, 2] + v[:, 3]) / (4 * h[:, a] * h[:, b])
    return f0, g, H


def _negdef(H: np.ndarray, floor: float = 1e-8) -> np.ndarray:
    """-H made positive definite (eigenvalues clipped from below)."""
    w, V = np.linalg.eigh(-0.5 * (H + np.swapaxes(H, 1, 2)))
    w = np.maximum(np.nan_to_num(w, nan=floor), floor * np.maximum(1.0, np.abs(w).max(axis=1, keepdims=True)))
    return np.einsum("rij,rj,rkj->rik", V, w, V)


def _fd_gradient(target: TargetDensity, x: np.ndarray, rows: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Central-difference gradient of ``target`` at ``x [r, k]`` (one vectorised call, 2k points per row)."""
    r, k = x.shape
    E = np.eye(k)
    P = np.concatenate([x[:, None, :] + h[:, None, :] * E[None], x[:, None, :] - h[:, None, :] * E[None]], axis=1)
    vals = target(P.reshape(-1, k), np.repeat(rows, 2 * k)).reshape(r, 2 * k)
    return (vals[:, :k] - vals[:, k:]) / (2 * h)


def find_modes(target: TargetDensity, x0: np.ndarray, rows: np.ndarray, h: np.ndarray, max_iter: int = 30,
               refresh: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Damped Newton ascent of ``target`` from ``x0 [r, k]`` for each row, the Hessian (finite differences, 2k^2
    evaluations) refreshed every ``refresh`` iterations and gradients (2k evaluations) in between; returns modes,
    values and the positive definite precision (-Hessian) at the modes."""
    x = np.array(x0, dtype=np.float64)
    r, k = x.shape
    active = np.ones(r, dtype=bool)
    f = target(x, rows)
    P = np.empty((r, k, k))
    P[:] = np.eye(k)
    stale = np.ones(r, dtype=bool)  # rows whose Hessian must be recomputed before the next step
    for it in range(max_iter):
        idx = np.flatnonzero(active & np.isfinite(f))
        if idx.size == 0:
            break
        g = np.empty((idx.size, k))
        fresh = stale[idx] | (it % refresh == 0)
        if fresh.any():
            _, g[fresh], H = _fd_derivatives(target, x[idx[fresh]], rows[idx[fresh]], h[idx[fresh]])
            P[idx[fresh]] = _negdef(H)
            stale[idx[fresh]] = False
        if (~fresh).any():
            g[~fresh] = _fd_gradient(target, x[idx[~fresh]], rows[idx[~fresh]], h[idx[~fresh]])
        f0 = f[idx]
        d = np.linalg.solve(P[idx], g[..., None])[..., 0]
        decrement = np.einsum("rk,rk->r", g, d)
        done = ~(decrement > 1e-5) | ~np.all(np.isfinite(d), axis=1)
        step = np.ones(idx.size)
        accepted = np.zeros(idx.size, dtype=bool)
        for _ls in range(12):
            trial = np.flatnonzero(~accepted & ~done)
            if trial.size == 0:
                break
            xt = x[idx[trial]] + step[trial, None] * d[trial]
            ft = target(xt, rows[idx[trial]])
            ok = ft >= f0[trial] + 1e-4 * step[trial] * decrement[trial]
            x[idx[trial[ok]]] = xt[ok]
            f[idx[trial[ok]]] = ft[ok]
            accepted[trial[ok]] = True
            step[trial[~ok]] *= 0.5
        # a failed line search with an old Hessian gets a fresh one before giving up
        retry = ~accepted & ~done & ~fresh
        stale[idx[retry]] = True
        active[idx[(done | ~accepted) & ~retry]] = False
    ok_rows = np.flatnonzero(np.isfinite(f))
    if ok_rows.size:
        _, _, H = _fd_derivatives(target, x[ok_rows], rows[ok_rows], h[ok_rows])
        P[ok_rows] = _negdef(H)
    return x, f, P


def population_components(objective: PopulationObjective, theta: np.ndarray, n: int, inflation: float = 1.5
                          ) -> dict[int, TMixture]:
    """For every individual a Student t at its population mean mu_i(theta) with the population covariance (inflated):
    the posterior of an individual with little data is close to it, whatever the estimator proposes there."""
    theta = np.asarray(theta, dtype=np.float64)
    mu = objective.design.mean(theta)
    L = objective.model.cholesky(theta) * inflation
    return {i: TMixture(mu[i][None].copy(), L[None].copy(), np.zeros(1), kinds=np.full(1, POPULATION, dtype=np.int8))
            for i in range(n)}


def build_mixtures(objective: PopulationObjective, theta: np.ndarray, proposals: ProposalSet, drawset,
                   individuals: np.ndarray, inflation: float = 1.0, n_starts: int = 1) -> dict[int, TMixture]:
    """t mixtures around the modes of the flagged ``individuals``' posteriors at ``theta``, started from each one's
    heaviest draws and its weighted mean (modes closer than one posterior sd are merged)."""
    target = TargetDensity(objective, theta, proposals.model, proposals.plan, proposals.observations,
                           proposals.design, proposals.aux)
    pop_chol = objective.model.cholesky(np.asarray(theta, dtype=np.float64))
    lw = objective.log_weights(theta, None)[individuals] if individuals.size else np.zeros((0, drawset.M))
    w = np.exp(lw - np.max(np.where(np.isfinite(lw), lw, -np.inf), axis=1, keepdims=True)) if lw.size else lw
    w = np.nan_to_num(w / np.maximum(w.sum(axis=1, keepdims=True), 1e-300))
    psi = drawset.draws[individuals]
    k = psi.shape[2]
    starts, owner = [], []
    for r, i in enumerate(individuals):
        wi = np.nan_to_num(w[r])
        top = np.argsort(-wi)[:n_starts]
        mean = wi @ psi[r] if wi.sum() > 0 else psi[r].mean(axis=0)
        # the estimator knows modes the current weights may not show (e.g. a symmetric model's mirror mode): one
        # start in each cluster of its draws, at the cluster's heaviest draw; starts closer than a quarter of the
        # draws' spread to an earlier one are dropped (they would find the same mode)
        sd = np.maximum(psi[r].std(axis=0), 1e-12)
        kept: list[np.ndarray] = []
        for x in [*psi[r][top], mean, *cluster_starts(psi[r], wi, lw[r])]:
            if all(np.max(np.abs(x - y) / sd) > 0.25 for y in kept):
                kept.append(x)
        for x in kept:
            starts.append(x)
            owner.append(r)
    starts, owner = np.array(starts), np.array(owner)
    spread = np.sqrt(np.maximum(np.einsum("rm,rmk->rk", np.nan_to_num(w), (psi - np.einsum("rm,rmk->rk", np.nan_to_num(w), psi)[:, None]) ** 2), 0))
    fallback = psi.std(axis=1)
    spread = np.where(spread > 1e-8, spread, fallback)
    h = np.clip(0.1 * spread[owner], 1e-5, 2e-2)
    # in blocks of starts: finite differences evaluate the model at 2k^2 points per start at once
    modes, values = np.empty_like(starts), np.empty(starts.shape[0])
    precision = np.empty((starts.shape[0], k, k))
    for a in range(0, starts.shape[0], MODE_BLOCK):
        b = min(a + MODE_BLOCK, starts.shape[0])
        modes[a:b], values[a:b], precision[a:b] = find_modes(target, starts[a:b], individuals[owner[a:b]], h[a:b])
    out: dict[int, TMixture] = {}
    for r, i in enumerate(individuals):
        mine = np.flatnonzero((owner == r) & np.isfinite(values))
        if mine.size == 0:
            continue
        comps: list[int] = []
        for j in mine[np.argsort(-values[mine])]:
            cov = np.linalg.inv(precision[j])
            if all(_mahalanobis(modes[j], modes[c], cov) > 1.0 for c in comps):
                comps.append(j)
        locs, chols, logpi = [], [], []
        for j in comps:
            cov = np.linalg.inv(_at_least_population(precision[j], pop_chol)) * inflation ** 2
            cov = 0.5 * (cov + cov.T)
            locs.append(modes[j])
            chols.append(np.linalg.cholesky(cov))
            # Laplace evidence of the mode: target value + log sqrt det(cov)
            logpi.append(values[j] + np.sum(np.log(np.diag(chols[-1]))))
        # adaptive importance sampling: a component matching the weighted draws' moments, as likely as the modes
        wi = np.nan_to_num(w[r])
        ess = wi.sum() ** 2 / max(np.sum(wi * wi), 1e-300)
        if ess >= max(5.0, 2.0 * k):
            mean = wi @ psi[r] / wi.sum()
            c = psi[r] - mean
            cov = (wi[:, None] * c).T @ c / wi.sum() * inflation ** 2 + 1e-10 * np.eye(k)
            try:
                chols.append(np.linalg.cholesky(0.5 * (cov + cov.T)))
                locs.append(mean)
                logpi.append(float(logsumexp(logpi)) if logpi else 0.0)
            except np.linalg.LinAlgError:
                pass
        if locs:
            out[int(i)] = TMixture(np.array(locs), np.array(chols), np.array(logpi))
    return out


def _at_least_population(P: np.ndarray, L: np.ndarray) -> np.ndarray:
    """A posterior precision no smaller than the population's (Sigma = L L^T): the population posterior of a
    log-concave likelihood is never wider than the population itself, so eigenvalues of the whitened precision below 1
    are finite-difference noise or a flat direction and are raised to 1."""
    Pw = L.T @ P @ L
    w, V = np.linalg.eigh(0.5 * (Pw + Pw.T))
    Pw = (V * np.maximum(w, 1.0)) @ V.T
    A = whiten_inverse(L)
    return A.T @ Pw @ A


def cluster_starts(draws: np.ndarray, weights: np.ndarray, log_weights: np.ndarray, n_clusters: int = 3,
                   iterations: int = 10) -> list[np.ndarray]:
    """One start per k-means cluster of an individual's draws (standardised): the cluster's draw with the largest
    log weight. Cheap and generic: it finds the estimator's other modes where the weights sit on one."""
    x = (draws - draws.mean(axis=0)) / np.maximum(draws.std(axis=0), 1e-12)
    rng = np.random.default_rng(0)
    centres = x[rng.choice(x.shape[0], size=min(n_clusters, x.shape[0]), replace=False)]
    for _ in range(iterations):
        label = np.argmin(((x[:, None, :] - centres[None]) ** 2).sum(axis=2), axis=1)
        centres = np.array([x[label == c].mean(axis=0) if np.any(label == c) else centres[c]
                            for c in range(centres.shape[0])])
    out = []
    lw = np.where(np.isfinite(log_weights), log_weights, -np.inf)
    for c in range(centres.shape[0]):
        members = np.flatnonzero(label == c)
        if members.size:
            out.append(draws[members[np.argmax(lw[members])]])
    return out


def _mahalanobis(a: np.ndarray, b: np.ndarray, cov: np.ndarray) -> float:
    d = a - b
    return float(np.sqrt(max(d @ np.linalg.solve(cov, d), 0.0)))
