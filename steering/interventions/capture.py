"""Activation capture: the residual stream at chosen layers × positions for a batch of prompts.

    acts = steering.capture(lm, ["How do I bake bread?", "How do I pick a lock?"],
                            layers=[8, 16], positions=[-1])
    acts.values            # float32 [N, len(layers), len(positions), d] on the CPU
    acts.values.numpy()    # for a probe fitted in numpy

A layer's activation is the residual stream entering that block (the site DiM directions are
read at, Arditi et al. 2024 §2.1), after any steering edits there when `steering` is given.
Positions are token indices into each prompt: negative ones count from its end (−1: the last
prompt token, whose output is the first answer token), non-negative ones from its start. Prompts
are chat user messages put through the model's chat template (`chat=True`, the default) or raw
text; they are left-padded into batches, with position ids from the attention mask, so a row
computes what it computes alone (as `steering.interventions.activations` does).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from steering.interventions.activations import with_positions
from steering.interventions.hooks import hooks_of
from steering.interventions.methods import Steering
from steering.models.chat import format_chat
from steering.models.loading import LoadedModel

Prompt = str | Sequence[dict[str, str]]  # a user message (or raw text), or chat messages


@dataclass
class Activations:
    values: torch.Tensor  # float32 [N, L, P, d]
    layers: list[int]
    positions: list[int]
    token_ids: list[list[int]] = field(default_factory=list)  # each prompt's tokens

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    def at(self, layer: int, position: int | None = None) -> torch.Tensor:
        """[N, d] at one captured layer and position (default: the first position)."""
        p = 0 if position is None else self.positions.index(position)
        return self.values[:, self.layers.index(layer), p]


class CaptureError(ValueError):
    """A capture request that cannot be served; `param` names the field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def encode(lm: LoadedModel, prompt: Prompt, chat: bool = True) -> list[int]:
    """A prompt's token ids: through the chat template (no extra special tokens), or raw text
    with the tokenizer's own special tokens."""
    tok = lm.tokenizer
    if chat:
        return list(tok(format_chat(tok, prompt), add_special_tokens=False)["input_ids"])
    if not isinstance(prompt, str):
        raise CaptureError("a raw-text prompt must be a string", "prompts")
    return list(tok(prompt)["input_ids"])


def check_request(layers: Sequence[int], positions: Sequence[int], n_layers: int) -> None:
    """Layers within the model, no repeats; at least one position, no repeats."""
    if not layers:
        raise CaptureError("layers must name at least one layer", "layers")
    bad = [x for x in layers if isinstance(x, bool) or not isinstance(x, int)
           or not 0 <= x <= n_layers]
    if bad:
        raise CaptureError(f"layers {bad[:5]} are outside 0–{n_layers} ({n_layers}: the final "
                           "norm's input)", "layers")
    if len(set(layers)) != len(layers):
        raise CaptureError("layers must not repeat a layer", "layers")
    if not positions:
        raise CaptureError("positions must name at least one position", "positions")
    if any(isinstance(p, bool) or not isinstance(p, int) for p in positions):
        raise CaptureError("positions must be integers", "positions")
    if len(set(positions)) != len(positions):
        raise CaptureError("positions must not repeat a position", "positions")


def position_index(position: int, length: int, i: int) -> int:
    """Where `position` of a prompt of `length` tokens sits (before padding)."""
    index = position + length if position < 0 else position
    if not 0 <= index < length:
        raise CaptureError(f"position {position} is outside prompt {i} ({length} tokens)",
                           "positions")
    return index


@torch.inference_mode()
def capture_ids(lm: LoadedModel, ids: Sequence[Sequence[int]], layers: Sequence[int],
                positions: Sequence[int] = (-1,), steering: Steering | None = None,
                batch_size: int = 16) -> torch.Tensor:
    """Token-id prompts → float32 [N, len(layers), len(positions), d] on the CPU. Layer
    `n_layers` is the final norm's input."""
    layers, positions = list(layers), list(positions)
    check_request(layers, positions, lm.n_layers)
    where = [[position_index(p, len(x), i) for p in positions] for i, x in enumerate(ids)]
    out = torch.empty(len(ids), len(layers), len(positions), lm.d_model)
    modules = [*lm.layout.blocks, lm.layout.final_norm]
    captured: dict[int, torch.Tensor] = {}

    def hook(slot: int):
        def read(module, args, kwargs):
            captured[slot] = (args[0] if args else kwargs["hidden_states"]).detach()
        return read

    steer = hooks_of(lm)  # registered before the capture: it reads the input as edited
    handles = [modules[layer].register_forward_pre_hook(hook(j), with_kwargs=True)
               for j, layer in enumerate(layers)]
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    try:
        for start in range(0, len(ids), batch_size):
            chunk = [list(x) for x in ids[start:start + batch_size]]
            width = max(len(x) for x in chunk)
            input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in chunk])
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in chunk])
            lengths = [len(x) for x in chunk]
            steer.set_rows([steering] * len(chunk) if steering is not None else None, lengths)
            try:
                lm.model(**with_positions(input_ids, mask, lm.device), use_cache=False,
                         logits_to_keep=1)
            finally:
                steer.set_rows(None)
            for b, x in enumerate(chunk):
                cols = torch.tensor([width - len(x) + i for i in where[start + b]])
                for j in range(len(layers)):
                    out[start + b, j] = captured[j][b, cols.to(captured[j].device)].float().cpu()
            captured.clear()
    finally:
        for h in handles:
            h.remove()
    return out


def capture(lm: LoadedModel, prompts: Sequence[Prompt], layers: Sequence[int] | None = None,
            positions: Sequence[int] = (-1,), chat: bool = True,
            steering: Steering | None = None, batch_size: int = 16) -> Activations:
    """The residual stream entering `layers` (default: every block) at `positions` of each
    prompt (module docstring)."""
    layers = list(range(lm.n_layers)) if layers is None else list(layers)
    ids = [encode(lm, p, chat) for p in prompts]
    values = capture_ids(lm, ids, layers, positions, steering, batch_size)
    return Activations(values, layers, list(positions), ids)
