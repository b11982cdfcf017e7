"""Steering inside vLLM's engine, as a vLLM plugin (no fork, no patch of vLLM's files).

What runs in vLLM's processes (the plugin is loaded by vLLM in every one of them: the front end,
the engine core and each tensor-parallel worker):

| module | job |
|---|---|
| `plugin` | the `vllm.general_plugins` entry point: version check, custom ops, model classes, runner hook |
| `ops` | two custom ops that apply a step's edits to the residual stream, opaque to torch.compile |
| `layers` | decoder layers with the ops at the native engine's three sites (block input, attention and MLP outputs) |
| `runner` | a wrapper of the model runner's forward that builds the step's plan from the scheduled requests |
| `plan` | per-step plan: which flat tokens each site edits, with what per-token kernel parameters |
| `packs` | the steering packs a worker resolves requests against (named by an environment variable) |
| `wire` | a request's steering as it rides in `SamplingParams.extra_args`, and its prefix-cache salt |
| `graphs` | on CUDA: piecewise CUDA graphs split at the steering ops (a captured op would not steer) |

The edit itself is `steering.interventions.kernel.apply_edit`, the native engine's kernel, applied
to the scheduled tokens as rows (one token per row, its request's parameters gathered per token).
"""

from __future__ import annotations

SUPPORTED_VLLM = ("0.32.",)  # release prefixes whose model runner and Qwen2/Llama layers we wrap


class UnsupportedVllm(RuntimeError):
    """The installed vLLM is not a version this plugin wraps."""


def check_version(version: str | None = None) -> str:
    """The installed vLLM version, or `UnsupportedVllm` naming the supported ones."""
    if version is None:
        import vllm

        version = vllm.__version__
    if not version.startswith(SUPPORTED_VLLM):
        raise UnsupportedVllm(
            f"steering's vLLM plugin supports vLLM {', '.join(v + 'x' for v in SUPPORTED_VLLM)}; "
            f"vLLM {version} is installed (pin a supported release, or set VLLM_PLUGINS to "
            "leave the plugin out)")
    return version
