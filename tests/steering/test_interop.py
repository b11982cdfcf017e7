"""Issue 14: vectors that travel. llama.cpp control vectors (GGUF) round-trip through the `gguf`
package with llama.cpp's keys and layer numbering; ablation exported as a rank-1 PEFT LoRA adapter
gives our `ablate` logits (through peft where installed, else by merging the LoRA math here)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from steering import SteeringSpec, build_row, load_pack
from steering.interop.llamacpp import (
    export_control_vector,
    import_control_vector,
    read_control_vector,
)
from steering.interop.peft_lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PROVENANCE,
    export_ablation_lora,
)
from steering.interventions.activations import encode_chats
from steering.interventions.hooks import hooks_of
from steering.models.fingerprint import fingerprint
from steering.packs.format import PackError, SteeringPack
from testkit.archs import build_tiny
from testkit.tiny import make_tiny, make_tokenizer

gguf = pytest.importorskip("gguf")
PROMPTS = ["Write a haiku about autumn leaves.", "hi", "Explain how a bicycle works."]


def logits(lm, row=None):
    enc = encode_chats(lm, PROMPTS)
    with torch.no_grad():
        if row is None:
            return lm.model(**enc).logits
        with hooks_of(lm).rows([row] * len(PROMPTS)):
            return lm.model(**enc).logits


def write_gguf(path, tensors: dict, arch="controlvector", hint="qwen2"):
    w = gguf.GGUFWriter(str(path), arch)
    if hint:
        w.add_string(f"{arch}.model_hint", hint)
    w.add_uint32(f"{arch}.layer_count", len(tensors))
    for name, vec in tensors.items():
        w.add_tensor(name, np.asarray(vec, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---- llama.cpp ------------------------------------------------------------------------------


def test_control_vector_keys_and_numbering(tiny_pack, tmp_path):
    path = export_control_vector(tiny_pack, tmp_path / "cv.gguf", layers=[2, 3], strength=1.5)
    reader = gguf.GGUFReader(str(path))
    assert reader.get_field("general.architecture").contents() == "controlvector"
    assert reader.get_field("controlvector.model_hint").contents() == "qwen2"
    assert reader.get_field("controlvector.layer_count").contents() == 2
    names = sorted(t.name for t in reader.tensors)
    assert names == ["direction.1", "direction.2"]  # our block-input layer l is direction.(l-1)
    for t in reader.tensors:
        assert t.tensor_type == gguf.GGMLQuantizationType.F32 and len(t.shape) == 1
        layer = int(t.name.split(".")[1]) + 1
        np.testing.assert_allclose(np.array(t.data), 1.5 * tiny_pack.dim(layer).numpy(),
                                   rtol=1e-6, atol=1e-6)
    with pytest.raises(PackError, match="direction.*2 <= l"):
        export_control_vector(tiny_pack, tmp_path / "bad.gguf", layers=[1])


def test_round_trip_gives_the_same_actadd(tiny_lm, tiny_pack, tmp_path):
    path = export_control_vector(tiny_pack, tmp_path / "cv.gguf", layers=[2, 3], strength=1.5)
    pack = import_control_vector(path, tiny_lm.model, "imported")
    assert pack.methods == ["actadd"] and pack.meta["concept"]["layers"] == [2, 3]
    for layer in (2, 3):
        torch.testing.assert_close(pack.dim(layer), 1.5 * tiny_pack.dim(layer))
    ours = logits(tiny_lm, build_row(SteeringSpec("actadd", 1.5, layers=(2, 3)), tiny_pack))
    back = logits(tiny_lm, build_row(SteeringSpec("actadd", 1.0, layers=(2, 3)), pack))
    torch.testing.assert_close(back, ours, atol=1e-5, rtol=1e-5)
    assert (ours - logits(tiny_lm)).abs().max() > 1e-3
    # saved and reloaded, it is still an addition-only pack
    again = load_pack(pack.save(tmp_path / "imported"), model=tiny_lm.model)
    assert again.methods == ["actadd"]
    assert "needs 'ablate'" in again.unsupported("ablate")
    assert again.unsupported("ace") and again.unsupported("inlp_null")


def test_repeng_style_files_import(tiny_lm, tmp_path):
    """Every layer repeng writes (1 … n_layers − 1); the last one is the final norm's input."""
    d, n = tiny_lm.d_model, tiny_lm.n_layers
    g = torch.Generator().manual_seed(0)
    vecs = {f"direction.{i}": torch.randn(d, generator=g).numpy() for i in range(1, n)}
    path = write_gguf(tmp_path / "repeng.gguf", vecs)
    pack = import_control_vector(path, tiny_lm.model, "rp", scale=0.5)
    assert pack.meta["concept"]["layers"] == list(range(2, n))
    assert pack.meta["concept"]["dropped_llamacpp_layers"] == [n - 1]
    torch.testing.assert_close(pack.dim(2), 0.5 * torch.from_numpy(vecs["direction.1"]))


