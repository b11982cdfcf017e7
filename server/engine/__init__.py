"""The engine: one thread that owns the model and continuously batches requests, steering each row.

Lives here: the batching loop, per-request KV slots, sampling, incremental detokenization.
This module is the engine's public interface; the rest of the server imports only these names.
May import: torch, transformers, `steering` (models, interventions). Never `server.api`.
"""

from server.engine.core import (
    Engine,
    EngineStopped,
    GenerationRequest,
    QueueFull,
    SamplingParams,
    TokenEvent,
)
from server.engine.select import build as build_engine

__all__ = ["build_engine", "Engine", "EngineStopped", "GenerationRequest", "QueueFull", "SamplingParams",
           "TokenEvent"]
