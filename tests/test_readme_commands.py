"""The README's example commands name models and population files that fit together: every ``amortized-nlme infer``
or ``select-covariates`` line of its code blocks (and the Makefile's demos) loads its population file against the
model's parameters, so a renamed parameter or file breaks a test, not a user's first command."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from amortized_nlme.config import load_population
from amortized_nlme.population.covariates import population_from_config
from amortized_nlme.resources import resolve_population_path
from simulators import MODELS, get_model

REPO = Path(__file__).resolve().parent.parent


def documented_commands() -> list[list[str]]:
    """Every infer / select-covariates command of the README's code blocks and the Makefile, continuation lines
    joined and comments dropped."""
    text = (REPO / "README.md").read_text() + "\n" + (REPO / "Makefile").read_text()
    joined = re.sub(r"\\\n\s*", " ", text)
    commands = []
    for line in joined.splitlines():
        m = re.search(r"amortized-nlme\)? (infer|select-covariates) (.*)", line)
        if m is None:
            continue
        words = shlex.split(m.group(2).split("#")[0].split("`")[0])
        if words and words[0] in MODELS and "--pop" in words:  # placeholders (MODEL, $(MODEL)) are not commands
            commands.append([m.group(1), *words])
    return commands


COMMANDS = documented_commands()


def test_readme_has_fitting_commands() -> None:
    assert len(COMMANDS) >= 3, COMMANDS


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c[:2]) + " " + c[c.index("--pop") + 1] for c in COMMANDS])
def test_population_file_fits_the_model(command: list[str]) -> None:
    model = get_model(command[1])
    path = resolve_population_path(command[command.index("--pop") + 1])
    config = load_population(path)
    levels = ("first", "second") if config.groups is not None else None  # group levels come from the data
    population = population_from_config(config, model.prior, group_levels=levels, where=path)
    assert set(population.param_names_individual) == set(model.prior.names)