@pytest.mark.parametrize("tensors, kwargs, match", [
    ({"direction.0": np.zeros(64)}, {}, "N >= 1"),
    ({"direction.1": np.zeros(8)}, {}, "hidden size"),
    ({"direction.1": np.zeros((2, 32))}, {}, "1-D"),
    ({"direction.1": np.zeros(64)}, {"hint": "llama"}, "model type 'llama'"),
    ({"direction.1": np.zeros(64)}, {"arch": "qwen2"}, "not a control vector"),
    ({"direction.9": np.zeros(64)}, {}, "no direction lands"),
])
def test_bad_control_vectors_are_refused(tiny_lm, tmp_path, tensors, kwargs, match):
    path = write_gguf(tmp_path / "x.gguf", tensors, **kwargs)
    with pytest.raises(PackError, match=match):
        import_control_vector(path, tiny_lm.model, "x")


def test_not_a_gguf_is_refused(tiny_lm, tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"GGUF" + b"\x00" * 10)
    with pytest.raises(PackError, match="not a GGUF"):
        read_control_vector(tmp_path / "x.gguf")


def test_llama_cpp_applies_the_exported_vector_like_actadd(tmp_path):
    """Optional (llama-cpp-python installed): llama.cpp with our exported control vector, fed the
    same tokens, gives our actadd logits — the layer numbering checked end to end."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from testkit.tiny_gguf import write_qwen2_gguf

    tok = make_tokenizer()
    lm = build_tiny("qwen2", tok, n_layers=4, tie=False)
    pack = _random_pack(lm)
    model_path = write_qwen2_gguf(lm.model, tmp_path / "tiny.gguf", tokenizer=tok)
    cv = export_control_vector(pack, tmp_path / "cv.gguf", layers=[2, 3], strength=0.5)
    directions, _ = read_control_vector(cv)
    n = lm.n_layers
    buffer = np.zeros(lm.d_model * n, dtype=np.float32)  # llama.cpp's: layer 1 at offset 0
    for index, vec in directions.items():
        buffer[(index - 1) * lm.d_model: index * lm.d_model] = vec.numpy()
    llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=64, logits_all=True, verbose=False)
    apply = getattr(llama_cpp, "llama_apply_adapter_cvec", None) or \
        llama_cpp.llama_control_vector_apply
    data = buffer.ctypes.data_as(llama_cpp.ctypes.POINTER(llama_cpp.ctypes.c_float))
    assert apply(llm.ctx, data, buffer.size, lm.d_model, 1, n - 1) == 0
    ids = tok("Write a haiku about autumn leaves.")["input_ids"]
    llm.reset()
    llm.eval(ids)
    got = torch.tensor(np.array(llm.scores[:len(ids)]))
    with torch.no_grad(), hooks_of(lm).rows([build_row(SteeringSpec("actadd", 0.5, layers=(2, 3)),
                                                   pack)]):
        want = lm.model(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)


# ---- PEFT LoRA --------------------------------------------------------------------------------


def merge_lora(model, tensors: dict, config: dict) -> None:
    """W ← W + B·A·(alpha/r) for each adapter pair (PEFT's merge), done by hand."""
    scale = config["lora_alpha"] / config["r"]
    prefix = "base_model.model."
    for key in [k for k in tensors if k.endswith("lora_A.weight")]:
        path = key[len(prefix):-len(".lora_A.weight")]
        module = model.get_submodule(path)
        b = tensors[key.replace("lora_A", "lora_B")]
        module.weight.data += (b @ tensors[key]) * scale
    for key in [k for k in tensors if k.endswith("lora_embedding_A")]:
        path = key[len(prefix):-len(".lora_embedding_A")]
        module = model.get_submodule(path)
        b = tensors[key.replace("lora_embedding_A", "lora_embedding_B")]
        module.weight.data += (b @ tensors[key]).T * scale


def _random_pack(lm) -> SteeringPack:
    g = torch.Generator().manual_seed(1)
    shape = (lm.n_layers, 1, lm.d_model)
    return SteeringPack("rand", torch.randn(shape, generator=g), torch.zeros(shape),
                        positions=[-1], layer=1, position=-1)


@pytest.mark.parametrize("kind, tie", [("qwen2", True), ("qwen2", False), ("llama", False)])
def test_lora_merged_by_hand_equals_ablate(tmp_path, kind, tie):
    lm = build_tiny(kind, make_tokenizer(), tie=tie)
    pack = _random_pack(lm)
    want = logits(lm, build_row(SteeringSpec("ablate", 1.0), pack))
    out = export_ablation_lora(lm, pack, tmp_path / "adapter")
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    tensors = load_file(str(out / ADAPTER_WEIGHTS))
    assert config["r"] == 1 and config["peft_type"] == "LORA"
    assert set(config["target_modules"]) == {"o_proj", "down_proj", "embed_tokens"}
    assert "steering" not in config  # PEFT's own keys only
    assert json.loads((out / PROVENANCE).read_text())["tied_embeddings"] is tie
    assert len(tensors) == 4 * lm.n_layers + 2
    if tie:  # untie first, as docs/packs.md says: the unembedding stays the base matrix
        head = lm.model.get_output_embeddings()
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
    merge_lora(lm.model, tensors, config)
    torch.testing.assert_close(logits(lm), want, atol=1e-4, rtol=1e-4)


def test_peft_applies_the_adapter_like_ablate(tmp_path):
    peft = pytest.importorskip("peft")
    lm = build_tiny("qwen2", make_tokenizer(), tie=True)
    pack = _random_pack(lm)
    want = logits(lm, build_row(SteeringSpec("ablate", 1.0), pack))
    plain = logits(lm)
    out = export_ablation_lora(lm, pack, tmp_path / "adapter")
    hooks_of(lm).remove()  # peft wraps the modules; compare plain forwards of the peft model
    model = peft.PeftModel.from_pretrained(lm.model, str(out))
    enc = encode_chats(lm, PROMPTS)
    with torch.no_grad():
        got = model(**enc).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (got - plain).abs().max() > 1e-3


def test_lora_refuses_packs_and_models_it_cannot_express(tmp_path, tiny_lm):
    add_only = _random_pack(tiny_lm)
    add_only.meta = {"vectors": {"dim": {"tensors": ["mean_harmful"], "operations": ["add"]}}}
    with pytest.raises(PackError, match="needs 'ablate'"):
        export_ablation_lora(tiny_lm, add_only, tmp_path / "a")
    gpt2 = build_tiny("gpt2", make_tokenizer())
    with pytest.raises(PackError, match="not plain"):
        export_ablation_lora(gpt2, _random_pack(gpt2), tmp_path / "b")
    assert make_tiny  # the shared tiny factory stays importable here


# ---- orthogonalized GGUF ---------------------------------------------------------------------


@pytest.mark.parametrize("tie", [True, False])
def test_orthogonalized_gguf_equals_ablate(tmp_path, tie):
    from transformers import AutoModelForCausalLM

    from steering.interop.gguf_model import orthogonalize_gguf
    from testkit.tiny_gguf import write_qwen2_gguf

    lm = build_tiny("qwen2", make_tokenizer(), tie=tie)
    pack = _random_pack(lm)
    want = logits(lm, build_row(SteeringSpec("ablate", 1.0), pack))
    base = write_qwen2_gguf(lm.model, tmp_path / "base.gguf")
    out = orthogonalize_gguf(base, pack.dim(), tmp_path / "out" / "model.gguf")
    reader = gguf.GGUFReader(str(out))
    before = {t.name: t for t in gguf.GGUFReader(str(base)).tensors}
    after = {t.name: t for t in reader.tensors}
    assert "output.weight" in after  # the unembedding stays the unedited matrix
    np.testing.assert_array_equal(after["output.weight"].data,
                                  (before.get("output.weight") or before["token_embd.weight"]).data)
    for name in ("blk.0.attn_q.weight", "output_norm.weight"):
        np.testing.assert_array_equal(after[name].data, before[name].data)
    assert reader.get_field("qwen2.block_count").contents() == lm.n_layers
    model = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name,
                                                 dtype=torch.float32).eval()
    enc = encode_chats(lm, PROMPTS)
    with torch.no_grad():
        got = model(**enc).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_orthogonalized_gguf_refuses_other_architectures(tmp_path):
    from steering.interop.gguf_model import orthogonalize_gguf

    path = write_gguf(tmp_path / "cv.gguf", {"direction.1": np.zeros(64)})
    with pytest.raises(ValueError, match="architecture 'controlvector'"):
        orthogonalize_gguf(path, torch.ones(64), tmp_path / "o.gguf")


def test_orthogonalize_command_writes_the_gguf(tmp_path, capsys):
    from server.cli import main
    from testkit.tiny_gguf import write_qwen2_gguf

    lm = build_tiny("qwen2", make_tokenizer(), tie=True)
    folder = tmp_path / "model"
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    pack = _random_pack(lm)
    pack.meta = {"fingerprint": fingerprint(lm.model)}
    pack.save(tmp_path / "rand")
    base = write_qwen2_gguf(lm.model, tmp_path / "base.gguf")
    args = ["orthogonalize", "--model", str(folder), "--pack", str(tmp_path / "rand"),
            "--out", str(tmp_path / "ortho")]
    assert main([*args, "--gguf", str(tmp_path / "o.gguf")]) == 2  # no GGUF to edit
    assert "--gguf-base" in capsys.readouterr().err
    assert main([*args, "--gguf", str(tmp_path / "o.gguf"), "--gguf-base", str(base)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["gguf"] == str(tmp_path / "o.gguf")
    r_hat = pack.dim() / pack.dim().norm()
    emb = {t.name: t for t in gguf.GGUFReader(report["gguf"]).tensors}["token_embd.weight"]
    assert np.abs(np.asarray(emb.data) @ r_hat.numpy()).max() < 1e-5
