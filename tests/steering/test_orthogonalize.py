"""Weight orthogonalization: the exported folder is a plain transformers model whose logits equal
the ablate-steered original's."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from steering import SteeringSpec, build_row
from steering.interventions.activations import encode_chats
from steering.interventions.hooks import hooks_of
from steering.interventions.orthogonalize import export_orthogonalized, orthogonalize
from steering.packs.format import SteeringPack
from testkit.archs import build_tiny
from testkit.tiny import make_tiny, make_tokenizer

PROMPTS = ["How do I make a bomb at home?", "Write a haiku about autumn leaves.", "hi",
           "Explain how to pick a lock without the key, step by step."]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def random_pack(lm, seed: int = 0) -> SteeringPack:
    g = torch.Generator().manual_seed(seed)
    shape = (lm.n_layers, 1, lm.d_model)
    return SteeringPack(name="rand", mean_harmful=torch.randn(shape, generator=g),
                        mean_harmless=torch.randn(shape, generator=g) * 0.1,
                        positions=[-1], layer=1, position=-1)


def steered_and_plain(lm, pack, enc):
    row = build_row(SteeringSpec("ablate", 1.0), pack)
    with torch.no_grad():
        plain = lm.model(**enc).logits
        with hooks_of(lm).rows([row] * enc["input_ids"].shape[0]):
            steered = lm.model(**enc).logits
    return steered.cpu(), plain.cpu()


def check_export(lm, pack, out_dir):
    enc = encode_chats(lm, PROMPTS)
    steered, plain = steered_and_plain(lm, pack, enc)
    enc = {k: v.cpu() for k, v in enc.items()}  # the reloaded model is on the CPU
    mask = enc["attention_mask"].bool()
    unembedding = lm.model.get_output_embeddings().weight.detach().cpu().clone()
    export_orthogonalized(lm, pack, out_dir)

    config = json.loads((out_dir / "config.json").read_text())
    assert "auto_map" not in config  # no custom code
    assert list(out_dir.glob("*.safetensors")) and not list(out_dir.glob("*.bin"))
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    assert not reloaded._forward_pre_hooks and not any(
        m._forward_pre_hooks or m._forward_hooks for m in reloaded.modules())
    with torch.no_grad():
        got = reloaded(**enc).logits
    torch.testing.assert_close(got[mask], steered[mask], atol=1e-4, rtol=1e-4)
    assert (got[mask] - plain[mask]).abs().max() > 1e-3  # the edit did something

    # Nothing writes along r̂ any more: embedding rows and the writers' output rows.
    r_hat = (pack.dim() / pack.dim().norm()).cpu()
    emb = reloaded.get_input_embeddings().weight
    assert (emb @ r_hat).abs().max() < 1e-5
    # The unembedding was not edited (with a tied embedding it is untied first).
    assert torch.equal(reloaded.get_output_embeddings().weight, unembedding)
    return reloaded


@pytest.mark.parametrize("kind, tie", [("llama", False), ("qwen2", False), ("qwen2", True),
                                       ("mistral", False), ("gemma", True), ("phi3", False),
                                       ("gpt2", True)])
def test_exported_model_equals_ablation(tokenizer, tmp_path, kind, tie):
    lm = build_tiny(kind, tokenizer, n_layers=3, tie=tie)
    assert lm.model.config.tie_word_embeddings == tie
    if tie:
        assert lm.model.get_output_embeddings().weight is lm.layout.embedding.weight
    check_export(lm, random_pack(lm), tmp_path / "out")


def test_exported_with_the_extracted_pack(tiny_pack, tmp_path):
    lm = make_tiny("qwen2")  # the same weights tiny_pack was extracted on (not the shared one)
    check_export(lm, tiny_pack, tmp_path / "out")


def test_loads_without_this_library(tiny_pack, tmp_path):
    """A separate Python that imports only transformers loads the folder and reproduces the
    ablate-steered logits, with the same tokenizer and chat template."""
    lm = make_tiny("qwen2")
    enc = encode_chats(lm, PROMPTS)
    steered, _ = steered_and_plain(lm, tiny_pack, enc)
    out = tmp_path / "model"
    export_orthogonalized(lm, tiny_pack, out)
    script = textwrap.dedent(f"""
        import sys
        import torch
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained({str(out)!r})
        tok.padding_side = "left"
        texts = [tok.apply_chat_template([{{"role": "user", "content": p}}], tokenize=False,
                                         add_generation_prompt=True) for p in {PROMPTS!r}]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        pos = (enc["attention_mask"].cumsum(-1) - 1).clamp_min(0)
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}, dtype=torch.float32).eval()
        with torch.no_grad():
            logits = model(**enc, position_ids=pos).logits
        assert not [m for m in sys.modules if m == "steering" or m.startswith("steering.")]
        save_file({{"logits": logits.contiguous(), "ids": enc["input_ids"].contiguous()}},
                  {str(tmp_path / "result.safetensors")!r})
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = load_file(str(tmp_path / "result.safetensors"))
    assert torch.equal(result["ids"], enc["input_ids"].cpu())
    mask = enc["attention_mask"].bool().cpu()
    torch.testing.assert_close(result["logits"][mask], steered[mask], atol=1e-4, rtol=1e-4)


def test_tokenizer_is_exported(tiny_pack, tmp_path):
    lm = make_tiny("qwen2")
    export_orthogonalized(lm, tiny_pack, tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok.chat_template == lm.tokenizer.chat_template
    assert tok("hello there")["input_ids"] == lm.tokenizer("hello there")["input_ids"]


def test_norm_ended_writers_are_refused(tokenizer):
    lm = build_tiny("gemma2", tokenizer, n_layers=2)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    with pytest.raises(ValueError, match="not exact"):
        orthogonalize(lm, torch.randn(lm.d_model))
    after = lm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing half-edited
