"""Steered generation with transformers' `generate` (library use, CLI, evaluation).

The server uses its own batching engine; this is the simple path: one batch, each prompt with its
own steering row (one object or a list), greedy unless a temperature is given. Conditions
(`when`) are decided first, with one unsteered forward up to their layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from steering.interventions.activations import encode_chats
from steering.interventions.conditions import pending, resolve_conditions
from steering.interventions.hooks import hooks_of
from steering.interventions.methods import Steering
from steering.models.loading import LoadedModel


@torch.inference_mode()
def generate(lm: LoadedModel, prompts: Sequence[str], rows: Sequence[Steering] | None = None,
             max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
             seed: int | None = None, batch_size: int = 8,
             desc: str | None = None) -> list[str]:
    """Completions of chat `prompts`; `rows[i]` steers prompt i (None: unsteered)."""
    if rows is not None and len(rows) != len(prompts):
        raise ValueError("need one steering row per prompt")
    if rows is not None and any(pending(r) for r in rows):
        rows = resolve_conditions(lm, prompts, rows, batch_size)
    if seed is not None:
        torch.manual_seed(seed)
    sampling = {"do_sample": False} if temperature <= 0 else {
        "do_sample": True, "temperature": temperature, "top_p": top_p}
    texts: list[str] = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc=desc, leave=False) if desc else starts:
        chunk = list(prompts[start:start + batch_size])
        enc = encode_chats(lm, chunk)
        enc.pop("position_ids")  # generate derives them from the attention mask
        hooks_of(lm).set_rows(list(rows[start:start + len(chunk)]) if rows is not None else None,
                          enc["attention_mask"].sum(-1).tolist())
        try:
            out = lm.model.generate(**enc, max_new_tokens=max_new_tokens,
                                    pad_token_id=lm.tokenizer.pad_token_id, **sampling)
        finally:
            hooks_of(lm).set_rows(None)
        new = out[:, enc["input_ids"].shape[1]:]
        texts.extend(lm.tokenizer.batch_decode(new, skip_special_tokens=True))
    return texts
