"""Row-exact attention for the left-padded decode batch.

transformers' SDPA path picks its kernel from the call: with no mask (a request decoding alone)
grouped-query heads go through `enable_gqa`; with a padding mask (the same request in a batch)
through packed or repeated heads — other kernels, other rounding. In fp32 that moves a logit
by an ulp; at int8 an ulp can flip an activation's rounding step, and the answer drifts from
the solo one. Here each row of a batch with a padding mask attends over its own real keys
with no mask, exactly the call it gets alone:

    out_b = sdpa(q_b, K_b[:, s_b:], V_b[:, s_b:], mask=None)      s_b = row b's padding width

A batch of one, or no mask, is passed through unchanged. Used for decode steps (one query per
row); a multi-token batch with padding (not an engine call) takes the ordinary batched path.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "row_exact_sdpa"


def row_exact_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                   value: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs):
    if attention_mask is None or query.shape[0] == 1 or query.shape[2] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    keep = attention_mask[:, 0, -1, :]  # [B, kv]: True where the row's key is real
    if keep.dtype != torch.bool:
        keep = keep == 0  # an additive mask: 0 where attended
    pads = (~keep).sum(dim=-1).tolist()
    rows = [sdpa_attention_forward(module, query[b:b + 1], key[b:b + 1, :, pad:],
                                   value[b:b + 1, :, pad:], None, **kwargs)[0]
            for b, pad in enumerate(pads)]
    return torch.cat(rows), None


def use_row_exact_attention(model: torch.nn.Module) -> None:
    """Switch an SDPA model to row-exact attention (other implementations are left alone)."""
    if getattr(model.config, "_attn_implementation", None) not in ("sdpa", NAME):
        return
    AttentionInterface.register(NAME, row_exact_sdpa)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.config._attn_implementation = NAME
