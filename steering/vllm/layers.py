"""vLLM model classes with the steering ops at the native engine's three sites per layer.

vLLM's Qwen2 and Llama decoder layers carry the residual stream as two tensors (`hidden_states`
and `residual`, summed inside the next fused add-norm). The sites, as in
`steering.interventions.hooks`:

| site | where in vLLM's layer | op |
|---|---|---|
| (l, "input") | the stream entering layer l: the embedding (l = 0), else hidden_states + residual | steer_write_ / steer_stream_ |
| (l, "attn") | the attention block's output (after o_proj and, under tensor parallelism, its all-reduce) | steer_write_ |
| (l, "mlp") | the MLP's output (after down_proj and its all-reduce) | steer_write_ |

The model class is the architecture's own vLLM class; after it is built (before weights load and
before torch.compile traces it) each decoder layer's class is swapped, in memory, for a subclass
whose forward is the original with the three op calls: module names, weights and tensor-parallel
sharding are untouched. Each rank edits the all-reduced stream with the same parameters.
"""

from __future__ import annotations

import torch
from torch import nn

from steering.vllm.plan import site_id

# Architectures whose vLLM decoder layer has the forward below (checked against vLLM 0.32).
ARCHITECTURES = {
    "Qwen2ForCausalLM": "vllm.model_executor.models.qwen2:Qwen2ForCausalLM",
    "LlamaForCausalLM": "vllm.model_executor.models.llama:LlamaForCausalLM",
}


class _SteeredLayer:
    """Mixin: the Qwen2/Llama decoder-layer forward of vLLM 0.32 with the steering ops."""

    steering_layer: int

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        ops = torch.ops.steering_vllm
        base = site_id((self.steering_layer, "input"))  # then + 1: "attn", + 2: "mlp"
        if residual is None:
            ops.steer_write_(hidden_states, base)
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            ops.steer_stream_(hidden_states, residual, base)
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions=positions, hidden_states=hidden_states)
        ops.steer_write_(hidden_states, base + 1)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        hidden_states = self.mlp(hidden_states)
        ops.steer_write_(hidden_states, base + 2)
        return hidden_states, residual


_steered_classes: dict[type, type] = {}


def steered_layer_class(cls: type) -> type:
    if cls not in _steered_classes:
        _steered_classes[cls] = type(f"Steered{cls.__name__}", (_SteeredLayer, cls), {})
    return _steered_classes[cls]


def install_sites(model: nn.Module) -> int:
    """Swap the decoder layers of a built vLLM causal LM for their steered classes; returns the
    number of layers (the pipeline stage's missing layers are left as they are)."""
    inner = model.model
    for index, layer in enumerate(inner.layers):
        if not hasattr(layer, "input_layernorm"):  # a PPMissingLayer of another stage
            continue
        layer.__class__ = steered_layer_class(type(layer))
        layer.steering_layer = index
    return len(inner.layers)


SITES_VERSION = "steering-sites-1"  # bump when the sites' graph changes


def mark_config(vllm_config) -> None:
    """Put the plugin into the config's hash, which keys vLLM's compile caches (the AOT cache
    key holds the config's hash and the model's forward, not the layer classes): a graph
    compiled without the sites is never loaded for a steered model, nor the reverse."""
    extra = vllm_config.additional_config
    if isinstance(extra, dict):
        extra["steering_vllm"] = SITES_VERSION
    else:
        raise RuntimeError("steering's vLLM plugin needs additional_config to be a dict (it "
                           "records itself there so compile caches tell steered graphs apart)")


def steered_model_class(arch: str) -> type:
    """A subclass of vLLM's class for `arch` that installs the sites when built."""
    module_name, _, class_name = ARCHITECTURES[arch].partition(":")
    import importlib

    base = getattr(importlib.import_module(module_name), class_name)

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        mark_config(vllm_config)
        base.__init__(self, vllm_config=vllm_config, prefix=prefix)
        install_sites(self)

    return type(f"Steered{class_name}", (base,), {"__init__": __init__,
                                                  "__module__": __name__})


def __getattr__(name: str) -> type:
    """`steering.vllm.layers:SteeredQwen2ForCausalLM` etc., for vLLM's lazy model registry."""
    if name.startswith("Steered") and name[len("Steered"):] in ARCHITECTURES:
        cls = steered_model_class(name[len("Steered"):])
        globals()[name] = cls
        return cls
    raise AttributeError(name)
