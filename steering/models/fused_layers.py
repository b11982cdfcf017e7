"""A lean forward for the decoder layers of an int8 model: the same arithmetic in fewer operations.

On a 2-core CPU a decode step of the embedded model (B = 1) is memory-bound in its int8 matmuls
(~28 ms for ~0.5 GB of weights) and *dispatch*-bound everywhere else: transformers' layer runs
~200 tensor operations per layer (RMSNorm as six, q/k/v as three slices of the fused matmul,
each copied, rotary embedding once for q and once for k) plus its Python wrappers, ~4,800
operations and ~15 ms per step in all. These forwards compute exactly what transformers'
`Qwen2DecoderLayer` / `LlamaDecoderLayer` compute, in this order:

    x   = rms_norm(h) · w₁                         (one call: torch's RMSNorm, same op sequence)
    qkv = W_qkv x  → heads [q; k; v]               (the fused int8 matmul, split by views)
    q,k = rope(q), rope(k)                          (once over the stacked [q; k] heads)
    a   = attention(q, cache(k), cache(v))          (the model's attention function, unchanged)
    h   = h + W_o a
    x   = rms_norm(h) · w₂
    g,u = W_gu x                                    (the fused int8 matmul, split by a view)
    h   = h + W_down (act(g) · u)

Every step is elementwise-identical to transformers' (views instead of copies, one rotary call over
q and k stacked), so the result is bit-identical — tested on tiny models against the stock layer,
prefill and batched decode, with steering hooks active. Only the *modules'* forwards are swapped,
per instance (the norms', the attention's, the MLP's), so the layer's own forward and every hook
on the layer, its attention and its MLP — the steering kernel's sites — run as before.

It applies only where it is known to be identical: Llama and Qwen2 layers whose q/k/v and
gate/up are fused int8 groups (`steering.models.precision.SharedInputInt8`); any other layer keeps
transformers' forward.
"""

from __future__ import annotations

import sys
import types

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from steering.models.precision import Int8Slice

LEAN_LAYER_CLASSES = ("Qwen2DecoderLayer", "LlamaDecoderLayer")


def use_fused_layers(model: nn.Module) -> int:
    """Give every eligible decoder layer of `model` the lean forwards; returns how many layers."""
    n = 0
    for layer in model.modules():
        if type(layer).__name__ in LEAN_LAYER_CLASSES and _fused_groups(layer) is not None:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.forward = types.MethodType(_lean_norm, norm)
            layer.self_attn.forward = types.MethodType(_lean_attention, layer.self_attn)
            layer.mlp.forward = types.MethodType(_lean_mlp, layer.mlp)
            n += 1
    return n


def _fused_groups(layer: nn.Module):
    """(the q/k/v int8 Linear, the gate/up int8 Linear) when both are fused groups, else None."""
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if attn is None or mlp is None:
        return None
    linears = []
    for module, names in ((attn, ("q_proj", "k_proj", "v_proj")), (mlp, ("gate_proj", "up_proj"))):
        group = [getattr(module, n, None) for n in names]
        if not all(isinstance(p, Int8Slice) for p in group):
            return None
        if len({id(p.group) for p in group}) != 1 or group[0].start != 0:
            return None
        if any(a.end != b.start for a, b in zip(group, group[1:])):
            return None
        if group[-1].end != group[0].group.linear.out_features:
            return None
        linears.append(group[0].group.linear)
    return tuple(linears)


def _lean_norm(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """RMSNorm (Zhang & Sennrich 2019) as torch's one call: the stock module's op sequence."""
    return F.rms_norm(x, self.weight.shape, self.weight, self.variance_epsilon)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, half-split form (Su et al. 2021; transformers' `apply_rotary_pos_emb`)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos) + (rotated * sin)


def _lean_attention(self: nn.Module, hidden_states: torch.Tensor,
                    position_embeddings: tuple[torch.Tensor, torch.Tensor],
                    attention_mask: torch.Tensor | None, cache=None, past_key_values=None,
                    **kwargs) -> tuple[torch.Tensor, None]:
    """The stock attention forward with q/k/v as views of the fused int8 matmul."""
    cache = cache if cache is not None else past_key_values
    batch, tokens, _ = hidden_states.shape
    d_head = self.head_dim
    n_q, n_kv = self.q_proj.out_features // d_head, self.k_proj.out_features // d_head
    fused = self.q_proj.group.linear
    heads = fused(hidden_states).view(batch, tokens, n_q + 2 * n_kv, d_head).transpose(1, 2)
    cos, sin = position_embeddings
    qk = _rotate(heads[:, : n_q + n_kv], cos.unsqueeze(1), sin.unsqueeze(1))
    query, key, value = qk[:, :n_q], qk[:, n_q:], heads[:, n_q + n_kv:]
    if cache is not None:
        key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(
        self.config._attn_implementation, sys.modules[type(self).__module__].eager_attention_forward)
    out, _ = attention(self, query, key, value, attention_mask, dropout=0.0, scaling=self.scaling,
                       sliding_window=getattr(self, "sliding_window", None), **kwargs)
    return self.o_proj(out.reshape(batch, tokens, -1).contiguous()), None


def _lean_mlp(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """down(act(gate x) · up x) with gate/up as views of the fused int8 matmul."""
    gate, up = self.gate_proj.group.linear(x).split(self.gate_proj.out_features, dim=-1)
    return self.down_proj(self.act_fn(gate) * up)
