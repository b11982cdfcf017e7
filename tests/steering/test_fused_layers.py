"""The lean int8 decoder-layer forward computes exactly what transformers' layer computes."""

from __future__ import annotations

import pytest
import torch

from server.engine.attention import use_row_exact_attention
from server.engine.kv import new_cache
from steering import SteeringSpec, build_row
from steering.interventions.hooks import hooks_of
from steering.models.fused_layers import _lean_attention, use_fused_layers
from testkit.tiny import make_tiny


def _layers(lm):
    return list(lm.layout.blocks)


def _swapped(layer):
    return (layer.input_layernorm, layer.post_attention_layernorm, layer.self_attn, layer.mlp)


def _stock(lm):
    """Undo the lean forwards (back to the classes' own)."""
    for layer in _layers(lm):
        for module in _swapped(layer):
            module.__dict__.pop("forward", None)


def _lean(lm):
    _stock(lm)
    assert use_fused_layers(lm.model) == len(_layers(lm))


def _run(lm, ids, mask, steps=4):
    """Prefill a left-padded batch, then `steps` greedy decode steps: every step's logits."""
    cache = new_cache()
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.inference_mode():
        out = lm.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                       use_cache=True)
        logits = [out.logits]
        tok = out.logits[:, -1].argmax(-1)
        for _ in range(steps):
            mask = torch.cat([mask, torch.ones(len(ids), 1, dtype=mask.dtype)], 1)
            positions = positions[:, -1:] + 1
            out = lm.model(input_ids=tok[:, None], attention_mask=mask, position_ids=positions,
                           cache=cache, use_cache=True)
            logits.append(out.logits)
            tok = out.logits[:, -1].argmax(-1)
    return logits


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_lean_layer_is_bit_identical_to_the_stock_layer(kind, tiny_pack):
    lm = make_tiny(kind, precision="int8")
    use_row_exact_attention(lm.model)
    assert use_fused_layers(lm.model) == len(_layers(lm))  # int8: every layer is eligible
    ids = torch.randint(5, len(lm.tokenizer) - 5, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[2, :2] = 0
    rows = [build_row(SteeringSpec(m, 1.0), tiny_pack) for m in ("ablate", "actadd", "inlp_flip")]
    for steering in (None, rows):
        hooks_of(lm).set_rows(steering, [9, 5, 7] if steering else None)
        try:
            _stock(lm)
            stock = _run(lm, ids, mask)
            _lean(lm)
            lean = _run(lm, ids, mask)
        finally:
            hooks_of(lm).set_rows(None)
        for a, b in zip(stock, lean, strict=True):
            assert torch.equal(a, b)


def test_lean_layer_leaves_float_models_alone():
    lm = make_tiny("qwen2")  # fp32: q/k/v are plain Linears
    assert use_fused_layers(lm.model) == 0
    assert all("forward" not in m.__dict__ for layer in _layers(lm) for m in _swapped(layer))


def test_loaded_int8_models_use_the_lean_layer():
    lm = make_tiny("qwen2", precision="int8")
    assert all(layer.self_attn.forward.__func__ is _lean_attention for layer in _layers(lm))
