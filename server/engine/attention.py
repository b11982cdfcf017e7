"""Row-exact attention for the left-padded decode batch.

transformers' SDPA path picks its kernel from the call: with no mask (a request decoding alone)
grouped-query heads go through `enable_gqa`; with a padding mask (the same request in a batch)
through packed or repeated heads — other kernels, other rounding. In fp32 that moves a logit
by an ulp; at int8 an ulp can flip an activation's rounding step, and the answer drifts from
the solo one. Here each row of a batch with a padding mask attends over its own real keys
with no mask, exactly the call it gets alone:

    out_b = sdpa(q_b, K_b[:, s_b:], V_b[:, s_b:], mask=None)      s_b = row b's padding width

For a decode step (one query per row) the per-row call is torch's SDPA made directly, with the
arguments transformers would pass for a mask-free call (enable_gqa, the layer's scale), and a
batch of one makes the same call: solo and batched rows run one code path by construction, and
the wrapper's per-call Python (≈ 8 rows × 24 layers calls a step) is skipped. Each row's padding
width is read from the mask once per forward. A prefill (several queries) goes through
transformers' `sdpa_attention_forward` as before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "row_exact_sdpa"


def row_exact_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                   value: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs):
    if query.shape[2] != 1 or not _plain_decode(module, key, value, kwargs):
        if attention_mask is None or query.shape[0] == 1 or query.shape[2] != 1:
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        return _per_row(module, query, key, value, _pads(attention_mask), **kwargs)
    # A decode step: torch's SDPA called directly, per row, with the arguments transformers'
    # `sdpa_attention_forward` passes for a mask-free call (so a batch of one is that call).
    pads = [0] * query.shape[0] if attention_mask is None else _pads(attention_mask)
    gqa = getattr(module, "num_key_value_groups", 1) > 1
    scale = kwargs.get("scaling")
    rows = [F.scaled_dot_product_attention(query[b:b + 1], key[b:b + 1, :, pad:],
                                           value[b:b + 1, :, pad:], dropout_p=0.0, scale=scale,
                                           enable_gqa=gqa)
            for b, pad in enumerate(pads)]
    out = rows[0] if len(rows) == 1 else torch.cat(rows)
    return out.transpose(1, 2).contiguous(), None


def _plain_decode(module, key: torch.Tensor, value: torch.Tensor, kwargs) -> bool:
    """The call transformers would make is plain SDPA with enable_gqa (no softcap, no position
    bias, head dims ≤ 256, not training): then it can be made directly."""
    return (not module.training and kwargs.get("softcap") is None
            and kwargs.get("position_bias") is None and not kwargs.get("dropout")
            and key.shape[-1] == value.shape[-1] <= 256)


def _per_row(module, query, key, value, pads: list[int], **kwargs):
    rows = [sdpa_attention_forward(module, query[b:b + 1], key[b:b + 1, :, pad:],
                                   value[b:b + 1, :, pad:], None, **kwargs)[0]
            for b, pad in enumerate(pads)]
    return torch.cat(rows), None


_last_pads: tuple[torch.Tensor | None, list[int]] = (None, [])


def _pads(attention_mask: torch.Tensor) -> list[int]:
    """Each row's padding width, from the forward's mask (computed once per forward: every
    layer gets the same mask object)."""
    global _last_pads
    mask, pads = _last_pads
    if mask is attention_mask:
        return pads
    keep = attention_mask[:, 0, -1, :]  # [B, kv]: True where the row's key is real
    if keep.dtype != torch.bool:
        keep = keep == 0  # an additive mask: 0 where attended
    pads = (~keep).sum(dim=-1).tolist()
    _last_pads = (attention_mask, pads)
    return pads


def use_row_exact_attention(model: torch.nn.Module) -> None:
    """Switch an SDPA model to row-exact attention (other implementations are left alone)."""
    if getattr(model.config, "_attn_implementation", None) not in ("sdpa", NAME):
        return
    AttentionInterface.register(NAME, row_exact_sdpa)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.config._attn_implementation = NAME
