"""The default CPU precision (auto → int8) on the embedded model still steers, with the same pack.

Refusal score: log-odds of the refusal tokens at the first answer position (as test_real_core).
"""

from __future__ import annotations

import pytest

from steering import SteeringSpec, build_row
from steering.data.prompts import load_instructions
from steering.evaluation.refusal import refusal_score, refusal_token_ids
from steering.interventions.activations import last_logits

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
    logits = last_logits(lm, prompts, lm.hooks, row, batch_size=N_PROMPTS)
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
