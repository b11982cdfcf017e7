"""vLLM compilation settings that keep the steering ops out of CUDA graphs (GPU only).

A CUDA graph replays the kernels recorded at capture time; an op's Python body does not run on
replay. The steering ops (`steering.vllm.ops`) decide on the host, per step, which tokens to edit
and with what parameters, so a graph that captured them would replay the capture run's plan (no
steering at all: capture runs carry none) for every later step — silently. vLLM 0.32's default on
CUDA (`FULL_AND_PIECEWISE`) captures whole decode steps, so with the plugin the engine must use
piecewise graphs and split them at the steering ops, as it already splits them at attention: the
pieces between the ops are still captured and replayed, the ops run eagerly between them.

Not measured on a GPU yet (none was available to this project's sessions): docs/engine.md.
"""

from __future__ import annotations

from typing import Any

STEERING_OPS = ("steering_vllm::steer_write_", "steering_vllm::steer_stream_")
KV_UPDATE_OPS = ("vllm::unified_kv_cache_update", "vllm::unified_mla_kv_cache_update")


def compilation_config() -> dict[str, Any]:
    """`compilation_config` for `AsyncEngineArgs`/`LLM` on CUDA with the plugin: piecewise CUDA
    graphs split at vLLM's own attention ops (its default list) and at the steering ops."""
    from vllm.config import CompilationConfig

    attention = list(CompilationConfig._attention_ops)  # vLLM's default splitting ops
    return {"cudagraph_mode": "PIECEWISE",
            "splitting_ops": [*attention, *KV_UPDATE_OPS, *STEERING_OPS]}
