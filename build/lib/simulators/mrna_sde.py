"""mRNA transfection as a chemical-Langevin SDE (Arruda et al. 2024, 8 parameters): intrinsic noise of translation.

    d(m, p) = (-delta m, k m - gamma p) dt + diag(sqrt(delta m), sqrt(k m + gamma p)) dB,   m(t0) = m0, p(t0) = 0
    y(t)    = log(scale p(t) + offset) + N(0, sigma^2),                                     p(t) = 0 for t <= t0

Euler-Maruyama with step 0.01 h, states clipped at 0 after every step. Every simulation has its own noise path: a
64-bit seed per individual is drawn from the ``rng`` passed to :meth:`MrnaSDE.simulate` and seeds a per-path
xoshiro256+ stream, so results do not depend on the thread count and repeat for the same ``rng`` seed. The likelihood
is intractable (``log_likelihood`` is not provided).
"""

from __future__ import annotations

import numba as nb
import numpy as np

from amortized_nlme.model import Design, IndividualModel, NormalPrior, fixed_grid_design
from simulators.mrna_common import TIME_GRID, encode_log_fluorescence_per_cell, log_fluorescence_from_dataset
from simulators.solvers import SUCCESS, _normal, em_step_size, make_euler_maruyama, observed_times, rng_init

#: Euler-Maruyama step (hours)
DT = 0.01


@nb.njit(cache=True, fastmath={"contract"})
def _drift(t: float, y: np.ndarray, p: np.ndarray, out: np.ndarray) -> None:
    """Drift of (m, p); ``p = (delta, gamma, k)``."""
    out[0] = -p[0] * y[0]
    out[1] = p[2] * y[0] - p[1] * y[1]


@nb.njit(cache=True, fastmath={"contract"})
def _diffusion(t: float, y: np.ndarray, p: np.ndarray, out: np.ndarray) -> None:
    """Diagonal noise amplitudes sqrt(propensities) of (m, p)."""
    out[0] = np.sqrt(max(p[0] * y[0], 0.0))
    out[1] = np.sqrt(max(p[2] * y[0] + p[1] * y[1], 0.0))


_solve = make_euler_maruyama(_drift, _diffusion, dim=2)


@nb.njit(parallel=True, cache=True)
def _latent(phi: np.ndarray, times: np.ndarray, mask: np.ndarray, seeds: np.ndarray, dt: float) -> np.ndarray:
    """log(scale p + offset) along one noise path per individual, 0 where masked; NaN row on failure."""
    n, T = times.shape
    out = np.zeros((n, T))
    for i in nb.prange(n):
        x = np.exp(phi[i])
        p = np.array([x[0], x[1], x[2]])
        y0 = np.array([x[3], 0.0])
        t_obs, idx = observed_times(times[i], mask[i])
        Y, status = _solve(p, y0, x[5], t_obs, dt, seeds[i], True)
        ok = status == SUCCESS
        for j in range(idx.size):
            v = np.log(x[4] * Y[j, 1] + x[6])
            if not np.isfinite(v):
                ok = False
            out[i, idx[j]] = v
        if not ok:
            out[i, :] = np.nan
    return out


# ---------------------------------------------------------------------------------------------------------------
# lock-step kernel: individuals that share one design (every simulation for training) advance together

#: individuals advanced together; their independent square-root chains overlap in the CPU (~1.6x throughput)
LANES = 8


@nb.njit(fastmath={"contract"}, inline="always")
def _em_step(m, p, delta, gamma, k, h, sh, s0, s1, s2, s3):
    """One Euler-Maruyama step of (m, p), clipped at 0; the same increments as ``_drift``/``_diffusion`` through
    the generic solver, and the same draws from the path's stream (m's normal, then p's)."""
    z1, s0, s1, s2, s3 = _normal(s0, s1, s2, s3)
    z2, s0, s1, s2, s3 = _normal(s0, s1, s2, s3)
    am = delta * m
    mn = (m - am * h) + np.sqrt(max(am, 0.0)) * (sh * z1)
    pn = (p + (k * m - gamma * p) * h) + np.sqrt(max(k * m + gamma * p, 0.0)) * (sh * z2)
    return (mn if mn > 0.0 else 0.0), (pn if pn > 0.0 else 0.0), s0, s1, s2, s3


