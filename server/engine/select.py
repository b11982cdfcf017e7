"""Which engine serves: `steer serve --engine auto|native|vllm` (`STEER_ENGINE`).

`auto` is vLLM where it is importable (a supported release) and a CUDA device is present, the
native engine otherwise: on CPUs the native engine is the faster one (docs/engine.md).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
ENGINES = ("auto", "native", "vllm")


def vllm_available() -> str | None:
    """None when a supported vLLM is importable, else why not."""
    try:
        from steering.vllm import check_version

        check_version()
    except ImportError:
        return "vLLM is not installed (pip install 'steering-server[vllm]')"
    except RuntimeError as exc:
        return str(exc)
    return None


def choose(setting: str) -> str:
    if setting not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {setting!r}")
    if setting != "auto":
        if setting == "vllm" and (why := vllm_available()):
            raise RuntimeError(f"--engine vllm: {why}")
        return setting
    import torch

    return "vllm" if torch.cuda.is_available() and vllm_available() is None else "native"


def model_path(model: str) -> str:
    """What vLLM loads for the server's `--model`: the embedded model's checkpoint folder, or
    the folder / hub id as given."""
    if model == "embedded":
        from steering.models.embedded import embedded_model_dir

        return str(embedded_model_dir())
    if model.endswith(".gguf"):
        raise RuntimeError("--engine vllm serves checkpoint folders and hub ids, not .gguf files")
    return model


def write_packs(packs: dict[str, Any], folder: str | None = None) -> dict[str, str]:
    """Save the server's packs where vLLM's workers can load them: {name: path}. Across
    machines `folder` must be a path every node mounts (default: a local temporary folder)."""
    if folder is None:
        folder = tempfile.mkdtemp(prefix="steer-vllm-packs-")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return {name: str(pack.save(folder / name)) for name, pack in packs.items()}


def tune_threads(setting: bool | None, precision: str) -> bool:
    """`STEER_TUNE_THREADS`, its default resolved: on at int8, where fbgemm's integer GEMMs make
    a step's result independent of the thread count (batched = solo holds while the tuner
    switches: tests/real/test_server_real_batching.py), off at float precisions."""
    return setting if setting is not None else precision == "int8"


def build(state: Any) -> Any:
    """The engine `state.settings` asks for, over `state.lm` and `state.packs`."""
    s = state.settings
    kind = choose(getattr(s, "engine", "native"))
    if kind == "native":
        from server.engine.core import Engine

        return Engine(state.lm, max_batch=s.max_batch, max_queue=s.max_queue,
                      request_timeout_s=s.request_timeout_s, prefix_cache=s.prefix_cache,
                      tune_threads=tune_threads(s.tune_threads, state.lm.precision),
                      max_queue_per_tenant=s.max_queue_per_key or max(1, s.max_queue // 2))
    from server.engine.vllm_engine import VllmEngine

    log.info("engine: vLLM (tensor parallel %d, %s)", s.tensor_parallel_size,
             "eager" if s.vllm_enforce_eager else "compiled")
    dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(
        state.lm.precision, "auto")
    engine_args: dict[str, Any] = {"pipeline_parallel_size": s.pipeline_parallel_size}
    if s.vllm_distributed_backend is not None:
        engine_args["distributed_executor_backend"] = s.vllm_distributed_backend
    return VllmEngine(state.lm, model_path(s.model), write_packs(state.packs, s.vllm_pack_dir),
                      max_batch=s.max_batch, max_queue=s.max_queue,
                      request_timeout_s=s.request_timeout_s, dtype=dtype,
                      enforce_eager=s.vllm_enforce_eager,
                      tensor_parallel_size=s.tensor_parallel_size, engine_args=engine_args)
