"""One typed, validated schema for every configuration file: the workflow of an individual model
(``workflows/<model>.toml``), the population model of an analysis (``--pop file.toml``) and the data-reader options
(a ``[data]`` table in either). One parser: unknown keys and wrong types are refused with the file and the key.

Validation is pydantic's (strict: a string is never read as a number, ``2.5`` is never read as an integer); every
error becomes a :class:`~amortized_nlme.errors.ConfigError` naming the file and the key path. The README has a table
of every key (generated from these classes by :func:`reference_table`).
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from amortized_nlme.errors import ConfigError
from amortized_nlme.resources import workflow_file

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]


class _Section(BaseModel):
    """A configuration table: unknown keys refused, no type coercion."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)


# ------------------------------------------------------------------------------------------------- workflow


class SimulationConfig(_Section):
    """Offline simulation budget for ``simulate`` (online training simulates on the fly instead)."""

    n: PositiveInt = Field(100_000, description="simulations written to the store")
    chunk_size: PositiveInt = Field(10_000, description="simulations per chunk (the unit of resumption and of "
                                                       "parallel work)")
    seed: NonNegativeInt = Field(1, description="seed of the store (same seed, same bytes)")


class NetworkConfig(_Section):
    """Summary network over the encoded data + normalizing flow (BayesFlow 2)."""

    summary: Literal["time_series", "lstm", "transformer"] = Field(
        "time_series", description="summary network: conv + GRU/LSTM, LSTM only, or transformer")
    summary_dim: PositiveInt = Field(16, description="width of the learned summary statistics")
    filters: list[PositiveInt] = Field([32, 32], description="time_series: convolution filters per layer")
    kernel_sizes: list[PositiveInt] = Field([3, 3], description="time_series: kernel size per layer")
    strides: list[PositiveInt] = Field([2, 2], description="time_series: stride per layer")
    recurrent_type: Literal["gru", "lstm"] = Field("gru", description="recurrent cell")
    recurrent_dim: PositiveInt = Field(64, description="recurrent units")
    bidirectional: bool = Field(True, description="bidirectional recurrence")
    skip_steps: PositiveInt = Field(4, description="time_series: skip connection steps")
    dropout: Annotated[float, Field(ge=0, lt=1)] = Field(0.0, description="summary-network dropout")
    transformer_dim: PositiveInt = Field(64, description="transformer: embedding width")
    transformer_heads: PositiveInt = Field(4, description="transformer: attention heads")
    transformer_layers: PositiveInt = Field(2, description="transformer: layers")
    flow_depth: PositiveInt = Field(6, description="coupling layers")
    flow_transform: Literal["affine", "spline"] = Field("affine", description="coupling transform")
    flow_widths: list[PositiveInt] = Field([128, 128], description="hidden widths of each coupling MLP")
    # BayesFlow's coupling MLPs default to dropout 0.05; dropout noise in the affine scales widens the learned
    # posteriors (over-dispersed SBC ranks when the posterior is ~100x narrower than the prior), so 0 by default.
    flow_dropout: Annotated[float, Field(ge=0, lt=1)] = Field(0.0, description="dropout in the coupling MLPs")


class TrainingConfig(_Section):
    """Optimizer, schedule, stopping and data source of the training stage."""

    mode: Literal["online", "offline"] = Field("online", description="online: fresh simulations every batch; "
                                                                     "offline: read the simulation store")
    batch_size: PositiveInt = Field(256, description="simulations per batch")
    epochs: PositiveInt = Field(40, description="epochs (a checkpoint after each)")
    steps_per_epoch: PositiveInt = Field(500, description="batches per epoch (online mode)")
    learning_rate: PositiveFloat = Field(5e-4, description="peak learning rate of the cosine schedule")
    weight_decay: Annotated[float, Field(ge=0)] = Field(0.0, description="AdamW weight decay (0: Adam)")
    validation_size: PositiveInt = Field(2000, description="held-out simulations for the validation loss")
    patience: PositiveInt = Field(8, description="early stopping after this many epochs without improvement")
    seed: NonNegativeInt = Field(7, description="seed of weights, batches and validation set")
    warm_start: str = Field("", description="estimator folder whose weights start this run (a later phase)")


class CheckConfig(_Section):
    """Simulation-based calibration on fresh simulations never seen in training."""

    n_simulations: PositiveInt = Field(1000, description="held-out simulations")
    n_draws: PositiveInt = Field(1000, description="posterior draws per simulation")
    seed: NonNegativeInt = Field(20240, description="seed of the held-out simulations and draws")


# ------------------------------------------------------------------------------------------------ data reader