@nb.njit(fastmath={"contract"})
def _lockstep_block(x: np.ndarray, t_out: np.ndarray, seeds: np.ndarray, dt: float, out: np.ndarray) -> None:
    """p at ``t_out`` for a block of individuals (rows of natural parameters ``x``), written to ``out``.

    The generic solver restarts its dt grid at every output time, so between two outputs every running path takes
    the same steps: two paths at a time take them in one loop, so that the CPU overlaps their dependency chains. A
    path starting inside an interval takes its own steps from t0 first. Each path keeps its own stream, so a path's
    result does not depend on its block or partner."""
    L = x.shape[0]
    T = t_out.size
    mp = np.zeros((L, 2))                  # (m, p) per lane
    rs = np.empty((L, 4), dtype=np.uint64)  # each lane's xoshiro256+ state, contiguous
    for lane in range(L):
        rs[lane] = rng_init(seeds[lane])
        mp[lane, 0] = x[lane, 3]
    sq = np.sqrt(dt)
    running = np.empty(L, np.int64)
    n_running = 0
    t_prev = -np.inf
    for j in range(T):
        t_stop = t_out[j]
        # running lanes two at a time: both states stay in registers, their square-root chains overlap
        for a in range(0, n_running, 2):
            i = running[a]
            k = running[a + 1] if a + 1 < n_running else i  # odd count: the last lane twice, identical results
            m1, p1, a0, a1, a2, a3 = mp[i, 0], mp[i, 1], rs[i, 0], rs[i, 1], rs[i, 2], rs[i, 3]
            m2, p2, b0, b1, b2, b3 = mp[k, 0], mp[k, 1], rs[k, 0], rs[k, 1], rs[k, 2], rs[k, 3]
            t = t_prev
            while t_stop - t > 1e-9:
                h, sh = em_step_size(t, t_stop, dt, sq)
                m1, p1, a0, a1, a2, a3 = _em_step(m1, p1, x[i, 0], x[i, 1], x[i, 2], h, sh, a0, a1, a2, a3)
                m2, p2, b0, b1, b2, b3 = _em_step(m2, p2, x[k, 0], x[k, 1], x[k, 2], h, sh, b0, b1, b2, b3)
                t += h
            mp[k, 0], mp[k, 1], rs[k, 0], rs[k, 1], rs[k, 2], rs[k, 3] = m2, p2, b0, b1, b2, b3
            mp[i, 0], mp[i, 1], rs[i, 0], rs[i, 1], rs[i, 2], rs[i, 3] = m1, p1, a0, a1, a2, a3
        for i in range(L):
            t0 = x[i, 5]
            if t_prev < t0 < t_stop:
                a0, a1, a2, a3 = rs[i, 0], rs[i, 1], rs[i, 2], rs[i, 3]
                mm, pp = mp[i, 0], mp[i, 1]
                t = t0
                while t_stop - t > 1e-9:
                    h, sh = em_step_size(t, t_stop, dt, sq)
                    mm, pp, a0, a1, a2, a3 = _em_step(mm, pp, x[i, 0], x[i, 1], x[i, 2], h, sh, a0, a1, a2, a3)
                    t += h
                mp[i, 0], mp[i, 1], rs[i, 0], rs[i, 1], rs[i, 2], rs[i, 3] = mm, pp, a0, a1, a2, a3
        n_running = 0
        for i in range(L):
            if x[i, 5] <= t_stop:
                running[n_running] = i
                n_running += 1
            out[i, j] = mp[i, 1]
        t_prev = t_stop


@nb.njit(parallel=True, cache=True)
def _latent_shared_design(phi: np.ndarray, times: np.ndarray, mask: np.ndarray, seeds: np.ndarray, dt: float
                          ) -> np.ndarray:
    """``_latent`` for individuals that all share the design of row 0 (blocks of LANES in lock-step)."""
    n, T = times.shape
    out = np.zeros((n, T))
    t_obs, idx = observed_times(times[0], mask[0])
    n_blocks = (n + LANES - 1) // LANES
    for b in nb.prange(n_blocks):
        b0 = b * LANES
        b1 = min(n, b0 + LANES)
        x = np.exp(phi[b0:b1])
        P = np.empty((b1 - b0, t_obs.size))
        _lockstep_block(x, t_obs, seeds[b0:b1], dt, P)
        for i in range(b1 - b0):
            ok = True
            for j in range(idx.size):
                v = np.log(x[i, 4] * P[i, j] + x[i, 6])
                if not np.isfinite(v):
                    ok = False
                out[b0 + i, idx[j]] = v
            if not ok:
                out[b0 + i, :] = np.nan
    return out


def _shares_one_design(times: np.ndarray, mask: np.ndarray) -> bool:
    """Whether every row has row 0's observed times (as in every simulation for training)."""
    return bool(np.all(mask == mask[:1]) and np.all(np.where(mask, times, 0.0) == np.where(mask[:1], times[:1], 0.0)))


class MrnaSDE(IndividualModel):
    """Stochastic two-state mRNA translation model (chemical Langevin equation) observed as log fluorescence."""

    name = "mrna_sde"
    version = "2"   # 2: per-cell normalised encoder (as mrna_simple 2)
    param_names = ("delta", "gamma", "k", "m0", "scale", "t0", "offset", "sigma")
    obs_names = ("log_fluorescence",)
    max_time_points = TIME_GRID.size
    time_unit = "h"
    error_params = ("sigma",)
    error_kind = "additive"

    # Normal(mean, VARIANCE) on the log scale
    _PRIOR = NormalPrior(param_names, np.array([-3.0, -3.0, -1.0, 5.0, 0.0, 0.0, 1.0, -1.0]),
                         np.array([5.0, 5.0, 5.0, 5.0, 5.0, 2.0, 5.0, 2.0]))

    @property
    def prior(self) -> NormalPrior:
        return self._PRIOR

    def sample_design(self, n: int, rng: np.random.Generator) -> Design:
        return fixed_grid_design(n, TIME_GRID)

    def simulate(self, phi: np.ndarray, design: Design, rng: np.random.Generator) -> np.ndarray:
        phi = self.check_phi(phi)
        n = phi.shape[0]
        seeds = rng.integers(0, np.iinfo(np.int64).max, size=n, dtype=np.int64)
        times = np.ascontiguousarray(design["times"], dtype=np.float64)
        mask = np.ascontiguousarray(design["mask"], dtype=np.bool_)
        kernel = _latent_shared_design if _shares_one_design(times, mask) else _latent
        latent = kernel(phi, times, mask, seeds, DT)[..., None]
        sigma = np.exp(phi[:, 7])[:, None, None]
        y = latent + sigma * rng.standard_normal(latent.shape)
        return np.where(mask[..., None], y, 0.0) + np.where(np.isnan(latent), np.nan, 0.0)

    def encode(self, observations: np.ndarray, design: Design) -> np.ndarray:
        return encode_log_fluorescence_per_cell(observations, design)

    def from_dataset(self, data) -> tuple[np.ndarray, Design]:
        return log_fluorescence_from_dataset(self.name, data)
