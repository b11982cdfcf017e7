"""The model passes the evaluation makes: greedy generation in length-sorted batches (one
steering row for every prompt) and the negative log-likelihood of given continuations."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from steering.evaluation.metrics import token_nll
from steering.interventions.activations import encode_chats, with_positions
from steering.interventions.hooks import hooks_of
from steering.interventions.methods import RowSteering
from steering.models.chat import format_chat
from steering.models.loading import LoadedModel, eos_ids

GENERATION = {"do_sample": False, "num_beams": 1, "repetition_penalty": 1.0,
              "no_repeat_ngram_size": 0, "length_penalty": 1.0}


def _rows(row: RowSteering | None, n: int) -> list[RowSteering] | None:
    return [row] * n if row is not None else None


def _length_order(lengths: Sequence[int]) -> list[int]:
    """Indices by length, so each batch pads as little as possible (stable: ties keep order)."""
    return sorted(range(len(lengths)), key=lambda i: lengths[i])


def _unsort(values: list, order: list[int]) -> list:
    out: list = [None] * len(order)
    for value, i in zip(values, order):
        out[i] = value
    return out


@torch.inference_mode()
def generate_greedy(lm: LoadedModel, prompts: Sequence[str],
                    row: RowSteering | Sequence[RowSteering] | None, max_new_tokens: int,
                    batch_size: int = 16, desc: str | None = None
                    ) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy completions (token ids, cut after the first end-of-turn token) of chat `prompts`
    with `row` steering every prompt (or a list: one row per prompt), and the first answer
    position's logits [N, vocab].

    Prompts are batched by length (less padding); results come back in the prompts' order."""
    eos = eos_ids(lm)
    texts = [format_chat(lm.tokenizer, p) for p in prompts]
    lengths = [len(lm.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    order = _length_order(lengths)
    completions: list[list[int]] = []
    first: list[torch.Tensor] = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc=desc, leave=False) if desc else starts:
        index = order[start:start + batch_size]
        chunk = [prompts[i] for i in index]
        enc = encode_chats(lm, chunk)
        enc.pop("position_ids")  # generate derives them from the attention mask
        hooks_of(lm).set_rows([row[i] for i in index] if isinstance(row, list | tuple)
                              else _rows(row, len(chunk)))
        try:
            out = lm.model.generate(**enc, max_new_tokens=max_new_tokens, **GENERATION,
                                    pad_token_id=lm.tokenizer.pad_token_id,
                                    return_dict_in_generate=True, output_logits=True)
        finally:
            hooks_of(lm).set_rows(None)
        first.extend(out.logits[0].float().cpu())
        new = out.sequences[:, enc["input_ids"].shape[1]:].tolist()
        for ids in new:
            cut = next((i + 1 for i, t in enumerate(ids) if t in eos), len(ids))
            completions.append(ids[:cut])
    if not prompts:
        return [], torch.empty(0)
    return _unsort(completions, order), torch.stack(_unsort(first, order))


def decode(lm: LoadedModel, completions: Sequence[Sequence[int]]) -> list[str]:
    return lm.tokenizer.batch_decode(completions, skip_special_tokens=True)


@torch.inference_mode()
def sequence_nll(lm: LoadedModel, sequences: Sequence[Sequence[int]], n_targets: Sequence[int],
                 row: RowSteering | None = None, batch_size: int = 8, desc: str | None = None,
                 answer_logits: bool = False):
    """Summed NLL of the last `n_targets[i]` tokens of each token sequence, with `row` steering:
    (nll, tokens), plus with `answer_logits` the logits that predict each sequence's first
    target token [N, vocab] (for a chat prompt + completion: the first answer position).

    Sequences are batched by length and left-padded so every row ends at the right edge; only the
    logits of the last max(n_targets)+1 positions are computed (the LM head is a large share of a
    small model)."""
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    order = _length_order([len(s) for s in sequences])
    total, count = 0.0, 0
    first: list[torch.Tensor] = []
    starts = range(0, len(sequences), batch_size)
    for start in tqdm(starts, desc=desc, leave=False) if desc else starts:
        index = order[start:start + batch_size]
        seqs = [list(sequences[i]) for i in index]
        ns = [int(n_targets[i]) for i in index]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
        keep = min(max(ns) + 1, width)
        hooks_of(lm).set_rows(_rows(row, len(seqs)))
        try:
            logits = lm.model(**with_positions(ids, mask, lm.device), use_cache=False,
                              logits_to_keep=keep).logits.float().cpu()
        finally:
            hooks_of(lm).set_rows(None)
        targets = ids[:, width - keep + 1:]  # token t is predicted by logits at t − 1
        positions = torch.arange(width - keep + 1, width)
        target_mask = positions[None, :] >= torch.tensor([width - n for n in ns])[:, None]
        nll, n = token_nll(logits[:, :-1], targets, target_mask)
        total += nll
        count += n
        if answer_logits:
            first.extend(logits[i, keep - n - 1] for i, n in enumerate(ns))
    if answer_logits:
        return total, count, (torch.stack(_unsort(first, order)) if first else torch.empty(0))
    return total, count
