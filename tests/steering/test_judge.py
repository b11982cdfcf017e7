"""Extraction's judge: the shared chat-template prefix computed once gives what a full forward
of every row gives (tiny models; the real model in test_real_science.py)."""

from __future__ import annotations

import torch

from steering.extraction import judge as judge_module
from steering.extraction.judge import judge
from steering.interventions.activations import collect_residuals, encode_chats
from steering.interventions.methods import SteeringSpec, build_row

PROMPTS = ["Tell me a joke.", "How do I bake bread at home with little equipment?",
           "What is 2 + 2?", "Write a haiku about the sea and the wind at night."]


def test_the_shared_prefix_is_the_template_opening(tiny_lm):
    ids = [encode_chats(tiny_lm, [p])["input_ids"][0].tolist() for p in PROMPTS]
    n = judge_module.shared_prefix_length(ids, keep=5)
    assert n > 0 and all(x[:n] == ids[0][:n] for x in ids)
    assert all(len(x) - n >= 5 for x in ids)
    assert judge_module.shared_prefix_length(ids[:1], keep=1) == 0  # one prompt: nothing to share


def test_prefix_sharing_matches_full_forwards(tiny_lm, tiny_pack, monkeypatch):
    rows = [None, build_row(SteeringSpec("ablate", 1.0), tiny_pack),
            build_row(SteeringSpec("actadd", 3.0), tiny_pack), None]
    embedded = []  # widths of the forwards: the prompts' prefills skip the shared prefix
    handle = tiny_lm.layout.embedding.register_forward_hook(
        lambda module, args, out: embedded.append(out.shape[1]))
    try:
        shared = judge(tiny_lm, PROMPTS, rows, n_tokens=4, batch_size=3, capture=3)
        widest, embedded[:] = max(embedded), []
        monkeypatch.setattr(judge_module, "shared_prefix_length", lambda ids, keep: 0)
        full = judge(tiny_lm, PROMPTS, rows, n_tokens=4, batch_size=3, capture=3)
        assert widest < max(embedded)
    finally:
        handle.remove()
    # (greedy texts of a random tiny model can flip on near-ties of its logits: compare the
    # computation itself)
    torch.testing.assert_close(shared.first_logits, full.first_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(shared.residuals, full.residuals, atol=1e-4, rtol=1e-4)
    # and the unsteered captures are the residual stream of a plain forward
    plain, _ = collect_residuals(tiny_lm, PROMPTS, 3, desc=None)
    torch.testing.assert_close(shared.residuals[[0, 3]], plain[[0, 3]], atol=1e-4, rtol=1e-4)
