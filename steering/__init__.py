"""Inference-time steering of chat models along refusal directions.

A small public API: load a model, extract (or load) a steering pack, build a steering row for a
method, and generate with it. Names are imported on first use, so `import steering` (and the
`steer` command's parser) does not pay for torch.

    catalog.py      one record per method (what it is, its effect, its defaults)
    models/         loading a model (hub id, folder, GGUF, the embedded default), its layer table
    interventions/  the one kernel, the method table (with token targeting, lists and
                    conditions), hooks, steered forwards and generation
    packs/          the pack format (data only)
    extraction/     extraction (DiM, ACE, INLP), selection, the pack cache
    evaluation/     refusal judging, the evaluation grid, geometry
    reports/        the claims report, the precision gate
    data/           the shipped prompt sets and their loader
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "METHODS": "steering.catalog",
    "ComposedSteering": "steering.interventions.methods",
    "Condition": "steering.interventions.spec",
    "RowSteering": "steering.interventions.methods",
    "SteeringError": "steering.interventions.methods",
    "SteeringSpec": "steering.interventions.methods",
    "build_row": "steering.interventions.methods",
    "compose": "steering.interventions.methods",
    "resolve_conditions": "steering.interventions.conditions",
    "generate": "steering.interventions.generate",
    "LoadedModel": "steering.models.loading",
    "load_model": "steering.models.loading",
    "wrap_model": "steering.models.loading",
    "PackError": "steering.packs.format",
    "SteeringPack": "steering.packs.format",
    "load_pack": "steering.packs.format",
    "ensure_pack": "steering.extraction.store",
    "Activations": "steering.interventions.capture",
    "capture": "steering.interventions.capture",
    "Monitor": "steering.interventions.monitors",
    "monitor_of": "steering.interventions.monitors",
    "inspect_pack": "steering.interventions.inspection",
    "vector_pack": "steering.interventions.raw",
    "ExtractionJob": "steering.extraction.jobs",
}

__all__ = [
    "METHODS", "Activations", "ComposedSteering", "Condition", "ExtractionJob", "LoadedModel",
    "Monitor", "PackError", "RowSteering", "SteeringError", "SteeringPack", "SteeringSpec",
    "build_row", "capture", "compose", "ensure_pack", "generate", "inspect_pack", "load_model",
    "load_pack", "monitor_of", "resolve_conditions", "vector_pack", "wrap_model", "__version__",
]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from steering.catalog import METHODS
    from steering.extraction.jobs import ExtractionJob
    from steering.extraction.store import ensure_pack
    from steering.interventions.capture import Activations, capture
    from steering.interventions.conditions import resolve_conditions
    from steering.interventions.generate import generate
    from steering.interventions.inspection import inspect_pack
    from steering.interventions.methods import (
        ComposedSteering,
        Condition,
        RowSteering,
        SteeringError,
        SteeringSpec,
        build_row,
        compose,
    )
    from steering.interventions.monitors import Monitor, monitor_of
    from steering.interventions.raw import vector_pack
    from steering.models.loading import LoadedModel, load_model, wrap_model
    from steering.packs.format import PackError, SteeringPack, load_pack


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'steering' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
