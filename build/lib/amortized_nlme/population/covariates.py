"""From a population-model configuration and a data set's covariates to a :class:`PopulationModel` and its
per-individual covariate columns: the covariate transforms (log ratios, centring, categorical dummies) and the group
labels, validated against the data with messages that name the configuration file and key."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from amortized_nlme.config import CovariateDefinition, PopulationConfig
from amortized_nlme.errors import ConfigError
from amortized_nlme.model import NormalPrior, ResidualError
from amortized_nlme.population.model import PopulationModel


def dummy_columns(values: Sequence[Any] | np.ndarray, name: str, reference: Any | None = None) -> dict[str, np.ndarray]:
    """0/1 dummy columns ``<name>_<level>`` for a categorical covariate, leaving out ``reference`` (default: first
    level)."""
    values = np.asarray(values)
    levels = sorted(set(values.tolist()), key=str)
    if reference is None:
        reference = levels[0]
    if reference not in levels:
        # a reference written as a number in TOML for a level read as text (or the other way round)
        matches = [lvl for lvl in levels if str(lvl) == str(reference)]
        if not matches:
            raise ValueError(f"reference level {reference!r} of {name!r} does not occur; levels are {levels}")
        reference = matches[0]
    return {f"{name}_{lvl}": (values == lvl).astype(np.float64) for lvl in levels if lvl != reference}


def covariate_columns(frame: pd.DataFrame, definitions: dict[str, CovariateDefinition], where: str
                      ) -> dict[str, np.ndarray]:
    """Transformed covariate columns ``name -> [n]`` from the data's per-individual covariates ``frame``.

    ``log_ratio_mean``/``log_ratio_median``: log(x / mean or median over individuals); ``centered``: x - mean;
    ``identity``: x; ``categorical``: 0/1 columns ``<name>_<level>`` for every level but the reference.
    """
    cols: dict[str, np.ndarray] = {}
    for name, spec in definitions.items():
        column = spec.column or name
        matches = [c for c in frame.columns if str(c).lower() == column.lower()]
        if not matches:
            raise ConfigError(f"{where}: covariate {name!r} uses column {column!r}, which the data does not have "
                              f"(covariates read: {list(frame.columns)})")
        values = frame[matches[0]].to_numpy()
        if spec.transform == "categorical":
            try:
                cols.update(dummy_columns(values, name, spec.reference))
            except ValueError as exc:
                raise ConfigError(f"{where}: covariate_definitions.{name}: {exc}") from None
            continue
        try:
            x = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: covariate {name!r} (column {column!r}) is not numeric; use "
                              "transform = \"categorical\"") from None
        if spec.transform in ("log_ratio_mean", "log_ratio_median", "log_ratio"):
            if np.any(x <= 0):
                raise ConfigError(f"{where}: covariate {name!r} has values <= 0 (column {column!r}); "
                                  f"{spec.transform} needs positive values")
            if spec.transform == "log_ratio":
                if not isinstance(spec.reference, (int, float)) or spec.reference <= 0:
                    raise ConfigError(f"{where}: covariate_definitions.{name}: log_ratio needs a positive numeric "
                                      "reference (x is divided by it)")
                ref = float(spec.reference)
            else:
                ref = np.mean(x) if spec.transform == "log_ratio_mean" else np.median(x)
            x = np.log(x / ref)
        elif spec.transform == "below":
            if spec.threshold is None:
                raise ConfigError(f"{where}: covariate_definitions.{name}: transform \"below\" needs a threshold")
            x = (x < spec.threshold).astype(np.float64)
        elif spec.transform == "centered":
            x = x - np.mean(x)
        cols[name] = x
    return cols


def expand_relations(config: PopulationConfig, columns: Sequence[str]) -> dict[str, list[str]]:
    """The configuration's ``[covariates]`` relations with categorical covariates expanded to their dummy columns
    (``sex`` -> ``sex_1``); names that are columns already are kept."""
    out: dict[str, list[str]] = {}
    available = set(columns)
    for param, names in config.covariates.items():
        expanded: list[str] = []
        for c in names:
            if c in available:
                expanded.append(c)
                continue
            dummies = sorted(col for col in available if col.startswith(f"{c}_"))
            expanded.extend(dummies if dummies else [c])
        out[param] = expanded
    return out


def population_from_config(config: PopulationConfig, prior: NormalPrior, group_levels: Sequence[str] | None,
                           where: str, columns: Sequence[str] = (), residual: ResidualError | None = None
                           ) -> PopulationModel:
    """A :class:`PopulationModel` from a validated configuration (``group_levels``: the data's levels when the file
    lists none); model errors become a :class:`ConfigError` naming ``where``."""
    groups = config.groups
    kwargs: dict[str, Any] = {
        "random_effects": config.random_effects,
        "covariance": config.covariance,
        "covariates": expand_relations(config, columns),
        "bound_sd": config.bound_sd,
        "residual": residual,
        "fixed_covariate_effects": config.fixed_covariate_effects,
    }
    if isinstance(config.fixed_std, (int, float, dict)):
        kwargs["fixed_std"] = config.fixed_std
    if groups is not None:
        levels = groups.levels if groups.levels else (list(group_levels) if group_levels is not None else [])
        kwargs.update(group_specific=groups.specific, groups=levels, group_column=groups.column)
    try:
        return PopulationModel(prior, **kwargs)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def bind_population(config: PopulationConfig, prior: NormalPrior, covariate_frame: pd.DataFrame,
                    group_labels: np.ndarray | None, n_individuals: int, where: str,
                    residual: ResidualError | None = None, candidates: Sequence[str] = ()
                    ) -> tuple[PopulationModel, dict[str, np.ndarray], np.ndarray | None]:
    """Population model (over the parameters of ``prior``, with ``residual`` sds as population parameters) +
    transformed covariate columns + group labels for one data set, validated together."""
    unknown = [c for cs in config.covariates.values() for c in cs
               if c not in config.definitions() and c not in covariate_frame.columns]
    if unknown:
        raise ConfigError(f"{where}: [covariates] uses {sorted(set(unknown))}, which [covariate_definitions] does not "
                          f"define (defined: {sorted(config.definitions())})")
    covariates = covariate_columns(covariate_frame, config.used_definitions(list(candidates)), where)
    groups = None
    levels = None
    if config.groups is not None:
        if group_labels is None:
            raise ConfigError(f"{where}: [groups] column {config.groups.column!r} was not read from the data")
        groups = np.asarray(group_labels).astype(str)
        levels = sorted(set(groups.tolist()))
    population = population_from_config(config, prior, levels, where, columns=list(covariates), residual=residual)
    try:
        population.design(n_individuals, covariates, groups)  # covariate columns and group labels checked now
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return population, covariates, groups