class DataConfig(_Section):
    """How to read a long-format (NONMEM/Monolix) CSV; the defaults read a NONMEM data set as NM-TRAN does."""

    columns: dict[str, str] = Field(default_factory=dict, description="role -> column name, e.g. {id = \"Id\", "
                                    "time = \"Time\", dv = \"Concentration\"}; roles: id, time, dv, amt, evid, mdv, "
                                    "cmt, obs_type and the other NONMEM roles; \"\" ignores a column")
    categorical: list[str] = Field(default_factory=list, description="covariate columns read as categories")
    dose_column: str | None = Field(None, description="one dose per individual from this column (no dose rows)")
    dose_scale_column: str | None = Field(None, description="multiplies dose_column (e.g. mg/kg x weight)")
    dose_time: float = Field(0.0, description="time of the dose given by dose_column")
    dose_cmt: int = Field(1, description="compartment of the dose given by dose_column")
    drop_predose: bool = Field(False, description="drop observations at or before an individual's first dose")

    def reader_options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`amortized_nlme.data.read_dataset`."""
        opts: dict[str, Any] = {"columns": dict(self.columns), "categorical": list(self.categorical),
                                "drop_predose": self.drop_predose}
        if self.dose_column:
            opts.update(dose_column=self.dose_column, dose_scale_column=self.dose_scale_column,
                        dose_time=self.dose_time, dose_cmt=self.dose_cmt)
        elif self.dose_scale_column:
            opts["dose_scale_column"] = self.dose_scale_column
        return opts

    def merged(self, other: "DataConfig | None") -> "DataConfig":
        """These options overridden by the keys ``other`` sets explicitly."""
        if other is None:
            return self
        values = self.model_dump()
        values.update(other.model_dump(exclude_unset=True))
        return DataConfig.model_validate(values)


# ---------------------------------------------------------------------------------------------- population


class CovariateDefinition(_Section):
    """A covariate made from a data column: ``lwt = {column = "WT", transform = "log_ratio_median"}``."""

    column: str | None = Field(None, description="data column (default: the covariate's name)")
    transform: Literal["identity", "log_ratio_mean", "log_ratio_median", "log_ratio", "centered", "categorical",
                       "below"] = Field(
        "identity", description="log(x / mean), log(x / median), log(x / reference), x - mean, x, 0/1 columns per "
                                "level, or 1 where x < threshold")
    threshold: float | None = Field(None, description="below: the value under which the indicator is 1")
    reference: str | int | float | None = Field(None, description="categorical: level left out (default: first); "
                                                                   "log_ratio: the value x is divided by")


class GroupsConfig(_Section):
    """Groups of individuals with group-specific population means (e.g. two reporter proteins)."""

    column: str = Field(description="data column holding each individual's group")
    specific: list[str] = Field(default_factory=list, description="parameters with one mean per group")
    levels: list[str] | None = Field(None, description="group levels in order (default: sorted levels in the data)")


class PopulationConfig(_Section):
    """A population model: which parameters vary between individuals, how, and with which covariates."""

    random_effects: Literal["all"] | list[str] = Field("all", description="parameters with a random effect")
    covariance: Literal["diagonal", "full"] = Field("diagonal", description="Omega diagonal or full (Cholesky)")
    covariates: dict[str, list[str]] = Field(default_factory=dict, description="parameter -> covariates on it, "
                                             "e.g. {V = [\"lwt\"]} (names from [covariate_definitions])")
    covariate_definitions: dict[str, CovariateDefinition | str] = Field(
        default_factory=dict, description="name -> definition (or just the column name)")
    groups: GroupsConfig | None = Field(None, description="group-specific parameters")
    fixed_std: Literal["auto"] | PositiveFloat | dict[str, PositiveFloat] = Field(
        "auto", description="kernel width (log scale) of parameters without random effect; auto: a fifth of "
                            "their median posterior sd")
    bound_sd: PositiveFloat = Field(4.0, description="optimisation box: prior mean +- bound_sd prior sds")
    fixed_covariate_effects: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="covariate coefficients fixed at known values, not estimated, e.g. "
                                          "{CL = {lwt = 1.0}} for clearance proportional to weight")
    residual_error: Literal["additive", "proportional", "combined"] | None = Field(
        None, description="residual-error model, estimated as population parameters with the exact likelihood "
                          "(default: the model's own; PK models: additive, proportional or combined)")
    data: DataConfig | None = Field(None, description="data-reader options of this analysis (override the "
                                                      "workflow's [data])")

    @field_validator("covariate_definitions", mode="before")
    @classmethod
    def _definition_strings(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: ({"column": v} if isinstance(v, str) else v) for k, v in value.items()}
        return value

    def definitions(self) -> dict[str, CovariateDefinition]:
        """Covariate definitions with string shorthands expanded."""
        return {k: (CovariateDefinition(column=v) if isinstance(v, str) else v)
                for k, v in self.covariate_definitions.items()}

    def used_definitions(self, candidates: list[str] | tuple[str, ...] = ()) -> dict[str, CovariateDefinition]:
        """The covariate definitions a fit needs: those named in ``[covariates]`` and the ``candidates`` of a
        covariate search (a definition nobody uses does not make its data column compulsory)."""
        wanted = ({c for cs in self.covariates.values() for c in cs}
                  | {c for cs in self.fixed_covariate_effects.values() for c in cs} | set(candidates))
        defs = self.definitions()
        return {name: d for name, d in defs.items()
                if name in wanted or any(w.startswith(f"{name}_") for w in wanted)}

    def covariate_data_columns(self, candidates: list[str] | tuple[str, ...] = ()) -> list[str]:
        """The data columns the used covariate definitions read (what the data reader must read)."""
        return [d.column or name for name, d in self.used_definitions(candidates).items()]

    def categorical_data_columns(self, candidates: list[str] | tuple[str, ...] = ()) -> list[str]:
        return [d.column or name for name, d in self.used_definitions(candidates).items()
                if d.transform == "categorical"]


class WorkflowConfig(_Section):
    """Everything needed to simulate, train and check one individual model (``workflows/<model>.toml``)."""

    model: str = Field(description="individual model name (see `amortized-nlme models`)")
    model_options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the model")
    simulation: SimulationConfig = Field(default_factory=SimulationConfig)
    network: NetworkConfig = Field(default_factory=NetworkConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    check: CheckConfig = Field(default_factory=CheckConfig)
    population: PopulationConfig | None = Field(None, description="default population model for `infer`")
    data: DataConfig = Field(default_factory=DataConfig, description="default data-reader options")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (recorded with checkpoints and estimators)."""
        return self.model_dump(mode="json")


