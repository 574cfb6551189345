"""The package layout shows the pipeline: each stage imports only stages below it (checked on the source, so a new
import that reaches upwards fails here), ``errors`` imports nothing from the package, and configuration files are
parsed by one schema."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

#: layer of every part of the code; a module may import its own part and parts with a lower layer only
LAYERS = {
    "amortized_nlme.errors": 0,
    "amortized_nlme.provenance": 1, "amortized_nlme.resources": 1,
    "amortized_nlme.config": 2,
    "amortized_nlme.data": 3,
    "amortized_nlme.model": 4,
    "amortized_nlme.population": 5, "simulators": 5,
    "amortized_nlme.simulation": 6,
    "amortized_nlme.posterior": 7,
    "amortized_nlme.training": 8,
    "amortized_nlme.report": 9,
    "amortized_nlme.inference": 10,
    "amortized_nlme.cli": 11,
    "amortized_nlme.__main__": 12, "amortized_nlme": 12,
}


def part_of(module: str) -> str:
    """The entry of :data:`LAYERS` that ``module`` belongs to (longest matching prefix)."""
    best = ""
    for name in LAYERS:
        if (module == name or module.startswith(name + ".")) and len(name) > len(best):
            best = name
    if not best:
        raise AssertionError(f"{module} is in no layer of tests/test_layout.py: add it")
    return best


def modules() -> list[tuple[str, Path]]:
    out = []
    for root in ("amortized_nlme", "simulators"):
        for path in sorted((REPO / root).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out.append((".".join(parts), path))
    return out


def package_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [f"{node.module}.{a.name}" for a in node.names]
    return [m for m in found if m.split(".")[0] in ("amortized_nlme", "simulators")]


@pytest.mark.parametrize("module, path", modules(), ids=[m for m, _ in modules()])
def test_no_stage_imports_a_stage_above_it(module: str, path: Path) -> None:
    own = part_of(module)
    for imported in package_imports(path):
        target = part_of(imported)
        if target == own or imported in ("amortized_nlme.__version__",):
            continue
        assert LAYERS[target] < LAYERS[own], (
            f"{module} (layer {LAYERS[own]}) imports {imported} (layer {LAYERS[target]})")


def test_errors_imports_nothing_from_the_package() -> None:
    assert package_imports(REPO / "amortized_nlme" / "errors.py") == []


def test_every_shipped_config_parses_with_the_one_schema() -> None:
    from amortized_nlme.config import load_population, load_workflow

    for path in sorted((REPO / "workflows").glob("*.toml")):
        load_workflow(path)
    for path in sorted((REPO / "workflows" / "populations").glob("*.toml")):
        load_population(path)


@pytest.mark.parametrize("text, key", [
    ('model = "mrna_simple"\n[training]\nbatch_sise = 3\n', "training.batch_sise: unknown key"),
    ('model = "mrna_simple"\n[training]\nbatch_size = "512"\n', "training.batch_size"),
    ('model = "mrna_simple"\n[network]\nflow_transform = "nope"\n', "network.flow_transform"),
    ('model = "mrna_simple"\n[simulation]\nn = 2.5\n', "simulation.n"),
])
def test_workflow_errors_name_file_and_key(tmp_path: Path, text: str, key: str) -> None:
    from amortized_nlme.config import load_workflow
    from amortized_nlme.errors import ConfigError

    path = tmp_path / "wf.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_workflow(path)
    assert str(path) in str(info.value) and key in str(info.value)


def test_population_file_errors_name_file_and_key(tmp_path: Path) -> None:
    from amortized_nlme.config import load_population
    from amortized_nlme.errors import ConfigError

    path = tmp_path / "pop.toml"
    path.write_text('random_effects = ["ka"]\n[groups]\ncolumn = "STUDY"\nspecifc = ["ka"]\n')
    with pytest.raises(ConfigError, match=r"pop\.toml: groups\.specifc: unknown key"):
        load_population(path)
    path.write_text('covariance = "banded"\n')
    with pytest.raises(ConfigError, match=r"pop\.toml: covariance"):
        load_population(path)


def test_readme_configuration_reference_is_generated_from_the_schema() -> None:
    """The README's table of every configuration key is the schema's own (``make config-reference`` rewrites it)."""
    from amortized_nlme.config import reference_table

    text = (REPO / "README.md").read_text()
    block = text.split("<!-- config-reference:start -->\n", 1)[1].split("\n<!-- config-reference:end -->", 1)[0]
    assert block == reference_table()
