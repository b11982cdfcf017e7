"""Batched forwards over chat prompts: residual activations and first-answer-token logits.

Prompts are left-padded, so the last P positions of every row are its post-instruction tokens;
position ids are computed from the attention mask so a padded row sees exactly the positions it
would see alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from steering.interventions.hooks import SteeringHooks, hooks_of
from steering.interventions.methods import RowSteering
from steering.models.chat import format_chat
from steering.models.loading import LoadedModel


def encode_chats(lm: LoadedModel, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    texts = [format_chat(lm.tokenizer, p) for p in prompts]
    enc = lm.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return with_positions(enc["input_ids"], enc["attention_mask"], lm.device)


def with_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   device: torch.device) -> dict[str, torch.Tensor]:
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device),
            "position_ids": position_ids.to(device)}


def _batches(n: int, batch_size: int, desc: str | None):
    starts = range(0, n, batch_size)
    return tqdm(starts, desc=desc, leave=False, disable=desc is None) if desc else starts


@torch.inference_mode()
def collect_residuals(lm: LoadedModel, prompts: Sequence[str], n_positions: int,
                      batch_size: int = 16, desc: str | None = "activations"
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual stream at every block's input and the final norm's input, at the last
    `n_positions` tokens: float32 [N, L + 1, n_positions, d] on the CPU; and the unsteered
    next-token logits at the first answer position, float32 [N, vocab]."""
    layout = lm.layout
    out = torch.empty(len(prompts), lm.n_layers + 1, n_positions, lm.d_model)
    logits = []
    captured: dict[int, torch.Tensor] = {}

    def capture(index: int):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            captured[index] = h[:, -n_positions:, :].float().cpu()
        return hook

    modules = [*layout.blocks, layout.final_norm]
    handles = [m.register_forward_pre_hook(capture(i), with_kwargs=True)
               for i, m in enumerate(modules)]
    try:
        for start in _batches(len(prompts), batch_size, desc):
            chunk = prompts[start:start + batch_size]
            result = lm.model(**encode_chats(lm, chunk), use_cache=False, logits_to_keep=1)
            logits.append(result.logits[:, -1, :].float().cpu())
            for i in range(len(modules)):
                out[start:start + len(chunk), i] = captured[i]
    finally:
        for h in handles:
            h.remove()
    return out, torch.cat(logits)


@torch.inference_mode()
def last_logits(lm: LoadedModel, prompts: Sequence[str], hooks: SteeringHooks | None = None,
                row: RowSteering | None = None, batch_size: int = 16,
                desc: str | None = None) -> torch.Tensor:
    """Next-token logits at the first answer position, float32 [N, vocab], with `row`'s
    steering applied to every prompt."""
    outs = []
    for start in _batches(len(prompts), batch_size, desc):
        chunk = prompts[start:start + batch_size]
        rows = [row] * len(chunk) if (row is not None and hooks is not None) else None
        enc = encode_chats(lm, chunk)
        if hooks is not None:
            hooks.set_rows(rows, enc["attention_mask"].sum(-1).tolist())
        try:
            logits = lm.model(**enc, use_cache=False, logits_to_keep=1).logits[:, -1, :]
        finally:
            if hooks is not None:
                hooks.set_rows(None)
        outs.append(logits.float().cpu())
    return torch.cat(outs)


class _Stop(Exception):
    """Raised by the capture hook: nothing after the intervention layer is needed."""


@torch.inference_mode()
def layer_activations(lm: LoadedModel, prompts: Sequence[str], layer: int, position: int,
                      row: RowSteering | None = None, batch_size: int = 16,
                      desc: str | None = None) -> torch.Tensor:
    """Residual stream at `layer`'s input (after any steering edits there), token `position`
    (negative offset from the end of the prompt), float32 [N, d] on the CPU."""
    hooks = hooks_of(lm)  # registered first, so the capture below sees the edited input
    captured: dict[str, torch.Tensor] = {}

    def capture(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        captured["h"] = h[:, position, :].float().cpu()
        raise _Stop

    handle = lm.layout.blocks[layer].register_forward_pre_hook(capture, with_kwargs=True)
    outs = []
    starts = range(0, len(prompts), batch_size)
    try:
        for start in tqdm(starts, desc=desc, leave=False) if desc else starts:
            chunk = list(prompts[start:start + batch_size])
            hooks.set_rows([row] * len(chunk) if row is not None else None)
            try:
                lm.model(**encode_chats(lm, chunk), use_cache=False, logits_to_keep=1)
            except _Stop:
                pass
            finally:
                hooks.set_rows(None)
            outs.append(captured.pop("h"))
    finally:
        handle.remove()
    return torch.cat(outs)