# ---------------------------------------------------------------------------------------------- the parser


def _format_errors(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(x) for x in err["loc"] if not (isinstance(x, str) and x.startswith(("function-", "literal["))))
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        value = err.get("input")
        shown = "" if err["type"] in ("extra_forbidden", "missing") else f" (got {value!r})"
        parts.append(f"{loc or '(top level)'}: {msg}{shown}")
    more = len(exc.errors()) - 5
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def _read_table(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found")
    text = path.read_text()
    try:
        return json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: invalid {'JSON' if path.suffix.lower() == '.json' else 'TOML'}: {exc}") from None


def validate(cls: type[_Section], raw: dict[str, Any], where: str) -> Any:
    """``raw`` validated as ``cls``; errors become one :class:`ConfigError` naming ``where`` and the keys."""
    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {_format_errors(exc)}") from None


def load_workflow(name_or_path: str | Path) -> WorkflowConfig:
    """A workflow by model name (``workflows/<name>.toml``) or path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = workflow_file(str(name_or_path))
        if not path.is_file():
            raise ConfigError(f"no workflow for model {name_or_path!r} ({path} not found); see `amortized-nlme models`")
    return validate(WorkflowConfig, _read_table(path, "workflow config"), str(path))


def load_population(path: str | Path) -> PopulationConfig:
    """A population-model file (TOML or JSON)."""
    path = Path(path)
    return validate(PopulationConfig, _read_table(path, "population model file"), str(path))


def reference_table() -> str:
    """Markdown table of every configuration key (file, table, key, type, default, meaning) for the README."""
    rows = ["| file | table | key | type | default | meaning |", "|---|---|---|---|---|---|"]

    def walk(cls: type[BaseModel], file: str, table: str) -> None:
        for name, field in cls.model_fields.items():
            sub = _section_class(field.annotation)
            if file == "workflow" and name == "population":
                rows.append(f"| workflow | (top) | `[population]` | table | none | {field.description} (the population "
                            "file's keys below) |")
                continue
            if sub is not None and name != "covariate_definitions":
                walk(sub, file, f"{table}.{name}" if table else name)
                continue
            if field.is_required():
                default = "(required)"
            elif field.default_factory is not None:
                default = repr(field.default_factory()) if not isinstance(field.default_factory(), BaseModel) else ""
            else:
                default = "none" if field.default is None else repr(field.default)
            rows.append(f"| {file} | {table or '(top)'} | `{name}` | {_type_name(field.annotation)} | {default} | "
                        f"{(field.description or '').replace('|', '/')} |")

    walk(WorkflowConfig, "workflow", "")
    walk(PopulationConfig, "population", "")
    walk(CovariateDefinition, "population", "covariate_definitions.<name>")
    return "\n".join(rows)


def update_readme_reference(readme: str | Path) -> bool:
    """Rewrite the block between ``<!-- config-reference:start -->`` and ``<!-- config-reference:end -->`` of the
    README with :func:`reference_table`; returns whether it changed."""
    path = Path(readme)
    text = path.read_text()
    start, end = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
    if start not in text or end not in text:
        raise ConfigError(f"{path}: no {start} ... {end} block")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    new = f"{head}{start}\n{reference_table()}\n{end}{tail}"
    if new != text:
        path.write_text(new)
    return new != text


def _section_class(annotation: Any) -> type[BaseModel] | None:
    import typing

    for c in [annotation, *typing.get_args(annotation)]:
        if isinstance(c, type) and issubclass(c, BaseModel):
            return c
    return None


def _type_name(annotation: Any) -> str:
    """A readable type: ``int``, ``list of str``, ``"a" or "b"``, ``table of float``, ..."""
    import types
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is typing.Literal:
        return " or ".join(f'"{a}"' for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None)) + (
            " or none" if type(None) in args else "")
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return f"table of {_type_name(args[1])}"
    if annotation is Any:
        return "any"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "table"
    return getattr(annotation, "__name__", str(annotation))
