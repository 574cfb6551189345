"""The individual-model library: one module per model (numba-jitted simulators), shared numba ODE/SDE solvers and
model-family helpers. A model is registered here by one line in :data:`MODELS`."""

from __future__ import annotations

import importlib

from amortized_nlme.errors import ConfigError
from amortized_nlme.model import IndividualModel

#: model name -> "module:class" providing it
MODELS: dict[str, str] = {
    "mrna_simple": "simulators.mrna_simple:MrnaSimple",
    "mrna_detailed": "simulators.mrna_detailed:MrnaDetailed",
    "mrna_sde": "simulators.mrna_sde:MrnaSDE",
    "pk_oral_1cmt": "simulators.pk_oral_1cmt:PkOral1Cmt",
    "pk_oral_1cmt_combined": "simulators.pk_oral_1cmt:PkOral1CmtCombined",
    "pk_1cmt_iv": "simulators.pk_library:Pk1CmtIv",
    "pk_1cmt_oral": "simulators.pk_library:Pk1CmtOral",
    "pk_2cmt_iv": "simulators.pk_library:Pk2CmtIv",
    "pk_2cmt_oral": "simulators.pk_library:Pk2CmtOral",
}


def get_model(name: str, **options) -> IndividualModel:
    """Instantiate the individual model called ``name`` (``options`` go to its constructor)."""
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; available: {', '.join(sorted(MODELS))} "
                          "(`amortized-nlme models` describes them)")
    module_name, class_name = MODELS[name].split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    try:
        return cls(**options)
    except TypeError as exc:
        raise ConfigError(f"model {name!r}: bad model_options {options} ({exc})") from None
