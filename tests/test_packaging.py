"""A wheel carries what it needs: installed into a fresh location and run from another directory, it finds the shipped
workflows, estimators, population files and example data, and fits the example data with a shipped estimator."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built and unpacked into a fresh target folder (dependencies from this environment)."""
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp),
                    str(REPO)], check=True, capture_output=True, timeout=600)
    wheel = next(tmp.glob("amortized_nlme-*.whl"))
    target = tmp / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(target)
    return target


def test_wheel_holds_the_shipped_resources(installed: Path) -> None:
    shipped = installed / "amortized_nlme" / "_shipped"
    assert (shipped / "workflows" / "pk_oral_1cmt.toml").is_file()
    assert (shipped / "workflows" / "populations" / "theophylline.toml").is_file()
    assert (shipped / "trained_models" / "pk_oral_1cmt" / "approximator.keras").is_file()
    assert (shipped / "trained_models" / "pk_oral_1cmt" / "meta.json").is_file()
    assert (installed / "amortized_nlme" / "example_data" / "theophylline_nonmem.csv").is_file()
    assert not list(shipped.rglob("checkpoint"))  # training checkpoints never ship


def test_installed_wheel_fits_example_data_from_another_directory(installed: Path, tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(installed), AMORTIZED_NLME_CACHE=str(tmp_path / "cache"),
               KERAS_BACKEND="jax", OPENBLAS_NUM_THREADS="1")
    env.pop("AMORTIZED_NLME_HOME", None)
    run = subprocess.run([sys.executable, "-c", "import amortized_nlme, sys; print(amortized_nlme.__file__)"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip().startswith(str(installed)), run.stdout + run.stderr
    res = subprocess.run([sys.executable, "-m", "amortized_nlme", "infer", "pk_oral_1cmt",
                          "--data", "example:theophylline_nonmem.csv", "--pop", "theophylline.toml",
                          "--out", "fit", "--draws", "100", "--starts", "2", "--mc-refits", "0", "--no-profiles"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "fit" / "estimates.csv").is_file() and (tmp_path / "fit" / "summary.json").is_file()
    assert not (REPO / "results" / "draws_cache").exists()  # nothing written into the source tree
    assert list((tmp_path / "cache" / "draws").glob("*.h5"))  # the draw cache in the user cache directory
