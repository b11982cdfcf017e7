"""One engine step's steering plan: which of the step's flat tokens each site edits, and how.

vLLM runs a step as one flat batch of tokens (requests one after another, a prefill chunk or one
decode token each). The plan turns the scheduled requests' steering into, per site, the flat
token selection and the kernel passes over those tokens, each token a row of
`steering.interventions.kernel.BatchEdit` carrying its request's parameters — the native engine's
kernel (`apply_edit`) and so its arithmetic, per token. Sites whose rows have no edit are absent
and cost one dictionary lookup.

A list (`ComposedSteering`) is a sequence of passes per site, pass j applying each row's j-th
edit there (rows with fewer edits get the exact identity), as in `SteeringHooks`. Token targeting
reads each token's index (its position minus the prompt length − 1, kernel.py), computed from the
scheduled positions.

Caching: a decode loop schedules the same requests in the same order step after step; the plan is
then reused as is (targeted edits recompute their masks only). Equal edits at many sites (an
ablation's 49) share one per-token parameter set.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from steering.interventions.kernel import BatchEdit, RowEdit, apply_edit, window_mask
from steering.interventions.methods import SITE_KINDS, Site, Steering


def site_id(site: Site) -> int:
    """The integer the custom ops carry for a site: layer · 3 + kind."""
    layer, kind = site
    return layer * len(SITE_KINDS) + SITE_KINDS.index(kind)


@dataclass(frozen=True)
class Scheduled:
    """A steered request in this step: its tokens are flat[start : start + count]."""

    steering: Steering
    start: int
    count: int
    first_index: int  # token index (kernel.py) of its first scheduled token


class SitePlan:
    """The tokens one site edits and its passes (a per-token edit, and the key of its mask)."""

    __slots__ = ("tokens", "passes")

    def __init__(self, tokens: slice | torch.Tensor,
                 passes: list[tuple[BatchEdit, tuple | None]]):
        self.tokens = tokens
        self.passes = passes

    def apply(self, x: torch.Tensor, masks: dict[tuple, torch.Tensor]) -> torch.Tensor:
        """x: [n, d] stream values of the selected tokens → edited, in float32."""
        y = x.unsqueeze(1)
        if y.dtype != torch.float32:
            y = y.float()
        for edit, key in self.passes:  # list order: each part edits the previous one's output
            y = apply_edit(y, edit, mask=None if key is None else masks[key])
        return y.squeeze(1)


@dataclass
class StepPlan:
    sites: dict[int, SitePlan]
    masks: dict[tuple, torch.Tensor]


def _edit_key(edit: RowEdit) -> tuple:
    # The rows' tensors are held by the resolver's cache and by the plan (`Planner._rows`), so
    # their ids identify them for as long as the key is used.
    return (id(edit.q), id(edit.c), edit.alpha, id(edit.v), edit.one_sided, edit.window)


class Planner:
    """Builds (and reuses) the step plan from the scheduled steered requests."""

    def __init__(self, device: torch.device, d_model: int):
        self.device = device
        self.identity = RowEdit.identity(d_model)
        self._layout: tuple | None = None
        self._rows: list[Scheduled] = []
        self._plan: StepPlan | None = None
        # mask key → (per-token window [n, 2], local indices of its tokens among the steered)
        self._windows: dict[tuple, tuple[torch.Tensor, slice | torch.Tensor]] = {}

    def plan(self, rows: list[Scheduled]) -> StepPlan | None:
        """The plan for this step's steered `rows` (in flat-batch order); None: nothing to do."""
        if not rows:
            self._layout, self._rows, self._plan, self._windows = None, [], None, {}
            return None
        layout = tuple((id(r.steering), r.start, r.count) for r in rows)
        if layout != self._layout:
            self._build(rows)
            self._layout = layout
        elif self._windows:
            self._refresh_masks(rows)
        self._rows = rows
        return self._plan

    # ---- building --------------------------------------------------------------------------

    def _token_index(self, rows: list[Scheduled]) -> torch.Tensor:
        return torch.cat([torch.arange(r.first_index, r.first_index + r.count)
                          for r in rows]).to(self.device)

    def _refresh_masks(self, rows: list[Scheduled]) -> None:
        assert self._plan is not None
        index = self._token_index(rows)
        self._plan.masks = {key: window_mask(window, index[local][:, None])
                            for key, (window, local) in self._windows.items()}

    def _build(self, rows: list[Scheduled]) -> None:
        edits = [[p.edits for p in r.steering.parts if p.active and p.edits] for r in rows]
        offsets = [0]  # each row's first token among the steered tokens
        for r in rows:
            offsets.append(offsets[-1] + r.count)
        sites = sorted({s for parts in edits for e in parts for s in e})
        shared: dict[tuple, BatchEdit] = {}
        self._windows = {}
        plans: dict[int, SitePlan] = {}
        for site in sites:
            members = tuple(i for i, parts in enumerate(edits) if any(site in e for e in parts))
            lists = [[e[site] for e in edits[i] if site in e] for i in members]
            flat = _selection([(rows[i].start, rows[i].count) for i in members], self.device)
            local = _selection([(offsets[i], rows[i].count) for i in members], self.device)
            counts = torch.tensor([rows[i].count for i in members])
            row_of_token = torch.repeat_interleave(torch.arange(len(members)), counts)
            row_of_token = row_of_token.to(self.device)
            passes: list[tuple[BatchEdit, tuple | None]] = []
            for j in range(max(len(x) for x in lists)):
                chosen = [x[j] if j < len(x) else self.identity for x in lists]
                key = (members, tuple(_edit_key(e) for e in chosen))
                per_token = shared.get(key)
                if per_token is None:
                    stacked = BatchEdit.stack(chosen, self.device)  # fp32 parameters
                    per_token = shared[key] = stacked.select(row_of_token)
                mask_key = None
                if per_token.window is not None:
                    mask_key = (members, id(per_token.window))
                    self._windows[mask_key] = (per_token.window, local)
                passes.append((per_token, mask_key))
            plans[site_id(site)] = SitePlan(flat, passes)
        self._plan = StepPlan(plans, {})
        if self._windows:
            self._refresh_masks(rows)


def _selection(spans: list[tuple[int, int]], device: torch.device) -> slice | torch.Tensor:
    """Flat indices of the given (start, count) spans: a slice when they are contiguous."""
    contiguous = all(a + n == b for (a, n), (b, _) in zip(spans, spans[1:]))
    if contiguous:
        return slice(spans[0][0], spans[-1][0] + spans[-1][1])
    return torch.cat([torch.arange(a, a + n) for a, n in spans]).to(device)
