"""Refusal judged on short greedy generations, one batched pass for many (prompt, steering) rows.

Selection in Arditi et al. 2024 (App. C) scores candidates by the log-odds of refusal tokens at
the first answer position. On small models that score does not see refusal: on the embedded
Qwen2.5-0.5B the first token of both refusals ("I'm sorry, but I can't…") and many answers ("I'd
be happy…") is "I", and under activation addition the log-odds never go positive although half
the completions refuse. So extraction judges refusal the way evaluation does — the substring
matcher on a greedy completion — but on only the first `n_tokens` tokens (refusals open the
answer: "I'm sorry", "I can't", "As an AI" fit in 4–5 tokens), and keeps the first-position
logits for the KL filter and as a tie-break score.

Every row carries its own steering (the kernel applies a different edit per row), so one
`generate` call scores several candidates or strengths at once; rows are sorted by prompt length
so batches pad little. With `capture`, the unsteered prefill's residual stream is recorded too
(training-prompt activations and their refusal judgement in one pass).

The chat template's opening (system turn and the user header: 24 of a prompt's ~41 tokens on the
embedded model) is the same for every prompt, so its keys and values are computed once per
distinct steering row and every batch starts from them: each row is laid out as
[shared prefix][padding][rest of its prompt], with position ids that skip the padding, which is
the row's own sequence with the same positions and the same edits at every position — about half
the prefill work of extraction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from steering.evaluation.refusal import is_refusal
from steering.interventions.hooks import hooks_of
from steering.interventions.methods import RowSteering
from steering.models.cache_arg import cache_kwargs
from steering.models.chat import format_chat, shared_prefix_length
from steering.models.loading import LoadedModel

JUDGE_TOKENS = 5


@dataclass
class Judged:
    refused: list[bool]  # per row: the short completion matches a refusal substring
    first_logits: torch.Tensor  # [N, vocab] float32: the first answer position
    texts: list[str]
    residuals: torch.Tensor | None = None  # [N, L + 1, P, d] float32 when captured


@torch.inference_mode()
def judge(lm: LoadedModel, prompts: Sequence[str], rows: Sequence[RowSteering | None] | None,
          n_tokens: int = JUDGE_TOKENS, batch_size: int = 16, capture: int = 0,
          desc: str | None = None) -> Judged:
    """Greedy `n_tokens` for each prompt with its row's steering (None: unsteered); with
    `capture` > 0 also the residual stream entering every block and the final norm at the last
    `capture` prompt positions (meant for unsteered rows)."""
    n = len(prompts)
    rows = list(rows) if rows is not None else [None] * n
    if len(rows) != n:
        raise ValueError("need one steering row (or None) per prompt")
    texts_in = [format_chat(lm.tokenizer, p) for p in prompts]
    ids = [lm.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts_in]
    shared = shared_prefix_length(ids, keep=max(capture, 1))
    prefixes = _PrefixCache(lm, ids[0][:shared]) if shared else None
    order = sorted(range(n), key=lambda i: len(ids[i]))
    refused: list[bool] = [False] * n
    texts: list[str] = [""] * n
    first = torch.empty(0)
    residuals = None
    modules = [*lm.layout.blocks, lm.layout.final_norm]
    captured: dict[int, torch.Tensor] = {}
    handles = []
    if capture:
        residuals = torch.empty(n, len(modules), capture, lm.d_model)

        def make(index: int):
            def hook(module, args, kwargs):
                h = args[0] if args else kwargs["hidden_states"]
                if h.shape[1] > 1 and not (prefixes and prefixes.computing):  # the prompt
                    captured[index] = h[:, -capture:, :].float().cpu()
            return hook

        handles = [m.register_forward_pre_hook(make(i), with_kwargs=True)
                   for i, m in enumerate(modules)]
    pad = lm.tokenizer.pad_token_id
    starts = range(0, n, batch_size)
    try:
        for start in tqdm(starts, desc=desc, leave=False) if desc else starts:
            index = order[start:start + batch_size]
            batch_rows = [rows[i] for i in index]
            steer = None if all(r is None for r in batch_rows) else [
                r if r is not None else _NONE for r in batch_rows]
            enc = _layout([ids[i] for i in index], shared, pad, lm.device)
            if prefixes is not None:
                enc.update(cache_kwargs(lm.model, prefixes.for_rows(
                    steer or [None] * len(index))))
            hooks_of(lm).set_rows(steer)
            try:
                out = lm.model.generate(**enc, max_new_tokens=n_tokens, do_sample=False,
                                        num_beams=1, repetition_penalty=1.0, pad_token_id=pad,
                                        return_dict_in_generate=True, output_logits=True)
            finally:
                hooks_of(lm).set_rows(None)
            new = out.sequences[:, enc["input_ids"].shape[1]:]
            decoded = lm.tokenizer.batch_decode(new, skip_special_tokens=True)
            logits = out.logits[0].float().cpu()
            if first.numel() == 0:
                first = torch.empty(n, logits.shape[-1])
            for j, i in enumerate(index):
                texts[i] = decoded[j]
                refused[i] = is_refusal(decoded[j])
                first[i] = logits[j]
                if residuals is not None:
                    for m in range(len(modules)):
                        residuals[i, m] = captured[m][j]
            captured.clear()
    finally:
        for h in handles:
            h.remove()
    return Judged(refused, first, texts, residuals)


def _layout(ids: list[list[int]], shared: int, pad: int, device: torch.device) -> dict:
    """[shared prefix][left padding][rest] per row, its attention mask (0 on the padding)."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros(len(ids), width, dtype=torch.long)
    for r, x in enumerate(ids):
        input_ids[r, :shared], mask[r, :shared] = torch.tensor(x[:shared]), 1
        rest = x[shared:]
        input_ids[r, width - len(rest):], mask[r, width - len(rest):] = torch.tensor(rest), 1
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}


class _PrefixCache:
    """Keys and values of the shared prefix, once per distinct steering row."""

    def __init__(self, lm: LoadedModel, prefix: list[int]):
        self.lm, self.ids = lm, torch.tensor([prefix], device=lm.device)
        self.computing = False
        self._by_row: dict[int, tuple[RowSteering | None, list]] = {}

    def _one(self, row: RowSteering | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        row = None if row is _NONE else row  # one unsteered prefix
        key = id(row)
        if key not in self._by_row:
            hooks_of(self.lm).set_rows(None if row is None else [row])
            self.computing = True
            try:
                cache = DynamicCache(config=self.lm.model.config)
                self.lm.model(input_ids=self.ids, use_cache=True, logits_to_keep=1,
                              **cache_kwargs(self.lm.model, cache))
            finally:
                self.computing = False
                hooks_of(self.lm).set_rows(None)
            kv = [(layer.keys, layer.values) for layer in cache.layers]
            self._by_row[key] = (row, kv)  # holds the row, so its id is not reused
        return self._by_row[key][1]

    def for_rows(self, rows: Sequence[RowSteering | None]) -> DynamicCache:
        per_row = [self._one(r) for r in rows]
        cache = DynamicCache(config=self.lm.model.config)
        for layer in range(len(per_row[0])):
            cache.update(torch.cat([kv[layer][0] for kv in per_row]),
                         torch.cat([kv[layer][1] for kv in per_row]), layer)
        return cache


def _none_row() -> RowSteering:
    from steering.interventions.methods import SteeringSpec

    return RowSteering(SteeringSpec("none", 0.0))


_NONE = _none_row()


def rate(flags: Sequence[bool]) -> float:
    return sum(flags) / len(flags) if flags else float("nan")
