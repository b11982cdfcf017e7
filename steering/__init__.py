"""Inference-time steering of chat models along refusal directions.

A small public API: load a model, extract (or load) a steering pack, build a steering row for a
method, and generate with it.
"""

__version__ = "0.1.0"

from .methods import METHODS, RowSteering, SteeringError, SteeringSpec, build_row  # noqa: E402
from .models import LoadedModel, load_model, wrap_model  # noqa: E402
from .pack import PackError, SteeringPack, load_pack  # noqa: E402

__all__ = [
    "METHODS", "LoadedModel", "PackError", "RowSteering", "SteeringError", "SteeringPack",
    "SteeringSpec", "build_row", "load_model", "load_pack", "wrap_model", "__version__",
]
