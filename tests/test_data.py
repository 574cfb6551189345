"""Tests of the data reader: the shipped real data sets and one test per kind of bad input."""

from __future__ import annotations

import gzip
import logging
import re
from pathlib import Path

import numpy as np
import pytest

from amortized_nlme.config import load_population
from amortized_nlme.data import ColumnMap, DataError, Dataset, read_dataset

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "amortized_nlme" / "example_data"  # shipped copies of shared/data
FROEHLICH = DATA / "froehlich2018_single_cell_gfp.csv.gz"
THEOPH = DATA / "theoph.csv"
THEO_SAEMIX = DATA / "theo_saemix.csv"
POPULATIONS = REPO / "workflows" / "populations"


def read_froehlich(path: Path) -> Dataset:
    """The Fröhlich layout is the default reader with REPORTER as group and EXPERIMENT as a categorical covariate."""
    return read_dataset(path, group="REPORTER", categorical=["EXPERIMENT"])


def read_theophylline(path: Path, drop_predose: bool = False) -> Dataset:
    """Theophylline with the reader options of the shipped example configs (theoph_r.toml, theo_saemix.toml),
    covariates read as numbers."""
    config = load_population(POPULATIONS / ("theoph_r.toml" if path == THEOPH else "theo_saemix.toml"))
    options = config.data.reader_options()
    options.update(drop_predose=drop_predose, categorical=[])
    covariates = ["Wt"] if path == THEOPH else ["Weight", "Sex"]
    return read_dataset(path, covariates=covariates, **options)

needs_data = pytest.mark.skipif(not FROEHLICH.exists(), reason="example data not shipped")


