"""The PK model library: unit-free normalisation (exact), NONMEM dosing records laid out as the models need them,
refusals, simulation with residual error and BLQ censoring, and the exact likelihood of its predictions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from amortized_nlme.data import read_dataset
from amortized_nlme.errors import DataError
from amortized_nlme.inference.likelihood import plan_weights, residual_statistics
from amortized_nlme.config import PopulationConfig
from amortized_nlme.population.residual import draw_logliks
from amortized_nlme.simulation import simulate_batch
from simulators import get_model
from simulators import pk_closed_form as pkc

REPO = Path(__file__).resolve().parent.parent
PHENO = REPO / "tests" / "data" / "pheno.csv"
THEO = REPO / "amortized_nlme" / "example_data" / "theophylline_nonmem.csv"
NAMES = ["pk_1cmt_iv", "pk_1cmt_oral", "pk_2cmt_iv", "pk_2cmt_oral"]


def rescaled(obs: np.ndarray, design: dict, time: float, conc: float, dose: float) -> tuple[np.ndarray, dict]:
    """The same data in other units: times x time, concentrations x conc, amounts x dose."""
    d = {k: np.array(v, copy=True) for k, v in design.items()}
    d["times"] = d["times"] * time
    for col in (pkc.TIME, pkc.DUR, pkc.II):
        d["doses"][..., col] *= time
    d["doses"][..., pkc.AMT] *= dose
    return obs * conc, d


@pytest.mark.parametrize("name", NAMES)
def test_units_do_not_matter(name: str) -> None:
    """Encoder input is identical in any units, and the parameter shift moves by exactly the log unit factors, so
    q(phi | y) = q'(phi + shift | y) is the same posterior in every unit system."""
    model = get_model(name)
    params, obs, design = simulate_batch(model, 64, np.random.default_rng(1))
    enc, shift = model.encode(obs, design), model.parameter_shift(obs, design)
    a, b, c = 24.0, 1000.0, 0.1  # hours -> days is 1/24; mg/L -> ng/mL; mg -> g
    obs2, design2 = rescaled(obs, design, a, b, c)
    np.testing.assert_array_equal(model.encode(obs2, design2), enc)
    expected = {"CL": np.log(b / c), "V": np.log(b / c), "V1": np.log(b / c), "V2": np.log(b / c),
                "Q": np.log(b / c), "ka": 0.0}
    # the same drug in the new units has CL' = CL * c / b / ... : the shift compensates exactly
    # (subjects whose data span no time at all -- one pre-dose sample -- have no time scale to normalise by)
    timed = np.array([np.ptp(np.r_[design["times"][i][design["mask"][i]], design["doses"][i, 0, pkc.TIME]]) > 0
                      for i in range(obs.shape[0])])
    for j, p in enumerate(model.param_names):
        time_power = {"CL": 1, "Q": 1, "ka": 1}.get(p, 0)
        np.testing.assert_allclose((model.parameter_shift(obs2, design2)[:, j] - shift[:, j])[timed],
                                   expected[p] + time_power * np.log(a), atol=1e-10)
    # and the predictions agree: parameters converted to the new units predict the rescaled concentrations
    conv = params.copy()
    for j, p in enumerate(model.param_names):
        conv[:, j] += {"CL": np.log(c / b / a), "Q": np.log(c / b / a), "V": np.log(c / b), "V1": np.log(c / b),
                       "V2": np.log(c / b), "ka": -np.log(a)}[p]
    np.testing.assert_allclose(model.predict(conv, design2), model.predict(params, design) * b, rtol=1e-9,
                               atol=1e-12)


def test_simulation_censoring_and_failures() -> None:
    model = get_model("pk_1cmt_oral")
    params, obs, design = simulate_batch(model, 2000, np.random.default_rng(2))
    cens, mask = design["censored"], design["mask"]
    assert cens.any() and not (cens & ~mask).any()
    f = model.predict(params, design)[..., 0]
    # a censored value holds its limit, above the noise-free concentration's quantile it was set from
    assert np.all(np.isfinite(obs[mask]))
    z = (params + model.parameter_shift(obs, design) - model.prior.mean) / model.prior.std
    assert np.abs(z).max() <= 5.0 + 1e-9  # extreme normalised parameters were redrawn
    assert f.shape == obs[..., 0].shape


