"""Integration on the embedded model (Qwen2.5-Coder-0.5B-Instruct) with its default pack.

Refusal score: log-odds of the model's refusal tokens at the first answer position (Arditi et
al. 2024, App. B). On harmful_val prompts, `ablate` and `inlp_flip` (and ACE at strength 0) lower
its mean; on harmless_val prompts `actadd` (and ACE at strength 1) raise it. About half a minute
of CPU once the model and pack are cached.
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
MARGIN = 0.25  # nats of mean log-odds: a real effect, not noise


@pytest.fixture(scope="module")
def scorer(real_lm, real_pack):
    token_ids = refusal_token_ids(real_lm.tokenizer)

    def mean_score(prompts, spec: SteeringSpec | None = None) -> float:
        row = build_row(spec, real_pack) if spec is not None else None
        logits = last_logits(real_lm, prompts, hooks_of(real_lm), row, batch_size=N_PROMPTS)
        return float(refusal_score(logits, token_ids).mean())

    return mean_score


@pytest.fixture(scope="module")
def harmful(scorer):
    prompts = load_instructions("harmful_val")[:N_PROMPTS]
    return prompts, scorer(prompts)


@pytest.fixture(scope="module")
def harmless(scorer):
    prompts = load_instructions("harmless_val")[:N_PROMPTS]
    return prompts, scorer(prompts)


def test_pack_fits_the_model(real_lm, real_pack):
    assert real_pack.d_model == real_lm.d_model == 896
    assert real_pack.n_layers == real_lm.n_layers == 24
    assert real_pack.max_k() >= 1


@pytest.mark.parametrize("method, strength", [("ablate", 1.0), ("inlp_flip", 1.0),
                                              ("ace", 0.0)])
def test_suppressing_methods_lower_the_refusal_score(scorer, harmful, method, strength):
    prompts, base = harmful
    steered = scorer(prompts, SteeringSpec(method, strength))
    assert steered < base - MARGIN, f"{method}: {base:.3f} -> {steered:.3f}"


@pytest.mark.parametrize("method, strength", [("actadd", 1.0), ("ace", 1.0)])
def test_inducing_methods_raise_the_refusal_score(scorer, harmless, method, strength):
    prompts, base = harmless
    steered = scorer(prompts, SteeringSpec(method, strength))
    assert steered > base + MARGIN, f"{method}: {base:.3f} -> {steered:.3f}"

