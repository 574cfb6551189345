"""The numba individual models: shapes, masks, failure handling, likelihoods, reproducibility, reference solutions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from scipy.integrate import solve_ivp

from amortized_nlme.data import DataError, Dataset
from amortized_nlme.model import take_design
from simulators import get_model
from simulators.mrna_detailed import _jac, _rhs, solve_protein
from simulators.mrna_simple import TIME_GRID, MrnaSimple
from simulators.pk_oral_1cmt import MAX_OBS

MODELS = ["mrna_detailed", "mrna_sde", "pk_oral_1cmt", "pk_oral_1cmt_combined"]
N = 200


def _draw(name: str, n: int = N, seed: int = 0):
    model = get_model(name)
    rng = np.random.default_rng(seed)
    phi = model.prior.sample(n, rng)
    design = model.sample_design(n, rng)
    return model, phi, design


@pytest.mark.parametrize("name", MODELS)
def test_shapes_masks_and_failure_fraction(name: str) -> None:
    model, phi, design = _draw(name)
    y = model.simulate(phi, design, np.random.default_rng(1))
    T = model.max_time_points
    assert model.version.isdigit() and len(model.param_names) == phi.shape[1] == model.prior.dim
    assert y.shape == (N, T, 1) and y.dtype == np.float64
    assert design["times"].shape == design["mask"].shape == (N, T)
    failed = np.isnan(y).any(axis=(1, 2))
    assert failed.mean() < 0.1
    assert np.isnan(y[failed]).all()  # a failed simulation is a whole NaN row, never a partial one
    ok = y[~failed]
    assert np.isfinite(ok).all()
    assert (ok[~design["mask"][~failed]] == 0.0).all()
    x = model.encode(y[~failed], take_design(design, ~failed))
    assert x.dtype == np.float32 and x.shape[:2] == (int((~failed).sum()), T)
    assert (x[~design["mask"][~failed]] == 0.0).all()  # padded rows all zero


@pytest.mark.parametrize("name", MODELS)
def test_reproducible_for_same_seed(name: str) -> None:
    model, phi, design = _draw(name, n=20)
    a = model.simulate(phi, design, np.random.default_rng(5))
    b = model.simulate(phi, design, np.random.default_rng(5))
    c = model.simulate(phi, design, np.random.default_rng(6))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(np.nan_to_num(a), np.nan_to_num(c))


@pytest.mark.parametrize("name", ["mrna_detailed", "pk_oral_1cmt", "pk_oral_1cmt_combined"])
def test_log_likelihood_is_the_gaussian_density(name: str) -> None:
    model, phi, design = _draw(name, n=30)
    y = model.simulate(phi, design, np.random.default_rng(2))
    keep = ~np.isnan(y).any(axis=(1, 2))
    phi, y, design = phi[keep], y[keep], take_design(design, keep)
    design["mask"][:, -3:] = False  # masked points must not count, whatever their value
    y[:, -3:, 0] = 1e6
    mean = model.predict(phi, design)[..., 0]
    if name == "pk_oral_1cmt_combined":
        sd = np.sqrt(np.exp(phi[:, 3:4]) ** 2 + (np.exp(phi[:, 4:5]) * mean) ** 2)
    else:
        sd = np.broadcast_to(np.exp(phi[:, -1:]), mean.shape)
    ref = np.where(design["mask"], stats.norm.logpdf(y[..., 0], loc=mean, scale=sd), 0.0).sum(axis=1)
    np.testing.assert_allclose(model.log_likelihood(phi, y, design), ref, rtol=1e-10)


# ---------------------------------------------------------------------------------------------------------------
# mrna_detailed
# ---------------------------------------------------------------------------------------------------------------


def test_detailed_matches_scipy_radau() -> None:
    model, phi, _ = _draw("mrna_detailed", n=40, seed=3)
    checked = 0
    for row in phi:
        prot = solve_protein(row, TIME_GRID, 1e-8, 1e-12)
        if not np.isfinite(prot).all():
            continue
        x = np.exp(row)
        p = np.array([x[0], x[1], x[2], x[4], x[5], x[6], x[7]])
        t0 = x[8]
        after = TIME_GRID > t0
        if after.sum() < 10:
            continue

        def f(t, y, p=p):
            out = np.empty(4)
            _rhs(t, y, p, out)
            return out

        def jac(t, y, p=p):
            J = np.empty((4, 4))
            _jac(t, y, p, J)
            return J

        sol = solve_ivp(f, (t0, TIME_GRID[-1]), [1.0, x[2], x[6], 0.0], method="Radau", jac=jac, rtol=1e-10,
                        atol=1e-14, t_eval=TIME_GRID[after])
        assert sol.success
        ref = x[3] * sol.y[3]
        assert np.all(prot[~after] == 0.0)
        big = ref > 1e-6 * ref.max()
        rel = np.abs(prot[after][big] - ref[big]) / ref[big]
        assert rel.max() < 1e-6, (row, rel.max())
        checked += 1
        if checked == 6:
            break
    assert checked == 6


def test_detailed_jacobian_matches_finite_differences() -> None:
    rng = np.random.default_rng(4)
    p = np.exp(rng.normal(size=7))
    y = np.exp(rng.normal(size=4))
    J = np.empty((4, 4))
    _jac(0.0, y, p, J)
    f0 = np.empty(4)
    _rhs(0.0, y, p, f0)
    for c in range(4):
        yp = y.copy()
        yp[c] += 1e-7
        f1 = np.empty(4)
        _rhs(0.0, yp, p, f1)
        np.testing.assert_allclose((f1 - f0) / 1e-7, J[:, c], rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # ~50 s: 400 stiff solves twice, one solver compiled without caching
def test_detailed_divergence_proof_changes_no_result() -> None:
    # the early DIVERGED (``_diverges``) only saves the steps of following e up to the bound: the same draws fail,
    # and every other solve is bit-for-bit the one without it
    from simulators.mrna_detailed import ATOL, MAX_STEPS, RTOL, _natural, _solve
    from simulators.solvers import SUCCESS, make_rodas4

    plain = make_rodas4(_rhs, _jac, dim=4)
    _, phi, _ = _draw("mrna_detailed", n=400, seed=8)
    e, ei = np.empty(0), np.empty(0, np.int64)
    failed = 0
    for row in phi:
        p, y0, t0, _, _ = _natural(row)
        a, sa = plain(p, y0, t0, TIME_GRID, e, e, ei, RTOL, ATOL, MAX_STEPS, True)
        b, sb = _solve(p, y0, t0, TIME_GRID, e, e, ei, RTOL, ATOL, MAX_STEPS, True)
        assert (sa == SUCCESS) == (sb == SUCCESS)
        np.testing.assert_array_equal(a, b)
        failed += sa != SUCCESS
    assert failed >= 3  # the prior does produce diverging draws


def test_detailed_before_t0_is_offset() -> None:
    model = get_model("mrna_detailed")
    phi = model.prior.mean[None, :].copy()
    phi[0, 8] = np.log(5.0)  # t0 = 5 h
    mean = model.predict(phi, model.sample_design(1, np.random.default_rng(0)))[0, :, 0]
    np.testing.assert_allclose(mean[TIME_GRID <= 5.0], phi[0, 9])
    assert np.all(mean[TIME_GRID > 5.2] > phi[0, 9])


# ---------------------------------------------------------------------------------------------------------------
# mrna_sde
# ---------------------------------------------------------------------------------------------------------------


def test_sde_large_copy_number_follows_the_ode_mean() -> None:
    # with m0 ~ 1e6 molecules the intrinsic noise is ~0.1 %, so log(scale p + offset) follows the simple model's ODE
    sde = get_model("mrna_sde")
    delta, gamma, k, m0, scale, t0, offset = 0.2, 0.08, 0.5, 1e6, 1e-3, 1.3, 5.0
    phi = np.log([[delta, gamma, k, m0, scale, t0, offset, 1e-8]])
    y = sde.simulate(phi, sde.sample_design(1, np.random.default_rng(0)), np.random.default_rng(0))[0, :, 0]
    simple_phi = np.log([[delta, gamma, k * m0 * scale, t0, offset, 1e-8]])
    ref = MrnaSimple().predict(simple_phi, {"times": TIME_GRID[None, :], "mask": np.ones((1, 180), bool)})[0, :, 0]
    # Euler-Maruyama's O(dt) bias at dt = 0.01 h plus sampling noise
    assert np.abs(y - ref).max() < 0.02
    assert np.abs(y - ref).max() > 0.0


def test_sde_paths_differ_between_individuals_and_stay_nonnegative() -> None:
    sde = get_model("mrna_sde")
    phi = np.tile(np.log([[0.3, 0.2, 1.0, 20.0, 1.0, 1.0, 1e-6, 1e-8]]), (50, 1))  # few molecules: big noise
    y = sde.simulate(phi, sde.sample_design(50, np.random.default_rng(0)), np.random.default_rng(9))[..., 0]
    assert np.unique(y[:, 60]).size == 50
    assert np.all(np.isfinite(y))
    assert np.all(np.exp(y) >= 1e-6 * (1 - 1e-6))  # scale p + offset >= offset: p stayed >= 0
    with pytest.raises(NotImplementedError):
        sde.log_likelihood(phi, y[..., None], sde.sample_design(50, np.random.default_rng(0)))


def test_sde_lockstep_kernel_reproduces_the_generic_solver_path_by_path() -> None:
    # the shared-design kernel (blocks of LANES individuals in lock-step) must give each individual the path the
    # generic Euler-Maruyama solver gives it from the same seed: t0 before, between and on output times, a partial
    # last block, failures in the same rows
    from simulators.mrna_sde import DT, LANES, _latent, _latent_shared_design

    model, phi, design = _draw("mrna_sde", n=3 * LANES + 5, seed=4)
    phi[0, 5] = np.log(TIME_GRID[3])                 # starts exactly on an output time
    phi[1, 5] = np.log(0.5 * (TIME_GRID[3] + TIME_GRID[4]))
    phi[2, 5] = np.log(40.0)                         # after the last output: never starts
    phi[3, 5] = np.log(0.01)
    times = np.ascontiguousarray(design["times"])
    mask = design["mask"].copy()
    mask[:, 7] = False                               # a gap shared by all rows
    seeds = np.random.default_rng(5).integers(0, 2**62, size=phi.shape[0])
    generic = _latent(phi, times, mask, seeds, DT)
    lockstep = _latent_shared_design(phi, times, mask, seeds, DT)
    np.testing.assert_array_equal(np.isnan(generic), np.isnan(lockstep))
    np.testing.assert_allclose(lockstep, generic, rtol=1e-12, atol=1e-12, equal_nan=True)
    assert np.all(lockstep[:, 7] == 0.0)
    assert np.all(lockstep[2] == np.log(np.exp(phi[2, 6])) * mask[2])


def test_sde_simulate_uses_the_generic_path_for_mixed_designs() -> None:
    sde, phi, design = _draw("mrna_sde", n=12, seed=6)
    shared = sde.simulate(phi, design, np.random.default_rng(3))
    mixed = {k: v.copy() for k, v in design.items()}
    mixed["mask"][5, 100:] = False                   # one individual observed for a shorter time
    y = sde.simulate(phi, mixed, np.random.default_rng(3))
    keep = np.arange(12) != 5
    np.testing.assert_allclose(y[keep], shared[keep], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(y[5, :100], shared[5, :100], rtol=1e-12, atol=1e-12)
    assert np.all(y[5, 100:] == 0.0)


# ---------------------------------------------------------------------------------------------------------------
# pk_oral_1cmt
# ---------------------------------------------------------------------------------------------------------------


def test_pk_closed_form_and_equal_rates_limit() -> None:
    model = get_model("pk_oral_1cmt")
    t = np.array([[0.0, 0.25, 1.0, 3.0, 8.0, 24.0]])
    design = {"times": t, "mask": np.ones_like(t, bool), "dose": np.array([320.0])}
    ka, ke, V = 1.5, 0.09, 32.0
    c = model.predict(np.log([[ka, ke, V, 0.5]]), design)[0, :, 0]
    ref = 320.0 * ka / (V * (ka - ke)) * (np.exp(-ke * t[0]) - np.exp(-ka * t[0]))
    np.testing.assert_allclose(c, ref, rtol=1e-12)
    equal = model.predict(np.log([[0.3, 0.3, V, 0.5]]), design)[0, :, 0]
    np.testing.assert_allclose(equal, 320.0 * 0.3 / V * t[0] * np.exp(-0.3 * t[0]), rtol=1e-12)
    near = model.predict(np.log([[0.3 * (1 + 1e-9), 0.3, V, 0.5]]), design)[0, :, 0]
    np.testing.assert_allclose(near, equal, rtol=1e-7)


def test_pk_design_sampler_mimics_studies() -> None:
    model, _, design = _draw("pk_oral_1cmt", n=500)
    counts = design["mask"].sum(axis=1)
    assert counts.min() >= 6 and counts.max() <= MAX_OBS and len(np.unique(counts)) > 5
    assert np.all(design["mask"][:, :6])  # observed points first, padding after
    for i in range(50):
        t = design["times"][i, : counts[i]]
        assert np.all(np.diff(t) >= 0) and t[0] >= 0 and t[-1] <= 24
    assert design["dose"].min() >= 50 and design["dose"].max() <= 1000
    assert np.all(design["times"][~design["mask"]] == 0.0)


def test_pk_combined_is_a_different_model() -> None:
    add, comb = get_model("pk_oral_1cmt"), get_model("pk_oral_1cmt", error_model="combined")
    assert comb.name == get_model("pk_oral_1cmt_combined").name == "pk_oral_1cmt_combined"
    assert add.name == "pk_oral_1cmt" and comb.param_names[-1] == "sigma_prop" and comb.prior.dim == 5
    with pytest.raises(ValueError):
        get_model("pk_oral_1cmt", error_model="exponential")


def test_mrna_simple_per_cell_encoder() -> None:
    # channel 0 is the cell's own standardized series, channels 3-6 its constants; the robust noise estimate follows
    # sigma; padding stays zero; shifting a cell's log fluorescence moves only the level channels
    model = MrnaSimple()
    rng = np.random.default_rng(3)
    phi = model.prior.sample(400, rng)
    phi[:, 3] = np.log(2.0)                      # starts at 2 h: a rising curve on every cell
    phi[:, 5] = rng.uniform(np.log(0.01), np.log(0.5), 400)
    design = model.sample_design(400, rng)
    design["mask"][:5, 150:] = False             # five cells observed for 25 h only
    y = model.simulate(phi, design, rng)
    x = model.encode(y, design)
    assert x.shape == (400, 180, 7) and x.dtype == np.float32
    m = design["mask"]
    assert np.all(x[~m] == 0.0) and np.all(x[..., 2] == m)
    for i in (0, 7):
        z = x[i, m[i], 0]
        np.testing.assert_allclose([z.mean(), z.std()], [0.0, 1.0], atol=1e-5)
        np.testing.assert_allclose(x[i, m[i], 3], (y[i, m[i], 0].mean() - 4.0) / 4.0, rtol=1e-5)
    noise = np.exp(2.0 * x[:, 0, 5] - 2.0)
    assert np.corrcoef(np.log(noise), phi[:, 5])[0, 1] > 0.95
    assert np.median(np.abs(np.log(noise) - phi[:, 5])) < 0.15
    shifted = model.encode(y + 0.7 * m[..., None], design)
    np.testing.assert_allclose(shifted[..., [0, 1, 2, 4, 5]], x[..., [0, 1, 2, 4, 5]], atol=2e-5)
    np.testing.assert_allclose(shifted[..., 3] - x[..., 3], 0.7 / 4.0 * m, atol=1e-5)


def test_pk_encoder_channels() -> None:
    model, phi, design = _draw("pk_oral_1cmt", n=10)
    y = model.simulate(phi, design, np.random.default_rng(0))
    x = model.encode(y, design)
    m = design["mask"]
    np.testing.assert_allclose(x[..., 0][m], design["times"][m] / 24, rtol=1e-6)
    np.testing.assert_allclose(x[..., 1][m], (y[..., 0] * 100 / design["dose"][:, None])[m], rtol=1e-5)
    np.testing.assert_allclose(x[..., 3][m], np.broadcast_to(np.log(design["dose"][:, None] / 300), m.shape)[m],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(x[..., 4], m.astype(np.float32))


def _dataset(times, dv, doses) -> Dataset:
    n = len(times)
    rows, start = [], 1
    for t in times:
        rows.append(np.arange(start, start + len(t)))
        start += len(t) + 1
    return Dataset(path="theo.csv", ids=[str(i + 1) for i in range(n)], times=[np.asarray(t, float) for t in times],
                   dv=[np.asarray(v, float) for v in dv], obs_type=[np.zeros(len(t)) for t in times],
                   doses=[np.asarray(d, float).reshape(-1, 3) for d in doses], covariates=pd.DataFrame(index=range(n)),
                   source_rows=rows)


def test_pk_from_dataset() -> None:
    model = get_model("pk_oral_1cmt")
    data = _dataset([[0.0, 0.5, 2.0, 24.4], [1.0, 5.0, 9.0, 12.0, 23.0, 24.0]],
                    [[0.7, 5.1, 8.0, 3.1], [4.0, 6.0, 5.0, 4.0, 2.0, 1.9]],
                    [[[0.0, 320.0, 1]], [[0.0, 280.0, 1]]])
    obs, design = model.from_dataset(data)
    assert obs.shape == (2, MAX_OBS, 1)
    np.testing.assert_array_equal(design["mask"].sum(axis=1), [4, 6])
    np.testing.assert_array_equal(design["dose"], [320.0, 280.0])
    assert obs[0, 3, 0] == 3.1 and design["times"][0, 3] == 24.4 and obs[0, 4, 0] == 0.0
    assert np.isfinite(model.log_likelihood(np.log([[1.5, 0.09, 32.0, 0.5]] * 2), obs, design)).all()

    two_doses = _dataset([[1.0, 2.0]], [[1.0, 2.0]], [[[0.0, 100.0, 1], [12.0, 100.0, 1]]])
    with pytest.raises(DataError, match=r"theo\.csv.*ID 1.*exactly one dose"):
        model.from_dataset(two_doses)
    late_dose = _dataset([[1.0, 2.0]], [[1.0, 2.0]], [[[2.0, 100.0, 1]]])
    with pytest.raises(DataError, match="time 0"):
        model.from_dataset(late_dose)
    too_many = _dataset([np.arange(1.0, 17.0)], [np.ones(16)], [[[0.0, 100.0, 1]]])
    with pytest.raises(DataError, match="at most 15"):
        model.from_dataset(too_many)