def test_pheno_is_read_as_iv_doses_into_the_central_compartment() -> None:
    data = read_dataset(PHENO, covariates=["WGT", "APGR"])
    model = get_model("pk_1cmt_iv")
    obs, design = model.from_dataset(data)
    assert obs.shape[0] == 59 and design["mask"].sum() == 155 and design["n_doses"].sum() == 589
    routes = np.concatenate([design["doses"][i, : design["n_doses"][i], pkc.ROUTE] for i in range(59)])
    assert np.all(routes == pkc.CENTRAL)
    oral = get_model("pk_1cmt_oral")
    od, odes = oral.from_dataset(read_dataset(THEO))
    assert np.all(odes["doses"][:, 0, pkc.ROUTE] == pkc.DEPOT)  # CMT 1 = depot in ADVAN2 numbering


def test_refusals_name_row_and_column(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("ID,TIME,AMT,DV,EVID,CMT\n1,0,100,.,1,3\n1,1,.,5,0,2\n")
    with pytest.raises(DataError, match=r"row 2, column CMT: dose into compartment 3"):
        get_model("pk_1cmt_oral").from_dataset(read_dataset(path))
    rows = ["ID,TIME,AMT,DV,EVID"] + [f"1,{t},10,.,1" for t in range(70)] + ["1,80,.,1.0,0"]
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match="at most 60"):
        get_model("pk_1cmt_iv").from_dataset(read_dataset(path))


@pytest.mark.parametrize("kind", ["additive", "proportional", "combined"])
def test_exact_likelihood_of_predictions(kind: str) -> None:
    """Per-draw residual statistics give the Gaussian (and M3) log-likelihood of the model's own predictions."""
    model = get_model("pk_2cmt_oral")
    params, obs, design = simulate_batch(model, 30, np.random.default_rng(3))
    plan = plan_weights("exact", model, PopulationConfig(residual_error=kind), obs, design)
    assert plan.residual.kind == kind and plan.aux_index.size == 0
    phi = params[:, None, :] + 0.05 * np.random.default_rng(4).standard_normal((30, 3, params.shape[1]))
    stats, failed = residual_statistics(model, phi, obs, design, kind)
    a, b = 0.3, 0.15
    ll = draw_logliks(stats, a if kind != "proportional" else 0.0, b if kind != "additive" else 0.0)
    from scipy import stats as st

    for i in (0, 7, 19):
        for j in range(3):
            f = model.predict(phi[i, j][None], {k: v[i:i + 1] for k, v in design.items()})[0, :, 0]
            m, c = design["mask"][i], design["censored"][i]
            sd = {"additive": a + 0 * f, "proportional": b * np.abs(f), "combined": np.sqrt(a**2 + (b * f) ** 2)}[kind]
            y = obs[i, :, 0]
            with np.errstate(all="ignore"):
                ref = np.sum(np.where(c, st.norm.logcdf((y - f) / sd), st.norm.logpdf(y, f, sd))[m])
            if not np.isfinite(ref):  # a zero prediction under a proportional error: the draw has likelihood 0
                assert ll[i, j] == -np.inf
                continue
            assert ll[i, j] == pytest.approx(ref, rel=1e-6, abs=1e-6)


