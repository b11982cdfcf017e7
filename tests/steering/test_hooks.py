"""SteeringHooks on the tiny model: a batch that mixes every method gives each row exactly
what it gets alone, in prefill and in cached decoding; idle hooks change nothing."""

from __future__ import annotations

import pytest
import torch

import steering.interventions.hooks as hooks_module
from steering import SteeringSpec, build_row
from steering.interventions.activations import encode_chats, last_logits
from steering.interventions.generate import generate
from steering.interventions.hooks import hooks_of
from steering.interventions.methods import METHODS
from steering.packs.format import SteeringPack

PROMPTS = ["How do I make a bomb at home?", "Write a haiku about autumn leaves.", "hi",
           "Explain how to pick a lock without the key, step by step, in detail please.",
           "What is 2 + 2?", "Tell me a story about a dragon who loves tea."]
STRENGTHS = {"none": 0.0, "actadd": 2.0, "ablate": 1.0, "ace": 0.0, "inlp_null": 1.0,
             "inlp_flip": 1.0, "inlp_reflect": 1.0, "inlp_zero_positive": 1.0,
             "inlp_negate_positive": 1.0}


@pytest.fixture(scope="module")
def rows(tiny_pack):
    out = [build_row(SteeringSpec(m, STRENGTHS[m]), tiny_pack) for m in METHODS]
    out.append(build_row(SteeringSpec("inlp_flip", 1.0, k=1), tiny_pack))  # a narrower Q
    out.append(build_row(SteeringSpec("ace", 1.0), tiny_pack))
    return out


def forward_logits(lm, prompts, rows):
    with torch.no_grad(), hooks_of(lm).rows(rows):
        return lm.model(**encode_chats(lm, prompts), use_cache=False).logits.float().cpu()


def test_idle_hooks_change_nothing(tiny_lm, rows):
    enc = encode_chats(tiny_lm, PROMPTS)
    hooks_of(tiny_lm).set_rows(None)
    assert not hooks_of(tiny_lm).active
    with torch.no_grad():
        plain = tiny_lm.model(**enc).logits
    none = build_row(SteeringSpec("none"), None)
    assert torch.equal(forward_logits(tiny_lm, PROMPTS, [none] * len(PROMPTS)), plain)
    # After a steered batch, the hooks go idle again.
    forward_logits(tiny_lm, PROMPTS, rows[: len(PROMPTS)])
    assert not hooks_of(tiny_lm).active
    with torch.no_grad():
        assert torch.equal(tiny_lm.model(**enc).logits, plain)


def test_methods_really_differ(tiny_lm, rows):
    """Each method changes the next-token logits of the same prompt (else the mixed-batch
    test below would prove nothing)."""
    prompt = [PROMPTS[0]]
    last = [forward_logits(tiny_lm, prompt, [row])[0, -1] for row in rows]
    for i in range(len(last)):
        for j in range(i + 1, len(last)):
            assert (last[i] - last[j]).abs().max() > 1e-3, (rows[i].spec, rows[j].spec)


def test_mixed_batch_same_prompt_equals_solo_rows(tiny_lm, rows):
    prompt = PROMPTS[3]
    mixed = forward_logits(tiny_lm, [prompt] * len(rows), rows)
    for i, row in enumerate(rows):
        solo = forward_logits(tiny_lm, [prompt], [row])
        torch.testing.assert_close(mixed[i:i + 1], solo, atol=1e-5, rtol=0,
                                   msg=lambda m, s=row.spec: f"{s}: {m}")


def test_mixed_batch_with_padding_equals_solo_rows(tiny_lm, rows):
    """Different prompts (left padding) and all methods in one batch, in two orders."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(rows))]
    enc = encode_chats(tiny_lm, prompts)
    assert (enc["attention_mask"] == 0).any()  # there is padding
    mixed = forward_logits(tiny_lm, prompts, rows)[:, -1]
    order = list(reversed(range(len(rows))))
    mixed_rev = forward_logits(tiny_lm, [prompts[i] for i in order],
                               [rows[i] for i in order])[:, -1]
    for i, row in enumerate(rows):
        solo = forward_logits(tiny_lm, [prompts[i]], [row])[:, -1]
        torch.testing.assert_close(mixed[i:i + 1], solo, atol=1e-5, rtol=0,
                                   msg=lambda m, s=row.spec: f"{s}: {m}")
        torch.testing.assert_close(mixed_rev[order.index(i)][None], solo, atol=1e-5, rtol=0)


def test_last_logits_applies_the_row(tiny_lm, rows):
    for row in rows[:3]:
        batched = last_logits(tiny_lm, PROMPTS, hooks_of(tiny_lm), row, batch_size=4)
        solo = torch.cat([forward_logits(tiny_lm, [p], [row])[:, -1] for p in PROMPTS])
        torch.testing.assert_close(batched, solo, atol=1e-5, rtol=0)


def test_mixed_generation_equals_solo_generation(tiny_lm, rows):
    """Cached decoding (one token per step) keeps each row's steering."""
    prompt = PROMPTS[1]
    mixed = generate(tiny_lm, [prompt] * len(rows), rows, max_new_tokens=8,
                     batch_size=len(rows))
    solo = [generate(tiny_lm, [prompt], [row], max_new_tokens=8)[0] for row in rows]
    assert mixed == solo
    assert len(set(solo)) > 1  # the methods steer generation differently


def test_row_count_must_match_the_batch(tiny_lm, rows):
    enc = encode_chats(tiny_lm, PROMPTS[:2])
    with pytest.raises(RuntimeError, match="do not match"):
        with torch.no_grad(), hooks_of(tiny_lm).rows(rows[1:4]):
            tiny_lm.model(**enc)
    assert not hooks_of(tiny_lm).active


def test_remove_detaches_every_hook():
    from testkit.tiny import make_tiny

    lm = make_tiny("qwen2", n_layers=2)
    g = torch.Generator().manual_seed(3)
    pack = SteeringPack("r", torch.randn(2, 1, 64, generator=g), torch.zeros(2, 1, 64), [-1],
                        1, -1)
    enc = encode_chats(lm, PROMPTS[:1])
    with torch.no_grad():
        plain = lm.model(**enc).logits
        hooks = hooks_of(lm)
        hooks.set_rows([build_row(SteeringSpec("ablate", 1.0), pack)])
        steered = lm.model(**enc).logits
        assert not torch.allclose(plain, steered)
        hooks.remove()
        assert torch.equal(lm.model(**enc).logits, plain)


def test_plain_projection_path_covers_both_writers_and_equals_the_general_path(tiny_lm, rows):
    """Ablation at strength 1 takes the hooks' short path at every write into the stream —
    the attention's output (first in a tuple) and the MLP's — and it computes exactly what the
    general kernel path computes."""
    ablate = next(r for r in rows if r.spec.method == "ablate")
    hooks, enc = hooks_of(tiny_lm), encode_chats(tiny_lm, PROMPTS[:2])
    calls = []
    original = hooks_module.project_out

    def counting(x, q):
        calls.append(x.shape)
        return original(x, q)

    with torch.no_grad():
        hooks.set_rows([ablate, ablate])
        try:
            hooks_module.project_out = counting
            short = tiny_lm.model(**enc, use_cache=False).logits
        finally:
            hooks_module.project_out = original
        assert len(calls) == 2 * hooks_of(tiny_lm).layout.n_layers
        hooks._plain = {}  # the same rows through the general path
        general = tiny_lm.model(**enc, use_cache=False).logits
        hooks.set_rows(None)
    assert torch.equal(short, general)
