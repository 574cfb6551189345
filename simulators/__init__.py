"""Individual models (numba-jitted simulators), one module each, and the shared numba ODE/SDE solvers."""

from __future__ import annotations

import importlib

from amortized_nlme.model import IndividualModel

#: model name -> "module:class" providing it
MODELS: dict[str, str] = {
    "mrna_simple": "simulators.mrna_simple:MrnaSimple",
    "mrna_detailed": "simulators.mrna_detailed:MrnaDetailed",
    "mrna_sde": "simulators.mrna_sde:MrnaSDE",
    "pk_oral_1cmt": "simulators.pk_oral_1cmt:PkOral1Cmt",
    "pk_oral_1cmt_combined": "simulators.pk_oral_1cmt:PkOral1CmtCombined",
}


def get_model(name: str, **options) -> IndividualModel:
    """Instantiate the individual model called ``name`` (``options`` go to its constructor)."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; available: {', '.join(sorted(MODELS))}")
    module_name, class_name = MODELS[name].split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(**options)
