"""Where the shipped resources are: workflow configs, trained estimators and example data, found the same way in a
source checkout, an editable install and an installed wheel; and where caches go (a user cache directory, never the
source tree).

In a wheel, ``workflows/`` and ``trained_models/`` are installed under ``amortized_nlme/_shipped/`` (see
``pyproject.toml``); in a checkout they are the repository's top-level folders. ``AMORTIZED_NLME_HOME`` (a folder
holding ``workflows/`` and/or ``trained_models/``) is searched first, so users can keep their own estimators.
"""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

from amortized_nlme.errors import ConfigError

_PACKAGE_DIR = Path(str(files("amortized_nlme")))
#: the top-level folders that ship with the package
SHIPPED_KINDS = ("workflows", "trained_models")


def _candidates(kind: str) -> list[Path]:
    out = []
    home = os.environ.get("AMORTIZED_NLME_HOME")
    if home:
        out.append(Path(home) / kind)
    out.append(_PACKAGE_DIR / "_shipped" / kind)  # installed wheel
    out.append(_PACKAGE_DIR.parent / kind)  # source checkout / editable install
    return out


def shipped_dir(kind: str) -> Path:
    """The folder of shipped ``kind`` ("workflows" or "trained_models")."""
    if kind not in SHIPPED_KINDS:
        raise ValueError(f"unknown resource kind {kind!r}")
    for path in _candidates(kind):
        if path.is_dir():
            return path
    raise ConfigError(f"cannot find the shipped {kind}/ folder (looked in {', '.join(map(str, _candidates(kind)))})")


def workflow_file(name: str) -> Path:
    """``workflows/<name>.toml`` (first match along the search path)."""
    for folder in _candidates("workflows"):
        path = folder / f"{name}.toml"
        if path.is_file():
            return path
    return shipped_dir("workflows") / f"{name}.toml"


def estimator_dir(model: str) -> Path:
    """``trained_models/<model>/`` (first match along the search path that holds an estimator)."""
    for folder in _candidates("trained_models"):
        path = folder / model
        if (path / "meta.json").is_file():
            return path
    return shipped_dir("trained_models") / model


def resolve_shipped_path(path: str | os.PathLike) -> Path:
    """A relative path written in a shipped config (e.g. ``trained_models/x/phase1``): as given when it exists from the
    working directory, else relative to the shipped folders."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    parts = p.parts
    if parts and parts[0] in SHIPPED_KINDS:
        for folder in _candidates(parts[0]):
            q = folder.joinpath(*parts[1:])
            if q.exists():
                return q
    return p


def example_data_dir() -> Path:
    """The shipped example data sets (inside the package)."""
    return _PACKAGE_DIR / "example_data"


def example_data(name: str) -> Path:
    """A shipped example data file by name (e.g. ``theo_saemix.csv``)."""
    path = example_data_dir() / name
    if not path.is_file():
        available = sorted(p.name for p in example_data_dir().iterdir() if p.suffix in (".csv", ".gz", ".toml"))
        raise ConfigError(f"no shipped example data set {name!r}; available: {', '.join(available)}")
    return path


def resolve_data_path(path: str) -> str:
    """``example:<name>`` names a shipped example data set; anything else is a path."""
    if path.startswith("example:"):
        return str(example_data(path[len("example:"):]))
    return path


def resolve_population_path(path: str) -> str:
    """A population file: as given when it exists, else a shipped one by name (``theophylline.toml`` finds
    ``workflows/populations/theophylline.toml`` wherever the package is installed)."""
    p = Path(path)
    if p.exists() or p.is_absolute() or len(p.parts) > 1:
        return path
    for folder in _candidates("workflows"):
        q = folder / "populations" / p.name
        if q.is_file():
            return str(q)
    return path


def user_cache_dir() -> Path:
    """``$AMORTIZED_NLME_CACHE``, else ``$XDG_CACHE_HOME/amortized-nlme``, else ``~/.cache/amortized-nlme``."""
    explicit = os.environ.get("AMORTIZED_NLME_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "amortized-nlme"