def test_flip_flop_is_a_status_warning() -> None:
    """A typical ka below the terminal elimination rate (the mirror of an oral one-compartment fit, which the
    individual likelihood cannot tell apart) is reported; the usual ka > k is not."""
    from amortized_nlme.inference.pipeline import typical_values
    from amortized_nlme.inference.status import assess
    from simulators import get_model

    one = get_model("pk_1cmt_oral")
    names = ["beta_CL", "beta_V", "beta_ka", "log_omega_CL", "B_V_lwt"]
    mirror = typical_values(names, np.log([3.0, 2.5, 0.075, 0.3, 1.5]))
    assert mirror == pytest.approx({"CL": 3.0, "V": 2.5, "ka": 0.075})
    assert one.typical_value_warnings(typical_values(names, np.log([3.0, 40.0, 1.2, 0.3, 1.5]))) == []
    (text,) = one.typical_value_warnings(mirror)
    assert "flip-flop" in text and "1.2" in text  # k = CL/V = 1.2
    two = get_model("pk_2cmt_oral")
    k10, k12, k21 = 3 / 40, 5 / 40, 5 / 60
    beta = 0.5 * (k10 + k12 + k21 - np.sqrt((k10 + k12 + k21) ** 2 - 4 * k10 * k21))
    typical = {"CL": 3.0, "V1": 40.0, "Q": 5.0, "V2": 60.0}
    assert two.typical_value_warnings({**typical, "ka": 0.99 * beta}) != []
    assert two.typical_value_warnings({**typical, "ka": 1.01 * beta}) == []
    assert get_model("pk_1cmt_iv").typical_value_warnings({"CL": 3.0, "V": 40.0}) == []
    assert get_model("pk_oral_1cmt").typical_value_warnings({"ka": 0.05, "ke": 0.09, "V": 30.0}) != []
    st = assess(likelihood="exact", has_likelihood=True, n_individuals=10, proposal=None, support=None, at_bound=[],
                mc_ratio=None, mc_target=0.3, kernel_parameters=[], model_warnings=[text])
    assert st.level == "warning" and any("flip-flop" in r for r in st.reasons)


@pytest.mark.parametrize("name", ["pk_1cmt_oral", "pk_oral_1cmt"])
def test_mirror_map_is_an_exact_symmetry_of_oral_one_compartment(name: str) -> None:
    """The flip-flop image gives the same predictions after repeated oral doses, is an involution with |det| 1,
    and a refined proposal's t components come with their images (both branches covered)."""
    from amortized_nlme.inference.proposal import TMixture

    model = get_model(name)
    A = model.mirror_map()
    assert np.allclose(A @ A, np.eye(A.shape[0])) and abs(abs(np.linalg.det(A)) - 1.0) < 1e-12
    rng = np.random.default_rng(3)
    design = model.sample_design(200, rng)
    phi = model.prior.sample(200, rng)
    oral_only = np.ones(200, dtype=bool)
    if "doses" in design:  # the PK library's designs may give an IV loading dose; the mirror needs oral doses only
        routes = design["doses"][:, :, pkc.ROUTE]
        live = np.arange(routes.shape[1])[None, :] < design["n_doses"][:, None]
        oral_only = ~np.any(live & (routes == 1.0), axis=1)
    a = np.asarray(model.predict(phi, design)).reshape(200, -1)
    b = np.asarray(model.predict(phi @ A.T, design)).reshape(200, -1)
    ok = np.isfinite(a) & np.isfinite(b) & oral_only[:, None] & (np.abs(a) > 0)
    assert ok.sum() > 1000
    np.testing.assert_allclose(b[ok], a[ok], rtol=1e-6, atol=1e-9 * np.nanmax(np.abs(a[ok])))
    assert get_model("pk_1cmt_iv").mirror_map() is None and get_model("pk_2cmt_oral").mirror_map() is None

    k = A.shape[0]
    mix = TMixture(rng.normal(size=(2, k)), np.stack([np.eye(k), 0.5 * np.eye(k)]), np.log([0.7, 0.3]))
    both = mix.with_images(A)
    np.testing.assert_allclose(both.loc[2:], mix.loc @ A.T)
    cov = both.chol[2:] @ np.swapaxes(both.chol[2:], 1, 2)
    np.testing.assert_allclose(cov, A @ (mix.chol @ np.swapaxes(mix.chol, 1, 2)) @ A.T, atol=1e-12)
    assert np.isclose(np.exp(both.log_pi).sum(), 1.0)
    x = rng.normal(size=(50, k))  # the mixture with images is invariant under the map
    counts = np.array([35, 15, 35, 15])
    np.testing.assert_allclose(both.log_prob(x, counts), both.log_prob(x @ A.T, counts), atol=1e-10)