def write(tmp_path: Path, text: str, name: str = "data.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def raises(path: Path, row: int | None, column: str | None, *expected: str, **kwargs) -> str:
    """Read ``path`` expecting a DataError that names the file, the row, the column and the expectation."""
    with pytest.raises(DataError) as info:
        read_dataset(path, **kwargs)
    msg = str(info.value)
    assert str(path) in msg, msg
    if row is not None:
        assert re.match(rf"{re.escape(str(path))}, rows? {row}\b", msg), msg
    if column is not None:
        assert f"column {column}" in msg, msg
    for word in expected:
        assert word.lower() in msg.lower(), msg
    return msg


# ------------------------------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def froehlich() -> Dataset:
    return read_froehlich(FROEHLICH)


@needs_data
def test_froehlich_reads_all_cells(froehlich: Dataset) -> None:
    assert froehlich.n_individuals == 5488
    assert {len(t) for t in froehlich.times} == {180}
    assert froehlich.n_observations == 5488 * 180
    labels, counts = np.unique(froehlich.groups.astype(str), return_counts=True)
    assert dict(zip(labels, counts)) == {"eGFP": 2565, "d2eGFP": 2923}
    grid = np.arange(1, 181) / 6
    assert all(np.allclose(t, grid, atol=1e-5) for t in froehlich.times[:50])
    assert froehlich.times[0][0] == pytest.approx(1 / 6, abs=1e-5)
    assert froehlich.times[-1][-1] == pytest.approx(30.0)
    assert all(d.shape == (0, 7) for d in froehlich.doses[:10])
    assert list(froehlich.covariates.columns) == ["EXPERIMENT"]
    assert sorted(froehlich.covariates["EXPERIMENT"].unique()) == ["20160427", "20160513", "20160603"]
    assert froehlich.covariates.index[0] == froehlich.ids[0] == "1"
    assert froehlich.source_rows[0][0] == 2 and froehlich.source_rows[1][0] == 182
    assert "5488" in froehlich.summary() and "eGFP (2565)" in froehlich.summary()


@needs_data
def test_froehlich_subset_and_hash(froehlich: Dataset) -> None:
    sub = froehlich.subset(np.flatnonzero(froehlich.groups == "eGFP"))
    assert sub.n_individuals == 2565 and set(sub.groups) == {"eGFP"}
    assert list(sub.covariates.index) == sub.ids
    first = froehlich.subset([0, 1, 2])
    assert first.ids == froehlich.ids[:3]
    assert first.content_hash() == froehlich.subset(slice(0, 3)).content_hash()
    assert first.content_hash() != froehlich.subset([0, 1, 3]).content_hash()
    assert len(froehlich.content_hash()) == 64


@needs_data
@pytest.mark.parametrize("path", [THEOPH, THEO_SAEMIX])
def test_theophylline_doses_in_mg(path: Path) -> None:
    data = read_theophylline(path)
    assert data.n_individuals == 12
    assert data.ids == [str(i) for i in range(1, 13)]
    doses = np.array([d[0, 1] for d in data.doses])
    assert all(d.shape == (1, 7) and d[0, 0] == 0.0 and d[0, 2] == 1 for d in data.doses)
    assert doses[0] == pytest.approx(320.0, abs=0.01)  # 4.02 mg/kg * 79.6 kg
    weight = "Wt" if path == THEOPH else "Weight"
    assert data.covariates[weight].iloc[0] == pytest.approx(79.6)
    assert data.covariates[weight].iloc[1] == pytest.approx(72.4)
    assert {len(t) for t in data.times} == ({11} if path == THEOPH else {10})


@needs_data
def test_theophylline_files_agree_after_dropping_predose() -> None:
    a = read_theophylline(THEOPH, drop_predose=True)
    b = read_theophylline(THEO_SAEMIX, drop_predose=True)
    assert {len(t) for t in a.times} == {10}
    assert any("pre-dose" in n for n in a.notes)
    for i in range(12):
        np.testing.assert_allclose(a.times[i], b.times[i])
        np.testing.assert_allclose(a.dv[i], b.dv[i])
        np.testing.assert_allclose(a.doses[i], b.doses[i], rtol=1e-4)
    np.testing.assert_allclose(a.covariates["Wt"].to_numpy(), b.covariates["Weight"].to_numpy())
    assert set(b.covariates["Sex"]) == {0.0, 1.0}


# --------------------------------------------------------------------------------------------- good inputs


def test_nonmem_dose_records_mdv_skip_and_obs_types(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path, (
        "id,time,dv,amt,evid,mdv,cmt,wt,sex\n"
        "A,0,.,100,1,1,1,70,M\n"
        "A,0.5,1.5,0,0,0,2,70,M\n"
        "A,1,.,0,2,1,2,70,M\n"
        "A,1,2.5,.,0,0,3,70,M\n"
        "A,12,.,50,1,1,1,70,M\n"
        "A,13,3.0,0,0,0,2,70,M\n"
        "B,0,.,200,1,1,1,80,F\n"
        "B,2,0.7,0,0,1,2,80,F\n"
        "B,2,0.9,0,0,0,2,80,F\n"
        "B,4,0.1,0,0,0,3,80,F\n"
    ))
    with caplog.at_level(logging.WARNING, logger="amortized_nlme.data"):
        data = read_dataset(path, covariates=["WT", "sex"], n_obs_types=2)
    assert data.ids == ["A", "B"]
    np.testing.assert_allclose(data.doses[0][:, :3], [[0, 100, 1], [12, 50, 1]])
    np.testing.assert_allclose(data.doses[1][:, :3], [[0, 200, 1]])
    np.testing.assert_allclose(data.times[0], [0.5, 1, 13])
    np.testing.assert_allclose(data.dv[1], [0.9, 0.1])
    assert data.obs_type_labels == ["2", "3"]
    assert data.obs_type[0].tolist() == [0, 1, 0] and data.obs_type[1].tolist() == [0, 1]
    assert data.source_rows[0].tolist() == [3, 5, 7]
    assert data.covariates.loc["B", "wt"] == 80 and data.covariates.loc["A", "sex"] == "M"
    assert "skipped 2 record(s)" in caplog.text and "rows 4 and 9" in caplog.text
    assert data.notes and "skipped 2" in data.notes[0]


def test_dose_rows_without_evid_and_gzip(tmp_path: Path) -> None:
    text = "ID,TIME,DV,AMT\n1,0,,5\n1,1,0.4,0\n1,2,0.3,\n2,0,,6\n2,1,0.5,0\n"
    path = tmp_path / "d.csv.gz"
    with gzip.open(path, "wt") as f:
        f.write(text)
    data = read_dataset(path)
    assert [d[:, 1].tolist() for d in data.doses] == [[5.0], [6.0]]
    assert [t.tolist() for t in data.times] == [[1.0, 2.0], [1.0]]
    assert data.content_hash() == read_dataset(write(tmp_path, text)).content_hash()


def test_column_map_from_dict_case_insensitive(tmp_path: Path) -> None:
    path = write(tmp_path, "Subject,Hours,Conc,Batch\n1,0.5,3,x\n1,1,4,x\n2,0.5,5,y\n")
    data = read_dataset(path, {"ID": "subject", "time": "HOURS", "dv": "conc"}, group="batch")
    assert data.groups.tolist() == ["x", "y"]
    assert read_dataset(path, ColumnMap(id="SUBJECT", time="hours", dv="CONC")).n_individuals == 2
    with pytest.raises(DataError, match="unknown role 'sbj'"):
        ColumnMap.from_dict({"sbj": "Subject"})


def test_blank_lines_do_not_shift_row_numbers(tmp_path: Path) -> None:
    path = write(tmp_path, "ID,TIME,DV\n1,0,1\n\n1,1,x\n")
    raises(path, 4, "DV", "expected a number", "'x'")


# ---------------------------------------------------------------------------------------------- bad inputs


def test_missing_required_column(tmp_path: Path) -> None:
    path = write(tmp_path, "ID,TIME,CONC\n1,0,1\n")
    msg = raises(path, 1, "DV", "missing", "ID, TIME, CONC")
    assert "row 1 (header)" in msg


def test_non_numeric_value(tmp_path: Path) -> None:
    path = write(tmp_path, "ID,TIME,DV\n1,0,1\n1,1,2\n1,2h,3\n")
    raises(path, 4, "TIME", "expected a number", "'2h'")


def test_empty_dv_on_observation_row(tmp_path: Path) -> None:
    path = write(tmp_path, "ID,TIME,DV\n1,0,1\n1,1,\n1,2,3\n")
    raises(path, 3, "DV", "expected a numeric observation", "MDV=1")


def test_nan_dv_on_observation_row_with_mdv0(tmp_path: Path) -> None:
    path = write(tmp_path, "ID,TIME,DV,MDV\n1,0,1,0\n1,1,2,0\n1,2,NaN,0\n")
    raises(path, 4, "DV", "expected a numeric observation")


def test_negative_time(tmp_path: Path) -> None:
    path = write(tmp_path, "ID,TIME,DV\n1,0,1\n2,-0.5,2\n")
    raises(path, 3, "TIME", "expected a time >= 0", "-0.5")


def test_time_decreasing_within_id(tmp_path: Path) -> None:
    path = write(tmp_path, "ID,TIME,DV\n1,0,1\n1,2,1\n1,1,2\n2,0,1\n")
    raises(path, 4, "TIME", "time decreases within ID '1'", "sorted by time", "row 3")


def test_id_without_observations(tmp_path: Path) -> None:
    path = write(tmp_path, "ID,TIME,DV,AMT,MDV\n1,0,,10,1\n1,1,3,0,0\n2,0,,10,1\n2,1,4,0,1\n3,0,,10,1\n3,1,1,0,0\n")
    raises(path, 4, "DV", "ID '2' has no observation records", "at least one observation")


def test_id_without_observations_after_predose_drop(tmp_path: Path) -> None:
    path = write(tmp_path, "ID,TIME,DV,DOSE\n1,0,1,5\n1,1,3,5\n2,0,2,5\n")
    raises(path, 4, "DV", "ID '2'", "after dropping pre-dose", dose_column="DOSE", drop_predose=True)


def test_non_constant_covariate(tmp_path: Path) -> None:
    path = write(tmp_path, "ID,TIME,DV,WT\n1,0,1,70\n1,1,2,70\n2,0,1,60\n2,1,2,61\n")
    raises(path, 5, "WT", "constant within an individual", "ID '2'", "row 4", covariates=["wt"])


def test_missing_covariate_value(tmp_path: Path) -> None:
    path = write(tmp_path, "ID,TIME,DV,SEX\n1,0,1,M\n1,1,2,\n")
    raises(path, 3, "SEX", "expected a value", categorical=["SEX"])


def test_non_constant_group(tmp_path: Path) -> None:
    path = write(tmp_path, "ID,TIME,DV,REPORTER\n1,0,1,eGFP\n1,1,2,d2eGFP\n")
    raises(path, 3, "REPORTER", "constant within an individual", group="REPORTER")


def test_obs_type_count_differs(tmp_path: Path) -> None:
    path = write(tmp_path, "ID,TIME,DV,CMT\n1,0,1,2\n1,1,2,2\n1,2,3,3\n")
    raises(path, 4, "CMT", "expected 1 observation type(s), found 2")
    raises(path, None, "CMT", "expected 3 observation type(s), found 2", n_obs_types=3)


def test_obs_types_requested_without_column(tmp_path: Path) -> None:
    path = write(tmp_path, "ID,TIME,DV\n1,0,1\n")
    raises(path, 1, "CMT", "expected 2 observation types", n_obs_types=2)


def test_empty_file(tmp_path: Path) -> None:
    raises(write(tmp_path, ""), 1, None, "empty", "header")


def test_header_only(tmp_path: Path) -> None:
    raises(write(tmp_path, "ID,TIME,DV\n"), 2, None, "no data rows")


def test_id_in_non_contiguous_blocks(tmp_path: Path) -> None:
    path = write(tmp_path, "ID,TIME,DV\n1,0,1\n1,1,1\n2,0,1\n1,2,1\n")
    raises(path, 5, "ID", "ID '1' appears again", "2-3", "contiguous")


def test_ragged_row_is_wrapped(tmp_path: Path) -> None:
    path = write(tmp_path, "ID,TIME,DV\n1,0,1\n1,1,2,3\n")
    raises(path, 3, None, "expected 3 fields", "found 4")


def test_amt_on_observation_row(tmp_path: Path) -> None:
    # without MDV, NM-TRAN reads AMT > 0 as a dose record whatever DV holds (see test_nonmem_reader.py); with MDV=0
    # the record claims to be both an observation and a dose, which NONMEM refuses
    path = write(tmp_path, "ID,TIME,DV,AMT,MDV\n1,0,1,0,0\n1,1,2,10,0\n")
    raises(path, 3, "AMT", "expected a dose record")


def test_invalid_evid_and_mdv(tmp_path: Path) -> None:
    raises(write(tmp_path, "ID,TIME,DV,EVID\n1,0,1,0\n1,1,2,7\n"), 3, "EVID", "expected an event id")
    raises(write(tmp_path, "ID,TIME,DV,MDV\n1,0,1,2\n"), 2, "MDV", "expected 0 or 1")
    raises(write(tmp_path, "ID,TIME,DV,AMT,EVID\n1,0,.,0,1\n1,1,2,0,0\n"), 2, "AMT", "expected an amount > 0")


def test_negative_dose_and_non_constant_dose_column(tmp_path: Path) -> None:
    raises(write(tmp_path, "ID,TIME,DV,AMT\n1,0,.,-5\n1,1,2,0\n"), 2, "AMT", "expected a dose amount >= 0")
    raises(write(tmp_path, "ID,TIME,DV,DOSE\n1,0,1,5\n1,1,2,6\n"), 3, "DOSE", "constant within an individual",
           dose_column="dose")


def test_missing_id_and_missing_file(tmp_path: Path) -> None:
    raises(write(tmp_path, "ID,TIME,DV\n1,0,1\n,1,2\n"), 3, "ID", "expected an individual ID")
    with pytest.raises(DataError, match="file not found"):
        read_dataset(tmp_path / "nope.csv")


def test_explicit_optional_column_must_exist(tmp_path: Path) -> None:
    path = write(tmp_path, "ID,TIME,DV\n1,0,1\n")
    raises(path, 1, "DOSE", "missing", "ID, TIME, DV", columns={"amt": "DOSE"})
