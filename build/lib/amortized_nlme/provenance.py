"""Provenance and small file helpers shared by every stage: JSON written atomically, the package versions a result
was made with, and file hashes."""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import math
import os
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from amortized_nlme.errors import ConfigError

#: the packages whose versions are recorded with simulations, estimators and results
RECORDED_PACKAGES = ("amortized-nlme", "bayesflow", "keras", "jax", "tensorflow-cpu", "pypesto", "arviz", "numpy",
                     "scipy", "numba", "h5py")


def plain_json(obj: Any) -> Any:
    """``obj`` with numpy values, tuples and paths turned into plain JSON types; non-finite floats become null (strict
    JSON has no NaN). The one JSON encoding of the package: results, metadata, checkpoints."""
    if isinstance(obj, Mapping):
        return {str(k): plain_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain_json(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return plain_json(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if obj is None or isinstance(obj, str):
        return obj
    raise TypeError(f"cannot write {type(obj).__name__} to JSON: {obj!r}")


def to_json(obj: Any) -> str:
    """``obj`` as indented strict JSON (see :func:`plain_json`)."""
    return json.dumps(plain_json(obj), indent=2, allow_nan=False)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON; readers see the old file or the complete new one, never a half-written one
    (the temporary name is unique per process, so two writers never share it)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(to_json(obj))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Parse a JSON file; a missing or invalid file is a :class:`ConfigError` naming it."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the {what} ({exc})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: the {what} is not valid JSON ({exc})") from None


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (names the exact estimator, data or store a result was made from)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def package_versions() -> dict[str, str]:
    """Installed versions of the packages in :data:`RECORDED_PACKAGES` (absent ones left out)."""
    out: dict[str, str] = {}
    for pkg in RECORDED_PACKAGES:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def platform_description() -> str:
    """Operating system and CPU count, recorded with results."""
    return f"{platform.platform()} ({os.cpu_count()} CPU cores)"
