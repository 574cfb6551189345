"""NONMEM data-set semantics of the reader: records read as NM-TRAN reads them, or refused naming row and column."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from amortized_nlme.data import (
    DOSE_COLUMNS,
    ColumnMap,
    DataError,
    Dataset,
    read_dataset,
)

PHENO = Path(__file__).resolve().parent / "data" / "pheno.csv"  # copy of shared/data/pheno/pheno.csv

T, AMT, CMT, DUR, SS, II, RESET = range(7)


def write(tmp_path: Path, text: str, name: str = "data.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def raises(path: Path, row: int | None, column: str | None, *expected: str, **kwargs) -> str:
    """Read ``path`` expecting a DataError that names the file, the row, the column and the expectation."""
    with pytest.raises(DataError) as info:
        read_dataset(path, **kwargs)
    msg = str(info.value)
    assert msg.startswith(str(path)), msg
    if row is not None:
        assert re.match(rf"{re.escape(str(path))}, rows? {row}\b", msg), msg
    if column is not None:
        assert f"column {column}:" in msg, msg
    for word in expected:
        assert word.lower() in msg.lower(), msg
    return msg


# --------------------------------------------------------------------------------------------------- pheno


@pytest.fixture(scope="module")
def pheno() -> Dataset:
    return read_dataset(PHENO, covariates=["WGT", "APGR"])


def test_dose_columns_constant() -> None:
    assert DOSE_COLUMNS == ("time", "amount", "cmt", "duration", "ss", "ii", "reset")


def test_pheno_read_as_nmtran(pheno: Dataset) -> None:
    raw = pd.read_csv(PHENO)
    assert pheno.n_individuals == 59
    assert pheno.n_observations == 155
    assert sum(d.shape[0] for d in pheno.doses) == 589
    assert all(d.shape[1] == 7 for d in pheno.doses)
    all_d = np.concatenate(pheno.doses)
    assert set(all_d[:, CMT]) == {0.0}  # no CMT column: the model's default dose compartment
    assert not all_d[:, [DUR, SS, II, RESET]].any()
    assert pheno.n_censored == 0
    # every AMT > 0 row is a dose (DV = 0 there, no MDV column), every other row an observation
    for i, sid in enumerate(pheno.ids):
        rows = raw[raw.ID == int(sid)]
        dose_rows = rows[rows.AMT > 0]
        np.testing.assert_array_equal(pheno.doses[i][:, T], dose_rows.TIME)
        np.testing.assert_array_equal(pheno.doses[i][:, AMT], dose_rows.AMT)
        np.testing.assert_array_equal(pheno.times[i], rows[rows.AMT == 0].TIME)
        np.testing.assert_array_equal(pheno.dv[i], rows[rows.AMT == 0].DV)
    np.testing.assert_allclose(pheno.doses[0][:3, :2], [[0.0, 25.0], [12.5, 3.5], [24.5, 3.5]])
    assert pheno.dose_rows[0][:3].tolist() == [2, 4, 5]
    assert pheno.source_rows[0].tolist() == [3, 13]
    assert list(pheno.covariates.columns) == ["WGT", "APGR"]
    assert pheno.covariates.loc["1", "WGT"] == pytest.approx(1.4) and pheno.covariates.loc["1", "APGR"] == 7
    assert pheno.notes == []
    summary = pheno.summary()
    assert "individuals: 59" in summary and "observations: 155" in summary and "doses: 589" in summary
    assert "infusions 0" in summary and "resets 0" in summary and "BLQ): none" in summary
    assert pheno.dose_counts() == {"doses": 589, "infusions": 0, "steady_state": 0, "addl": 0, "resets": 0,
                                   "censored": 0}


def test_pheno_subset_and_hash(pheno: Dataset) -> None:
    sub = pheno.subset([2, 0])
    assert sub.ids == [pheno.ids[2], pheno.ids[0]]
    np.testing.assert_array_equal(sub.doses[1], pheno.doses[0])
    assert sub.dose_rows[1].tolist() == pheno.dose_rows[0].tolist()
    assert len(sub.censored) == len(sub.lloq) == 2
    assert pheno.content_hash() == read_dataset(PHENO, covariates=["WGT", "APGR"]).content_hash()
    assert pheno.subset([0, 1]).content_hash() != pheno.subset([0, 2]).content_hash()


# ------------------------------------------------------------------------------------------- dose records


def test_addl_expansion_as_nonmem_help_example(tmp_path: Path) -> None:
    # NONMEM's ADDL help: doses at 10 (ADDL=2, II=12) and 20 give doses at 10, 20, 22 and 34
    path = write(tmp_path, (
        "ID,TIME,AMT,ADDL,II,DV,CMT\n"
        "1,10,15,2,12,.,1\n"
        "1,15,.,.,.,25.7,2\n"
        "1,20,10,0,0,.,1\n"
        "1,36,.,.,.,30.2,2\n"
    ))
    data = read_dataset(path)
    np.testing.assert_allclose(data.doses[0][:, :3], [[10, 15, 1], [20, 10, 1], [22, 15, 1], [34, 15, 1]])
    assert not data.doses[0][:, [DUR, SS, II, RESET]].any()
    assert data.dose_rows[0].tolist() == [2, 4, 2, 2]
    np.testing.assert_allclose(data.times[0], [15, 36])
    assert data.dose_counts()["addl"] == 2 and "added by ADDL expansion 2" in data.summary()


def test_addl_ties_follow_file_records(tmp_path: Path) -> None:
    # an ADDL dose at the time of a later file record comes after it; file records keep their order
    path = write(tmp_path, "ID,TIME,AMT,ADDL,II,DV\n1,0,5,1,12,.\n1,12,7,0,0,.\n1,12,8,0,0,.\n1,13,.,.,.,1\n")
    data = read_dataset(path)
    np.testing.assert_allclose(data.doses[0][:, :2], [[0, 5], [12, 7], [12, 8], [12, 5]])
    assert data.dose_rows[0].tolist() == [2, 3, 4, 2]


def test_steady_state_dose_kept_as_one_record(tmp_path: Path) -> None:
    path = write(tmp_path, (
        "ID,TIME,AMT,SS,II,ADDL,DV,EVID,MDV\n"
        "1,0,100,1,12,0,.,1,1\n"
        "1,6,.,0,0,0,3.1,0,0\n"
        "2,0,100,1,12,2,.,1,1\n"
        "2,30,.,0,0,0,1.2,0,0\n"
    ))
    data = read_dataset(path)
    np.testing.assert_allclose(data.doses[0], [[0, 100, 0, 0, 1, 12, 0]])
    # SS=1 with ADDL: the steady-state dose, then regular (non-steady-state) doses
    np.testing.assert_allclose(data.doses[1], [[0, 100, 0, 0, 1, 12, 0], [12, 100, 0, 0, 0, 0, 0],
                                               [24, 100, 0, 0, 0, 0, 0]])
    c = data.dose_counts()
    assert c["steady_state"] == 2 and c["addl"] == 2 and c["doses"] == 4


def test_infusions_rate_and_duration(tmp_path: Path) -> None:
    path = write(tmp_path, (
        "ID,TIME,AMT,RATE,DUR,DV,CMT\n"
        "1,0,100,50,.,.,2\n"       # RATE > 0: duration AMT/RATE = 2
        "1,1,.,.,.,3,2\n"
        "1,12,100,-2,0.5,.,2\n"    # RATE = -2: duration from DUR
        "1,13,.,.,.,4,2\n"
        "1,24,100,0,.,.,1\n"       # bolus
        "1,25,.,.,.,5,2\n"
    ))
    data = read_dataset(path)
    np.testing.assert_allclose(data.doses[0], [[0, 100, 2, 2.0, 0, 0, 0], [12, 100, 2, 0.5, 0, 0, 0],
                                               [24, 100, 1, 0, 0, 0, 0]])
    assert data.dose_counts()["infusions"] == 2 and "infusions 2" in data.summary()
    assert data.obs_type_labels == ["2"]  # a single observation compartment


def test_evid_other_reset_and_reset_dose(tmp_path: Path) -> None:
    path = write(tmp_path, (
        "ID,TIME,AMT,EVID,MDV,DV\n"
        "1,0,100,1,1,.\n"
        "1,2,.,0,0,5\n"
        "1,3,.,2,1,.\n"       # other-type event: skipped, counted
        "1,24,.,3,1,.\n"      # reset
        "1,24,50,1,1,.\n"
        "1,26,.,0,0,2\n"
        "1,48,80,4,1,.\n"     # reset and dose
        "1,50,.,0,0,3\n"
    ))
    data = read_dataset(path)
    np.testing.assert_allclose(data.doses[0], [[0, 100, 0, 0, 0, 0, 0], [24, 0, 0, 0, 0, 0, 1],
                                               [24, 50, 0, 0, 0, 0, 0], [48, 80, 0, 0, 0, 0, 1]])
    np.testing.assert_allclose(data.times[0], [2, 26, 50])
    assert any("skipped 1 record(s)" in n and "row 4" in n for n in data.notes)
    c = data.dose_counts()
    assert c["resets"] == 2 and c["doses"] == 3 and "resets 2" in data.summary()


def test_no_evid_mdv_decides_non_dose_rows(tmp_path: Path) -> None:
    path = write(tmp_path, (
        "ID,TIME,AMT,MDV,DV,CMT\n"
        "1,0,100,1,0,1\n"    # AMT > 0: dose, DV ignored
        "1,1,0,1,2.5,2\n"    # MDV = 1 without dose: skipped
        "1,2,0,0,2.0,2\n"
        "1,3,.,.,1.5,2\n"    # MDV empty: 0 as in NM-TRAN
        "1,4,20,.,7,.\n"     # AMT > 0 with MDV empty: dose, DV 7 ignored (noted)
        "1,5,.,.,1.0,2\n"
    ))
    data = read_dataset(path)
    np.testing.assert_allclose(data.doses[0][:, :3], [[0, 100, 1], [4, 20, 0]])
    np.testing.assert_allclose(data.times[0], [2, 3, 5])
    assert any("skipped 1 record(s)" in n for n in data.notes)
    assert any("ignored the DV value of 1 dose" in n and "row 6" in n for n in data.notes)


def test_dose_with_nonzero_dv_and_no_mdv_is_a_dose(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path, "ID,TIME,DV,AMT\n1,0,1,0\n1,1,2,10\n1,2,3,0\n")
    with caplog.at_level(logging.WARNING, logger="amortized_nlme.data"):
        data = read_dataset(path)
    np.testing.assert_allclose(data.doses[0][:, :2], [[1, 10]])
    np.testing.assert_allclose(data.times[0], [0, 2])
    assert "ignored the DV value" in caplog.text


def test_dose_column_option_keeps_working(tmp_path: Path) -> None:
    path = write(tmp_path, "ID,TIME,DV,DOSE\n1,0.5,1,5\n1,1,2,5\n2,1,3,6\n")
    data = read_dataset(path, dose_column="DOSE", dose_time=0.0, dose_cmt=1)
    np.testing.assert_allclose(data.doses[0], [[0, 5, 1, 0, 0, 0, 0]])
    np.testing.assert_allclose(data.doses[1], [[0, 6, 1, 0, 0, 0, 0]])
    assert data.dose_rows[1].tolist() == [4]


def test_observation_at_dose_time_is_noted(tmp_path: Path) -> None:
    path = write(tmp_path, "ID,TIME,AMT,DV\n1,0,.,0\n1,0,100,.\n1,0,.,5\n1,12,.,2\n")
    data = read_dataset(path)
    np.testing.assert_allclose(data.times[0], [0, 0, 12])
    msg = next(n for n in data.notes if "follow a dose or reset record with the same time" in n)
    assert msg.startswith("1 observation(s)") and "row 4" in msg
    path = write(tmp_path, "ID,TIME,AMT,ADDL,II,DV\n1,0,100,1,12,.\n1,12,.,.,.,5\n", "addl.csv")
    msg = next(n for n in read_dataset(path).notes if "ADDL" in n and "observation" in n)
    assert msg.startswith("1 observation(s) fall at the time of an additional (ADDL) dose") and "row 3" in msg


def test_column_roles_case_insensitive_explicit_and_ignored(tmp_path: Path) -> None:
    path = write(tmp_path, "id,time,dv,amt,addl,ii,NDOSE,TAU\n1,0,.,5,1,12,0,0\n1,1,2,0,0,0,0,0\n")
    data = read_dataset(path)
    np.testing.assert_allclose(data.doses[0][:, :2], [[0, 5], [12, 5]])
    # explicit names; "" ignores a role although a column of that name exists
    path = write(tmp_path, "ID,TIME,DV,AMT,NADD,TAU,II\n1,0,.,5,2,6,99\n1,1,2,0,0,0,0\n", "b.csv")
    data = read_dataset(path, ColumnMap(addl="NADD", ii="TAU"))
    np.testing.assert_allclose(data.doses[0][:, 0], [0, 6, 12])
    path = write(tmp_path, "ID,TIME,DV,AMT,SS\n1,0,.,5,7\n1,1,2,0,0\n", "c.csv")
    assert read_dataset(path, {"ss": ""}).doses[0].shape == (1, 7)
    with pytest.raises(DataError, match="unknown role 'tinf'"):
        ColumnMap.from_dict({"tinf": "TINF"})
    raises(write(tmp_path, "ID,TIME,DV\n1,0,1\n", "d.csv"), 1, "BLQFLAG", "missing", columns={"cens": "BLQFLAG"})


def test_legacy_three_column_dose_arrays_are_widened() -> None:
    data = Dataset(path="x.csv", ids=["1"], times=[np.array([1.0])], dv=[np.array([2.0])],
                   obs_type=[np.zeros(1)], doses=[np.array([[0.0, 100.0, 1.0]])], covariates=pd.DataFrame(index=["1"]))
    np.testing.assert_allclose(data.doses[0], [[0, 100, 1, 0, 0, 0, 0]])
    assert data.censored[0].tolist() == [False] and np.isnan(data.lloq[0]).all()
    assert "added by ADDL expansion unknown" in data.summary()


def test_pk_oral_model_refuses_infusion_and_steady_state() -> None:
    from simulators.pk_oral_1cmt import PkOral1Cmt

    def one(dose: list[float]) -> Dataset:
        return Dataset(path="x.csv", ids=["1"], times=[np.array([1.0, 2.0])], dv=[np.array([2.0, 1.0])],
                       obs_type=[np.zeros(2)], doses=[np.array([dose])], covariates=pd.DataFrame(index=["1"]),
                       source_rows=[np.array([3, 4])])

    model = PkOral1Cmt()
    _, design = model.from_dataset(one([0, 100, 0, 0, 0, 0, 0]))
    assert design["dose"].tolist() == [100.0]
    with pytest.raises(DataError, match="column RATE: .*single oral bolus"):
        model.from_dataset(one([0, 100, 0, 2, 0, 0, 0]))
    with pytest.raises(DataError, match="column SS: .*single oral bolus"):
        model.from_dataset(one([0, 100, 0, 0, 1, 12, 0]))


# ---------------------------------------------------------------------------------------------- censoring


def test_cens_column_dv_holds_the_limit(tmp_path: Path) -> None:
    path = write(tmp_path, (
        "ID,TIME,AMT,DV,CENS,MDV\n"
        "1,0,100,.,0,1\n"
        "1,1,.,5.2,0,0\n"
        "1,24,.,0.1,1,0\n"    # below the LLOQ 0.1
        "1,30,.,0.1,1,1\n"    # MDV = 1: skipped as NONMEM does (M1), noted
        "2,0,100,.,.,1\n"
        "2,2,.,3,.,0\n"
    ))
    data = read_dataset(path)
    assert data.censored[0].tolist() == [False, True] and data.censored[1].tolist() == [False]
    np.testing.assert_allclose(data.dv[0], [5.2, 0.1])
    assert np.isnan(data.lloq[0][0]) and data.lloq[0][1] == pytest.approx(0.1)
    assert data.n_censored == 1 and "BLQ): 1 of 3" in data.summary()
    assert any("flagged CENS=1 have MDV=1" in n for n in data.notes)
    uncensored = read_dataset(path, {"cens": ""})
    assert uncensored.n_censored == 0 and uncensored.content_hash() != data.content_hash()
    sub = data.subset([0])
    assert sub.censored[0].tolist() == [False, True] and sub.lloq[0][1] == pytest.approx(0.1)


def test_lloq_column_below_limit_or_empty_dv(tmp_path: Path) -> None:
    path = write(tmp_path, (
        "ID,TIME,AMT,DV,LLOQ\n"
        "1,0,100,.,0.5\n"
        "1,1,.,3,0.5\n"
        "1,2,.,0.2,0.5\n"    # below: censored at 0.5
        "1,3,.,.,0.5\n"      # empty DV with an LLOQ: censored
        "1,4,.,0.5,0.5\n"    # at the limit: observed
        "1,5,.,0.3,.\n"      # no limit on this row: observed
    ))
    data = read_dataset(path)
    assert data.censored[0].tolist() == [False, True, True, False, False]
    np.testing.assert_allclose(data.dv[0], [3, 0.5, 0.5, 0.5, 0.3])
    np.testing.assert_allclose(data.lloq[0], [np.nan, 0.5, 0.5, np.nan, np.nan])
    assert data.dose_counts()["censored"] == 2


def test_cens_and_lloq_together(tmp_path: Path) -> None:
    path = write(tmp_path, "ID,TIME,DV,CENS,LLOQ\n1,1,3,0,0.5\n1,2,.,1,0.5\n1,3,0.5,1,0.5\n")
    data = read_dataset(path)
    assert data.censored[0].tolist() == [False, True, True]
    np.testing.assert_allclose(data.dv[0], [3, 0.5, 0.5])


def test_blq_flag_column_not_mapped_is_noted(tmp_path: Path) -> None:
    path = write(tmp_path, "ID,TIME,DV,BLQ\n1,1,3,0\n1,2,0.1,1\n")
    data = read_dataset(path)
    assert data.n_censored == 0 and any("column BLQ is not read" in n for n in data.notes)
    assert read_dataset(path, {"cens": "BLQ"}).censored[0].tolist() == [False, True]


# ----------------------------------------------------------------------------------------- comment records


def test_comment_records_skipped_and_rows_kept(tmp_path: Path) -> None:
    path = write(tmp_path, (
        "C,ID,TIME,AMT,DV\n"
        ".,1,0,100,.\n"
        "# a comment, with, more, fields, than, the, header\n"
        "C,1,0.5,xx,bad\n"
        "@ another comment\n"
        ".,1,1,.,4\n"
        ".,1,2,.,x\n"
    ))
    raises(path, 7, "DV", "expected a number", "'x'")  # rows as in the file, comments included
    path = write(tmp_path, (
        "C,ID,TIME,AMT,DV\n.,1,0,100,.\n# comment\nC,1,0.5,xx,bad\n@ comment\n.,1,1,.,4\n"
    ), "ok.csv")
    data = read_dataset(path)
    assert data.source_rows[0].tolist() == [6] and data.dose_rows[0].tolist() == [2]
    note = next(n for n in data.notes if "comment record" in n)
    assert note.startswith("skipped 3 comment record(s)") and "rows 3, 4 and 5" in note


def test_header_hidden_from_nmtran_and_ragged_row_after_comment(tmp_path: Path) -> None:
    path = write(tmp_path, "#ID,TIME,DV\n1,0,1\n# comment\n1,1,2\n")
    data = read_dataset(path)
    assert data.source_rows[0].tolist() == [2, 4]
    path = write(tmp_path, "ID,TIME,DV\n1,0,1\n# comment\n1,1,2,3\n", "ragged.csv")
    raises(path, 4, None, "expected 3 fields", "found 4")


# -------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("text, row, column, expected", [
    # rates and durations
    ("ID,TIME,DV,AMT,RATE\n1,0,.,100,-1\n1,1,2,.,.\n", 2, "RATE", ["RATE=-1", "not supported", "-2"]),
    ("ID,TIME,DV,AMT,RATE\n1,0,.,100,-3\n1,1,2,.,.\n", 2, "RATE", ["expected RATE 0"]),
    ("ID,TIME,DV,AMT,RATE\n1,0,.,100,-2\n1,1,2,.,.\n", 2, "RATE", ["RATE=-2", "no DUR column"]),
    ("ID,TIME,DV,AMT,RATE,DUR\n1,0,.,100,-2,-1\n1,1,2,.,.,.\n", 2, "DUR", ["duration > 0", "-1"]),
    ("ID,TIME,DV,AMT,RATE,DUR\n1,0,.,100,-2,.\n1,1,2,.,.,.\n", 2, "DUR", ["duration > 0", "empty"]),
    ("ID,TIME,DV,AMT,DUR\n1,0,.,100,2\n1,1,2,.,.\n", 2, "DUR", ["only with RATE=-2", "no RATE column"]),
    ("ID,TIME,DV,AMT,RATE,DUR\n1,0,.,100,10,-2\n1,1,2,.,.,.\n", 2, "DUR", ["duration >= 0"]),
    # steady state
    ("ID,TIME,DV,AMT,SS,II\n1,0,.,100,2,12\n1,1,2,.,.,.\n", 2, "SS", ["SS=2", "not supported"]),
    ("ID,TIME,DV,AMT,SS,II\n1,0,.,100,3,12\n1,1,2,.,.,.\n", 2, "SS", ["SS=3", "not supported"]),
    ("ID,TIME,DV,AMT,SS,II,RATE\n1,0,.,0,1,0,10\n1,1,2,.,.,.,.\n", 2, "SS",
     ["SS=1 with II=0", "constant-rate infusion", "not supported"]),
    ("ID,TIME,DV,AMT,SS,II,EVID\n1,0,.,100,1,12,4\n1,1,2,.,.,.,0\n", 2, "SS", ["EVID=4", "not supported"]),
    # additional doses and intervals
    ("ID,TIME,DV,AMT,ADDL,II\n1,0,.,100,3,0\n1,1,2,.,.,.\n", 2, "II", ["ADDL=3", "II > 0"]),
    ("ID,TIME,DV,AMT,ADDL\n1,0,.,100,3\n1,1,2,.,.\n", 2, "ADDL", ["II > 0", "no II column"]),
    ("ID,TIME,DV,AMT,ADDL,II\n1,0,.,100,-5,12\n1,1,2,.,.,.\n", 2, "ADDL", ["negative ADDL", "not supported"]),
    ("ID,TIME,DV,AMT,ADDL,II\n1,0,.,100,1.5,12\n1,1,2,.,.,.\n", 2, "ADDL", ["whole number"]),
    ("ID,TIME,DV,AMT,II\n1,0,.,100,-12\n1,1,2,.,.\n", 2, "II", ["II >= 0"]),
    ("ID,TIME,DV,AMT,ADDL,II\n1,0,.,100,0,12\n1,1,2,.,.,.\n", 2, "II", ["without ADDL or SS"]),
    # dose items on records that are not doses
    ("ID,TIME,DV,AMT,EVID\n1,0,.,100,1\n1,1,2,5,0\n", 3, "AMT", ["EVID=0", "observation", "AMT empty or 0"]),
    ("ID,TIME,DV,AMT,RATE,EVID\n1,0,.,100,0,1\n1,1,2,.,10,0\n", 3, "RATE", ["EVID=0", "RATE empty or 0"]),
    ("ID,TIME,DV,AMT,EVID\n1,0,.,100,1\n1,1,2,.,0\n1,2,.,5,3\n", 4, "AMT", ["EVID=3", "reset"]),
    ("ID,TIME,DV,AMT,EVID\n1,0,.,100,1\n1,1,2,.,0\n1,2,.,5,2\n", 4, "AMT", ["EVID=2", "other-type"]),
    ("ID,TIME,DV,AMT,RATE\n1,0,.,100,0\n1,1,2,0,10\n", 3, "RATE", ["without a dose amount", "AMT > 0"]),
    ("ID,TIME,DV,ADDL,II\n1,1,2,2,12\n", 2, "II", ["without a dose amount", "column missing"]),
    # MDV on dose records
    ("ID,TIME,DV,AMT,EVID,MDV\n1,0,5,100,1,0\n1,1,2,.,0,0\n", 2, "MDV", ["MDV=0 on an EVID=1", "MDV=1"]),
    ("ID,TIME,DV,AMT,MDV\n1,0,5,100,0\n1,1,2,.,0\n", 2, "AMT", ["dose record", "MDV=0", "two records"]),
    # compartments
    ("ID,TIME,DV,AMT,CMT\n1,0,.,100,-1\n1,1,2,.,2\n", 2, "CMT", ["negative compartment", "not supported"]),
    ("ID,TIME,DV,AMT,CMT\n1,0,.,100,1.5\n1,1,2,.,2\n", 2, "CMT", ["whole compartment number"]),
    # resets
    ("ID,TIME,DV,AMT,EVID\n1,10,.,100,1\n1,11,2,.,0\n1,0,.,100,4\n1,1,3,.,0\n", 4, "TIME",
     ["time decreases", "reset record (EVID=4)"]),
    ("ID,TIME,DV,AMT,ADDL,II,EVID\n1,0,.,100,3,12,1\n1,1,2,.,0,0,0\n1,30,.,.,0,0,3\n1,31,2,.,0,0,0\n", 2, "ADDL",
     ["run until time 36", "reset in row 4", "EVID=3", "not supported"]),
    ("ID,TIME,DV,AMT,ADDL,II,EVID\n1,0,.,100,2,12,1\n1,1,2,.,0,0,0\n1,24,.,50,0,0,4\n1,25,2,.,0,0,0\n", 2, "ADDL",
     ["up to or past the reset in row 4"]),
    ("ID,TIME,DV,AMT,ADDL,II,SS\n1,0,.,100,3,12,0\n1,1,2,.,0,0,0\n1,30,.,50,0,12,1\n1,31,2,.,0,0,0\n", 2, "ADDL",
     ["SS=1 steady-state dose, which resets"]),
    ("ID,TIME,DV,AMT,RATE,EVID\n1,0,.,100,10,1\n1,1,2,.,0,0\n1,5,.,.,0,3\n1,6,2,.,0,0\n", 2, "RATE",
     ["infusion", "runs until time 10", "reset in row 4"]),
])
def test_refusals_name_row_and_column(tmp_path: Path, text: str, row: int, column: str,
                                      expected: list[str]) -> None:
    raises(write(tmp_path, text), row, column, *expected)


@pytest.mark.parametrize("text, row, column, expected, columns", [
    ("ID,TIME,DV,CENS\n1,1,3,0\n1,2,0.1,-1\n", 3, "CENS", ["CENS=-1", "right-censored", "not supported"], None),
    ("ID,TIME,DV,CENS\n1,1,3,0\n1,2,0.1,2\n", 3, "CENS", ["expected CENS 0", "got 2"], None),
    ("ID,TIME,DV,CENS\n1,1,3,0\n1,2,.,1\n", 3, "DV", ["CENS=1", "holds the lower limit", "empty"], None),
    ("ID,TIME,DV,AMT,CENS\n1,0,.,100,1\n1,2,3,.,0\n", 2, "CENS", ["dose/reset record"], None),
    ("ID,TIME,DV,CENS,LLOQ\n1,1,3,0,0.5\n1,2,0.2,1,0.5\n", 3, "LLOQ", ["DV holds the limit", "LLOQ=0.5"], None),
    ("ID,TIME,DV,CENS,LLOQ\n1,1,3,0,0.5\n1,2,0.2,0,0.5\n", 3, "CENS", ["CENS=0", "below LLOQ=0.5"], None),
    ("ID,TIME,DV,CENS,LIMIT\n1,1,3,0,.\n1,2,0.1,1,0\n", 3, "LIMIT", ["interval censoring", "limit"], None),
    ("ID,TIME,DV,LIMIT\n1,1,3,0.1\n", 2, "LIMIT", ["without CENS", "lloq"], None),
    ("ID,TIME,DV,AMT\n1,0,.,100\n1,1,,.\n", 3, "DV", ["expected a numeric observation", "CENS=1"], None),
])
def test_censoring_refusals(tmp_path: Path, text: str, row: int, column: str, expected: list[str],
                            columns: dict | None) -> None:
    raises(write(tmp_path, text), row, column, *expected, columns=columns)


def test_limit_column_can_be_ignored(tmp_path: Path) -> None:
    path = write(tmp_path, "ID,TIME,DV,CENS,LIMIT\n1,1,3,0,.\n1,2,0.1,1,0\n")
    data = read_dataset(path, {"limit": ""})
    assert data.censored[0].tolist() == [False, True]


def test_comments_in_gzip_file_and_date_column_noted(tmp_path: Path) -> None:
    import gzip

    path = tmp_path / "d.csv.gz"
    with gzip.open(path, "wt") as f:
        f.write("ID,TIME,DATE,DV\n1,0,2024-01-01,1\n#skip me\n1,1,2024-01-01,2\n")
    data = read_dataset(path)
    assert data.source_rows[0].tolist() == [2, 4]
    assert any("skipped 1 comment record(s)" in n for n in data.notes)
    assert any("column DATE is not read" in n for n in data.notes)
