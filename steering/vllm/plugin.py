"""The `vllm.general_plugins` entry point (pyproject.toml), run by vLLM in every process.

`register` is idempotent and cheap: it checks the vLLM version, registers the two steering ops,
wraps the model runner's forward (`steering.vllm.runner`) and registers the steered model classes
(`steering.vllm.layers`) under the architectures' own names, so a served Qwen2 or Llama checkpoint
gets the sites without any flag. A request without `extra_args["steering"]` is never touched. To
run vLLM without the plugin, leave it out with `VLLM_PLUGINS` (a list of the plugins to load).

vLLM 0.32 picks its newer model runner ("V2") on CUDA machines by default; the hook wraps the V1
runner, so the plugin asks for it (`VLLM_USE_V2_MODEL_RUNNER=0`) unless told otherwise, and refuses
an explicit request for V2.
"""

from __future__ import annotations

import logging
import os

from steering.vllm import check_version

log = logging.getLogger(__name__)
NAME = "steering"  # the entry point's name (what VLLM_PLUGINS lists)
_done = False


def register() -> None:
    global _done
    if _done:
        return
    check_version()
    v2 = os.environ.get("VLLM_USE_V2_MODEL_RUNNER")
    if v2 is None:
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    elif v2.strip().lower() in {"1", "true", "yes"}:
        raise RuntimeError("steering's vLLM plugin wraps the V1 model runner; unset "
                           "VLLM_USE_V2_MODEL_RUNNER (or set it to 0)")
    from vllm import ModelRegistry
    from vllm.platforms import current_platform

    from steering.vllm import layers, ops, runner

    ops.register(current_platform.dispatch_key)
    runner.install()
    for arch in layers.ARCHITECTURES:
        ModelRegistry.register_model(arch, f"steering.vllm.layers:Steered{arch}")
    _done = True
    log.debug("steering plugin registered (%s)", ", ".join(layers.ARCHITECTURES))
