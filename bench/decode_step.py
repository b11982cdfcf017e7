"""What the in-process decode-step benches share (`step_overhead.py`, `monitor_overhead.py`): a
batch prefilled once, and round-robin timing of one decode step per row in a rotating order."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping

PROMPT = "Write a short story about a lighthouse keeper."


def prefilled(lm, batch: int):
    """(cache, next token, its positions, attention mask) after prefilling `batch` copies of
    `PROMPT` (~40 tokens): a decode step on them, then `cache.crop(-1)`, leaves the cache as it
    was, so every step sees the same cache."""
    import torch
    from transformers import DynamicCache

    from steering.interventions.activations import encode_chats

    enc = encode_chats(lm, [PROMPT] * batch)
    cache = DynamicCache(config=lm.model.config)
    with torch.inference_mode():
        out = lm.model(**enc, cache=cache, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1:].argmax(-1)
    positions = enc["position_ids"][:, -1:] + 1
    mask = torch.cat([enc["attention_mask"], torch.ones(batch, 1, dtype=torch.long)], 1)
    return cache, token, positions, mask


def round_robin(rows: Mapping[Hashable, object], step: Callable[[object], float], steps: int,
                warmup: int = 5) -> dict:
    """Seconds per step of each row (`step(rows[name])`), `steps` times each, after `warmup`
    rounds. The order rotates every round: no row always follows the same one (a fixed order
    showed a few percent of bias on the row after the longest one), and the shared machine's
    drift spreads over every row alike."""
    import torch

    times: dict = {name: [] for name in rows}
    names = list(rows)
    with torch.inference_mode():
        for _ in range(warmup):
            for value in rows.values():
                step(value)
        for i in range(steps):
            for name in names[i % len(names):] + names[: i % len(names)]:
                times[name].append(step(rows[name]))
    return times
