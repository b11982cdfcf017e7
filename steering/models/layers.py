"""Where the residual stream lives in each decoder family: one table, no per-model code paths.

Each entry names (as attribute paths from the *CausalLM* object) the list of decoder blocks, the
final norm, the token embedding, and — inside one block — the two modules whose outputs are added
to the residual stream ("writers"). Directional ablation (Arditi et al. 2024, §2.4) edits the block
inputs and both writers' outputs; weight orthogonalization edits the writers' weights.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn


@dataclass(frozen=True)
class Architecture:
    blocks: str
    final_norm: str
    embedding: str
    attn_writer: str
    mlp_writer: str
    # Names of the linear layers (inside the writer) whose output rows live in the residual
    # stream; None where the writer ends with a norm (Gemma2/3), so weights cannot be
    # orthogonalized exactly.
    attn_out_proj: str | None
    mlp_out_proj: str | None
    # Other modules (from the CausalLM) that write into the residual stream, e.g. GPT-2's
    # learned position embedding.
    extra_writers: tuple[str, ...] = ()


_LLAMA_LIKE = Architecture(
    blocks="model.layers",
    final_norm="model.norm",
    embedding="model.embed_tokens",
    attn_writer="self_attn",
    mlp_writer="mlp",
    attn_out_proj="self_attn.o_proj",
    mlp_out_proj="mlp.down_proj",
)
# Gemma 2/3 end each sub-block with a norm, which is then what writes into the stream.
_GEMMA2_LIKE = replace(
    _LLAMA_LIKE,
    attn_writer="post_attention_layernorm",
    mlp_writer="post_feedforward_layernorm",
    attn_out_proj=None,
    mlp_out_proj=None,
)

ARCHITECTURES: dict[str, Architecture] = {
    "llama": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _GEMMA2_LIKE,
    "gemma3_text": _GEMMA2_LIKE,
    "phi3": _LLAMA_LIKE,
    "gpt2": Architecture(blocks="transformer.h", final_norm="transformer.ln_f",
                         embedding="transformer.wte", attn_writer="attn", mlp_writer="mlp",
                         attn_out_proj="attn.c_proj", mlp_out_proj="mlp.c_proj",
                         extra_writers=("transformer.wpe",)),
}


class UnsupportedArchitecture(ValueError):
    pass


def architecture_of(model: nn.Module) -> Architecture:
    model_type = getattr(model.config, "model_type", None)
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedArchitecture(
            f"model_type {model_type!r} is not in the layer table (known: {known})"
        ) from None


def get_path(root: nn.Module, path: str) -> nn.Module:
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass
class ResidualLayout:
    """The modules of one loaded model that steering hooks attach to."""

    arch: Architecture
    blocks: nn.ModuleList
    final_norm: nn.Module
    embedding: nn.Module

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    def attn_writer(self, layer: int) -> nn.Module:
        return get_path(self.blocks[layer], self.arch.attn_writer)

    def mlp_writer(self, layer: int) -> nn.Module:
        return get_path(self.blocks[layer], self.arch.mlp_writer)


def discover(model: nn.Module) -> ResidualLayout:
    arch = architecture_of(model)
    return ResidualLayout(
        arch=arch,
        blocks=get_path(model, arch.blocks),
        final_norm=get_path(model, arch.final_norm),
        embedding=get_path(model, arch.embedding),
    )


def hidden_size(model: nn.Module) -> int:
    config = model.config
    return int(getattr(config, "hidden_size", None) or config.n_embd)


def first_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
