"""Precision at start-up (steering.models.precision): int8 per-row kernels, resolution, plumbing.

The int8 Linear must be *row-isolated*: a row's output is bit-identical whatever else shares its
batch (that is what keeps mixed batch = solo in the engine), and close to the fp32 result.
"""

from __future__ import annotations

import copy

import pytest
import torch

from steering.interventions.hooks import hooks_of
from steering.models.loading import choose_precision
from steering.models.precision import (
    Int8Slice,
    RowInt8Linear,
    activation_ranges,
    quantize_int8,
    resolve_precision,
)
from testkit.tiny import make_tiny

CPU = torch.device("cpu")


def test_row_int8_linear_is_row_isolated_and_close_to_fp32():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    q = RowInt8Linear.from_linear(linear)
    x = torch.randn(6, 64)
    x[2] *= 100.0  # an outlier row: with one scale for the whole tensor it would swamp row 0
    batched = q(x)
    for i in range(len(x)):
        assert torch.equal(batched[i], q(x[i:i + 1])[0])
    ref = linear(x).detach()
    rel = (batched - ref).norm(dim=1) / ref.norm(dim=1)
    assert float(rel.max()) < 0.05
    # 3-d input (batch, tokens, features) keeps its shape.
    assert q(x.reshape(2, 3, 64)).shape == (2, 3, 48)


def test_fixed_grid_equals_fbgemm_dynamic_path_on_a_pinned_batch():
    """The fixed [−1, 1] grid (scale 2/127, zero point 64) is exactly the grid fbgemm's dynamic
    path measures on rows rescaled to max |x| = 1 plus a pin row [−1, 1, 0, …]."""
    torch.manual_seed(0)
    q = RowInt8Linear.from_linear(torch.nn.Linear(96, 80))
    for rows in (1, 3, 9):
        x = torch.randn(rows, 96) * torch.rand(rows, 1) * 10
        x[0, 5] = x.abs().max() * 2  # a positive maximum as well as negative ones
        amax = torch.linalg.vector_norm(x, float("inf"), dim=1, keepdim=True)
        pin = torch.zeros(1, 96)
        pin[0, 0], pin[0, 1] = -1.0, 1.0
        dynamic = torch.ops.quantized.linear_dynamic(torch.cat([x / amax, pin]), q._packed, True)
        assert torch.equal(q(x), dynamic[:-1] * amax + q.bias)


