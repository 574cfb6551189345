"""The command line: bad input gives a message and a non-zero exit (never a traceback); the stages run end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from amortized_nlme.cli import main

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "amortized_nlme.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def test_bad_csv_exits_with_message_not_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "cells.csv"
    bad.write_text("ID,TIME,DV,REPORTER,EXPERIMENT\n1,0.5,3.0,eGFP,1\n1,0.25,4.0,eGFP,1\n")
    res = run_cli("infer", "mrna_simple", "--data", str(bad))
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert "cells.csv" in res.stderr and "row 3" in res.stderr and "TIME" in res.stderr


def test_missing_file_and_unknown_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["infer", "mrna_simple", "--data", str(tmp_path / "nope.csv")]) == 2
    assert "nope.csv" in capsys.readouterr().err
    assert main(["simulate", "no_such_model", "-n", "10"]) == 2
    assert "no_such_model" in capsys.readouterr().err


def test_bad_population_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pop = tmp_path / "pop.toml"
    pop.write_text('random_effects = ["delta", "not_a_parameter"]\n')
    data = REPO / "amortized_nlme" / "example_data" / "froehlich2018_single_cell_gfp.csv.gz"
    assert main(["infer", "mrna_simple", "--data", str(data), "--pop", str(pop), "--max-individuals", "5"]) == 2
    err = capsys.readouterr().err
    assert "pop.toml" in err and "not_a_parameter" in err


def test_simulate_command_writes_store(tmp_path: Path) -> None:
    out = tmp_path / "sims.h5"
    res = run_cli("simulate", "mrna_simple", "-n", "500", "--chunk-size", "200", "--out", str(out), "--seed", "3")
    assert res.returncode == 0, res.stderr[-2000:]
    from amortized_nlme.simulation.store import SimulationStore

    with SimulationStore(out) as store:
        assert len(store) == 500
        assert store.meta["seed"] == 3
