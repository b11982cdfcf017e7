"""The default CPU precision (auto → int8) on the embedded model still steers, with the same pack.

Refusal score: log-odds of the refusal tokens at the first answer position (as test_real_core).
"""

from __future__ import annotations

import pytest

from steering import SteeringSpec, build_row
from steering.data.prompts import load_instructions
from steering.evaluation.refusal import refusal_score, refusal_token_ids
from steering.interventions.activations import last_logits
from steering.interventions.hooks import hooks_of

pytestmark = pytest.mark.real

N_PROMPTS = 8
MARGIN = 0.25  # nats of mean log-odds, as test_real_core


@pytest.fixture(scope="module")
def int8_lm(real_lm):  # real_lm first: the cache is built and the fp32 pack comes from it
    from steering import load_model

    lm = load_model("embedded", device="cpu", precision="auto")
    assert lm.precision == "int8"
    return lm


def _score(lm, pack, prompts, spec=None) -> float:
    row = build_row(spec, pack) if spec is not None else None
    logits = last_logits(lm, prompts, hooks_of(lm), row, batch_size=N_PROMPTS)
    return float(refusal_score(logits, refusal_token_ids(lm.tokenizer)).mean())


def test_int8_default_still_steers(int8_lm, real_pack):
    harmful = load_instructions("harmful_val")[:N_PROMPTS]
    harmless = load_instructions("harmless_val")[:N_PROMPTS]
    base_harmful = _score(int8_lm, real_pack, harmful)
    base_harmless = _score(int8_lm, real_pack, harmless)
    assert base_harmful > base_harmless  # the quantized model still tells them apart
    assert _score(int8_lm, real_pack, harmful, SteeringSpec("ablate", 1.0)) \
        < base_harmful - MARGIN
    assert _score(int8_lm, real_pack, harmless, SteeringSpec("actadd", 1.0)) \
        > base_harmless + MARGIN


def test_int8_cache_rebuilds_the_same_model_without_fp32_weights(int8_lm, monkeypatch):
    """The int8 default loads from its on-disk cache (written by the first int8 load) without
    touching the fp32 checkpoint, and computes exactly what the converted model computes."""
    import torch
    from transformers import AutoModelForCausalLM

    from steering import load_model
    from steering.models import embedded
    from steering.models.int8_cache import cache_path

    assert cache_path(embedded.embedded_model_dir(), embedded.cache_root()).is_file()

    def no_checkpoint(*args, **kwargs):
        raise AssertionError("the fp32 checkpoint was loaded although the int8 cache exists")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_checkpoint)
    again = load_model("embedded", device="cpu", precision="auto")
    ids = int8_lm.tokenizer(["Write a haiku about the sea."], return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        assert torch.equal(int8_lm.model(input_ids=ids).logits, again.model(input_ids=ids).logits)