def test_stock_dynamic_quantization_is_not_row_isolated():
    """Why RowInt8Linear exists: torch.ao's dynamic Linear shares one scale across rows."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48))
    stock = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear},
                                                   dtype=torch.qint8)
    x = torch.randn(4, 64)
    x[1] *= 100.0
    assert not torch.equal(stock(x)[0], stock(x[:1])[0])


def test_quantize_int8_replaces_every_linear_and_keeps_the_logits():
    fp32 = make_tiny("qwen2")
    int8 = make_tiny("qwen2", precision="int8")
    assert int8.precision == "int8"
    assert not any(isinstance(m, torch.nn.Linear) for m in int8.model.modules())
    assert isinstance(int8.model.lm_head, RowInt8Linear)
    assert isinstance(int8.model.model.layers[0].self_attn.q_proj, Int8Slice)
    ids = fp32.tokenizer(["hello there, how are you"], return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        p = torch.log_softmax(fp32.model(input_ids=ids).logits, -1)
        q = torch.log_softmax(int8.model(input_ids=ids).logits, -1)
    kl = float((p.exp() * (p - q)).sum(-1).mean())
    assert kl < 0.01


def test_fusing_q_k_v_and_gate_up_changes_no_result():
    lm = make_tiny("qwen2")
    ranges = activation_ranges(lm.model, lm.tokenizer)
    fused, separate = copy.deepcopy(lm.model), copy.deepcopy(lm.model)
    quantize_int8(fused, act_ranges=ranges, fuse=True)
    quantize_int8(separate, act_ranges=ranges, fuse=False)
    assert isinstance(separate.model.layers[0].mlp.up_proj, RowInt8Linear)
    # Same grid per row only when the siblings share one smoothing scale: compare without it.
    fused2, separate2 = copy.deepcopy(lm.model), copy.deepcopy(lm.model)
    quantize_int8(fused2, fuse=True)
    quantize_int8(separate2, fuse=False)
    ids = lm.tokenizer(["hello there", "a longer prompt with more words"], return_tensors="pt",
                       padding=True)
    with torch.inference_mode():
        a = fused2(**ids).logits
        b = separate2(**ids).logits
        assert torch.equal(a, b)
        assert torch.isfinite(fused(**ids).logits).all()


def test_quantize_int8_can_keep_the_lm_head():
    lm = make_tiny("llama")
    n = quantize_int8(lm.model, lm_head=False)
    assert isinstance(lm.model.lm_head, torch.nn.Linear) and n == 4 * 7


def test_precision_resolution():
    assert resolve_precision("auto", CPU) == "int8"
    assert resolve_precision(None, CPU) == "int8"
    assert resolve_precision("float32", CPU) == "fp32"
    assert resolve_precision("BF16", CPU) == "bf16"
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("int3", CPU)
    with pytest.raises(ValueError, match="int4"):
        resolve_precision("int4", CPU)
    with pytest.raises(ValueError, match="int8"):
        resolve_precision("int8", torch.device("cuda"))
    # The library default stays full precision; an explicit dtype beats precision auto.
    assert choose_precision(None, None, CPU) == "fp32"
    assert choose_precision("auto", "float32", CPU) == "fp32"
    assert choose_precision("auto", "auto", CPU) == "int8"
    assert choose_precision("int8", "float32", CPU) == "int8"


def test_steering_edits_run_in_fp32_on_a_bf16_model(tiny_pack):
    from steering import SteeringSpec, build_row

    lm = make_tiny("qwen2", precision="bf16")
    assert lm.precision == "bf16" and lm.dtype == torch.bfloat16
    hooks_of(lm).set_rows([build_row(SteeringSpec("ablate", 1.0), tiny_pack)])
    try:
        edit = next(iter(hooks_of(lm)._passes.values()))[0]
        assert edit.q.dtype == torch.float32
        ids = lm.tokenizer(["hello"], return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            out = lm.model(input_ids=ids).logits
        assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    finally:
        hooks_of(lm).set_rows(None)


def test_cli_and_settings_take_a_precision(monkeypatch):
    from server.cli import build_parser
    from server.settings import Settings

    args = build_parser().parse_args(["generate", "--precision", "int8", "hi"])
    assert args.precision == "int8"
    for verb in (["eval"], ["report"], ["extract"], ["serve"]):
        assert build_parser().parse_args([*verb, "--precision", "fp32"]).precision == "fp32"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--precision", "int3", "hi"])
    monkeypatch.setenv("STEER_PRECISION", "fp32")
    assert Settings().precision == "fp32"
    monkeypatch.setenv("STEER_PRECISION", "int3")
    with pytest.raises(ValueError, match="precision"):
        Settings()


def test_int8_model_is_cached_on_disk_and_reloads_without_the_fp32_weights(tmp_path, monkeypatch):
    """Issue 11 (peak RSS): the first int8 load converts and writes the cache; the next one
    builds the model from it without loading the fp32 checkpoint — and computes the same."""
    from transformers import AutoModelForCausalLM

    from steering import load_model

    tiny = make_tiny("qwen2")
    folder = tmp_path / "ckpt"
    tiny.model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    monkeypatch.setenv("STEERING_CACHE", str(tmp_path / "cache"))
    first = load_model(str(folder), device="cpu", precision="int8")
    files = list((tmp_path / "cache" / "models").glob("ckpt.int8-*.safetensors"))
    assert len(files) == 1

    def no_checkpoint(*args, **kwargs):
        raise AssertionError("the fp32 checkpoint was loaded although the int8 cache exists")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_checkpoint)
    second = load_model(str(folder), device="cpu", precision="int8")
    ids = torch.tensor([[3, 17, 42, 99, 5, 8]])
    assert torch.equal(first.model(ids).logits, second.model(ids).logits)
    assert second.model.generation_config.eos_token_id == first.model.generation_config.eos_token_id
    assert not any(t.is_meta for t in [*second.model.parameters(), *second.model.buffers()])
    assert isinstance(second.model.model.layers[0].self_attn.k_proj, Int8Slice)

    # A torn cache file is converted again, not an error.
    files[0].write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    monkeypatch.undo()
    monkeypatch.setenv("STEERING_CACHE", str(tmp_path / "cache"))
    third = load_model(str(folder), device="cpu", precision="int8")
    assert torch.equal(first.model(ids).logits, third.model(ids).logits)


def test_int8_stores_the_embedding_table_in_fp16_and_keeps_the_stream_fp32():
    """Peak RSS (issue 11): at int8 the input embedding table is fp16 (half its memory), the
    rows it returns and the residual stream are fp32, and the table's rounding is tiny."""
    from steering.models.precision import HalfTableEmbedding

    fp32 = make_tiny("qwen2")
    int8 = make_tiny("qwen2", precision="int8")
    emb = int8.model.get_input_embeddings()
    assert isinstance(emb, HalfTableEmbedding) and emb.weight.dtype == torch.float16
    ids = torch.tensor([[3, 17, 42]])
    rows = emb(ids)
    assert rows.dtype == torch.float32 and int8.dtype == torch.float32
    reference = fp32.model.get_input_embeddings()(ids)
    assert torch.allclose(rows, reference, rtol=1e-3, atol=1e-6)
    with torch.inference_mode():
        hidden = int8.model(input_ids=ids, output_hidden_states=True).hidden_states
    assert all(h.dtype == torch.float32 for h in hidden)
