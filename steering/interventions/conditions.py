"""Conditional steering: decide a steering object's `when` from the prompt's own residual stream.

A condition reads the *unsteered* residual at its layer's input and the pack's position (an
offset from the end of the prompt) and scores it on the pack's DiM axis,

    t(h) = (h − μ⁻)·r / ‖r‖²,  r = μ⁺ − μ⁻      (harmless mean 0, harmful mean 1)

the axis of `steering.interventions.conditions.dim_position`. The object's edits apply to the request
only when t is above (below) the threshold (Lee et al. 2024, "Programming Refusal with
Conditional Activation Steering": a condition vector gates the behaviour vector per prompt).

Two ways to decide:

- `resolve_conditions` (library, batched): one extra forward up to the condition layer.
- `decide_on_prompt` (one tokenized prompt, one unsteered forward of it): for an engine that
  cannot gate its own prefill (vLLM's: the server decides before it submits the request).
- `ConditionGate` (the serving engine, one prompt during its prefill): the prefill first runs
  unsteered while the gate captures the residual; at the end of the prompt the conditions are
  decided and, when the decided row edits a prompt position, the prefill is redone from the first
  such position (the cache before it is exactly what the steered prefill holds there). A
  condition that does not hold costs nothing; one that holds costs the redone positions (the last
  prompt position only, for generation-only steering).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

import torch

from steering.interventions.activations import layer_activations
from steering.interventions.kernel import EVERY_TOKEN
from steering.interventions.methods import BoundCondition, RowSteering, Steering, with_parts
from steering.models.loading import LoadedModel


def dim_position(acts: torch.Tensor, mean_harmful: torch.Tensor,
                 mean_harmless: torch.Tensor) -> torch.Tensor:
    """Position along the DiM axis: 0 at the harmless mean, 1 at the harmful mean. [N, d] → [N]"""
    r = (mean_harmful - mean_harmless).double()
    return ((acts.double() - mean_harmless.double()) @ r) / (r @ r).clamp_min(1e-30)


def condition_score(condition: BoundCondition, residual: torch.Tensor) -> float:
    """The DiM-axis position of one residual vector [d]."""
    return float(dim_position(residual.float().cpu()[None], condition.mean_harmful,
                              condition.mean_harmless)[0])


def pending(steering: Steering) -> list[int]:
    """Indices of the parts whose condition is not decided yet."""
    return [i for i, p in enumerate(steering.parts)
            if p.condition is not None and p.outcome is None]


def decide(steering: Steering, scores: dict[int, float]) -> Steering:
    """`steering` with part i's condition decided by scores[i]."""
    parts = [p.decided(scores[i]) if i in scores else p for i, p in enumerate(steering.parts)]
    return with_parts(steering, parts)


def first_edited_prompt_position(steering: Steering, prompt_length: int) -> int | None:
    """The first prompt position an active edit of `steering` changes (None: none does).
    Prompt position p has token index p − (prompt_length − 1) (kernel.py)."""
    last = prompt_length - 1
    first = None
    for part in steering.parts:
        if not part.active:
            continue
        for edit in part.edits.values():
            if edit.is_identity:
                continue
            lo, hi = edit.window or EVERY_TOKEN
            lo, hi = max(lo, -last), min(hi, 1)
            if lo < hi:
                first = lo + last if first is None else min(first, lo + last)
    return first


@torch.inference_mode()
def resolve_conditions(lm: LoadedModel, prompts: Sequence[str], rows: Sequence[Steering],
                       batch_size: int = 16) -> list[Steering]:
    """Decide every pending condition of rows[i] on prompts[i] (chat prompts; an unsteered
    forward up to each condition's layer, grouped by layer and position)."""
    groups: dict[tuple[int, int], list[tuple[int, int, BoundCondition]]] = {}
    for i, row in enumerate(rows):
        for j in pending(row):
            cond = row.parts[j].condition
            assert cond is not None
            groups.setdefault((cond.layer, cond.position), []).append((i, j, cond))
    scores: dict[int, dict[int, float]] = {}
    for (layer, position), items in groups.items():
        which = sorted({i for i, _, _ in items})
        acts = layer_activations(lm, [prompts[i] for i in which], layer, position,
                                 batch_size=batch_size)
        for i, j, cond in items:
            scores.setdefault(i, {})[j] = condition_score(cond, acts[which.index(i)])
    return [decide(row, scores[i]) if i in scores else row for i, row in enumerate(rows)]


class ConditionGate:
    """Decides one request's conditions during its own (possibly chunked) prefill."""

    def __init__(self, steering: Steering, prompt_length: int):
        self.steering = steering
        self.prompt_length = prompt_length
        self._pending = pending(steering)
        self._residuals: dict[int, torch.Tensor] = {}

    @staticmethod
    def open(steering: Steering, prompt_length: int) -> ConditionGate | None:
        """A gate for `steering`, or None when it has no undecided condition."""
        return ConditionGate(steering, prompt_length) if pending(steering) else None

    def _where(self, part: RowSteering) -> tuple[int, int]:
        cond = part.condition
        assert cond is not None
        return cond.layer, max(0, self.prompt_length + cond.position)

    def reads_before(self, position: int) -> bool:
        """Some pending condition reads a prompt position before `position`."""
        return any(self._where(self.steering.parts[j])[1] < position for j in self._pending)

    @contextmanager
    def capture(self, lm: LoadedModel, start: int, end: int) -> Iterator[None]:
        """Record, during an unsteered forward over prompt positions [start, end), the residual
        each pending condition reads when its position falls in that range."""
        with ExitStack() as stack:
            for j in self._pending:
                layer, position = self._where(self.steering.parts[j])
                if start <= position < end:
                    handle = lm.layout.blocks[layer].register_forward_pre_hook(
                        self._recorder(j, position - start), with_kwargs=True)
                    stack.callback(handle.remove)
            yield

    def _recorder(self, part: int, offset: int):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            self._residuals[part] = h[0, offset].detach().clone()
        return hook

    def decide(self) -> tuple[Steering, int | None]:
        """After the whole prompt: the decided steering, and the first prompt position to
        prefill again with it (None: the unsteered prefill stands)."""
        missing = [j for j in self._pending if j not in self._residuals]
        if missing:
            raise RuntimeError(f"no residual captured for the condition of part {missing[0]}")
        scores = {j: condition_score(self.steering.parts[j].condition, self._residuals[j])
                  for j in self._pending}
        decided = decide(self.steering, scores)
        return decided, first_edited_prompt_position(decided, self.prompt_length)


@torch.inference_mode()
def decide_on_prompt(lm: LoadedModel, prompt_ids: Sequence[int], steering: Steering) -> Steering:
    """`steering` with its pending conditions decided on one tokenized prompt: one unsteered
    forward of the prompt through `lm` (the same residuals `ConditionGate` captures during the
    serving engine's own prefill, so the same decisions)."""
    gate = ConditionGate.open(steering, len(prompt_ids))
    if gate is None:
        return steering
    ids = torch.tensor([list(prompt_ids)], device=lm.device)
    with gate.capture(lm, 0, len(prompt_ids)):
        lm.model(input_ids=ids, use_cache=False, logits_to_keep=1)
    return gate.decide()[0]
