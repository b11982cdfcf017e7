"""Per-token monitors: read the residual stream's position on a pack's DiM axis while it answers.

A monitor is a linear readout of one layer's input, t(h) = w·h + b. A pack's monitor is its axis
at a layer (default: the pack's layer), scored as conditions score a prompt
(`steering.interventions.conditions.dim_position`):

    t(h) = (h − μ⁻)·r / ‖r‖²,   r = μ⁺ − μ⁻  (the pack's class means at its read position)

so 0 is the negative (harmless) class mean and 1 the positive (harmful) one (Arditi et al. 2024
eq. 1 for r; Lee et al. 2024 read a condition vector the same way): w = r/‖r‖², b = −μ⁻·w. A
caller's own probe (`vector_monitor`) is any w and b, e.g. a logistic regression fitted on
captured activations (its logit). Generated token i is scored
at the position whose output it is: the last prompt position for token 0, the input position of
token i − 1 for token i — the residual the model had when it chose the token.

`MonitorHooks` (one per model, `monitors_of(lm)`) registers a read-only pre-hook on the block of
each monitored layer, after the steering hooks (`hooks_of(lm)`), so it reads the stream the block
reads, steering edits at that input included. Like the steering hooks it takes the current batch's
rows (`set_rows`: each row's monitors, or none); after a forward, `take()` gives each row's scores
at the forward's last position. The hook never writes: a monitored row computes, bit for bit,
what it computes without the monitor. Its cost per forward is one [B, M, d] product per monitored
layer (M: the batch's distinct monitors there), in float64 as `dim_position` computes.

`score_positions(lm, ids, monitors)` is the library's offline form: every position of a token
sequence scored by every monitor (the inspect heatmap uses it with one monitor per layer).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from steering.interventions.hooks import hooks_of
from steering.interventions.spec import SteeringError
from steering.packs.format import SteeringPack


@dataclass(frozen=True, eq=False)
class Monitor:
    """One linear readout of the stream entering block `layer`: t(h) = w·h + b. A pack's axis is
    w = r / ‖r‖², b = −μ⁻·w (`monitor_of`); a caller's own probe is any w, b (`vector_monitor`).
    `name` labels it in responses."""

    name: str
    pack: str  # the pack's name, or "vector:<sha256[:12]>" for a caller's own vector
    layer: int
    position: int | None  # the pack's read position its means come from (None: a vector)
    weight: torch.Tensor  # [d] float64
    bias: float

    def describe(self) -> dict:
        return {"name": self.name, "pack": self.pack, "layer": self.layer,
                "position": self.position}


def monitor_of(pack: SteeringPack, layer: int | None = None, name: str | None = None,
               param: str = "monitor") -> Monitor:
    """The monitor of `pack`'s axis at `layer` (default: the pack's layer): harmless mean 0,
    harmful mean 1. `param` names the field in errors."""
    layer = pack.layer if layer is None else layer
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < pack.n_layers:
        raise SteeringError(f"{param}.layer must be between 0 and {pack.n_layers - 1}, got "
                            f"{layer!r}", f"{param}.layer")
    p = pack.positions.index(pack.position)
    mu_h, mu_l = pack.mean_harmful[layer, p].double(), pack.mean_harmless[layer, p].double()
    r = mu_h - mu_l
    weight = r / (r @ r).clamp_min(1e-30)
    default = pack.name if layer == pack.layer else f"{pack.name}@{layer}"
    return Monitor(name or default, pack.name, layer, pack.position, weight,
                   float(-(mu_l @ weight)))


def vector_monitor(weight: torch.Tensor, layer: int, n_layers: int, bias: float = 0.0,
                   name: str | None = None, label: str = "vector",
                   param: str = "monitor") -> Monitor:
    """A caller's own linear probe at `layer`: t(h) = w·h + b (e.g. a logistic regression's
    logit; with w = r/‖r‖², b = −μ⁻·w it is a pack's normalised axis)."""
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers:
        raise SteeringError(f"{param}.vector.layer must be between 0 and {n_layers - 1}, got "
                            f"{layer!r}", f"{param}.vector.layer")
    return Monitor(name or label, label, layer, None, weight.double().reshape(-1), float(bias))


MonitorSet = tuple[Monitor, ...]  # one row's monitors, in the order its scores are reported


@dataclass
class _LayerPlan:
    """The batch's distinct monitors at one layer, stacked: t = W h + b."""

    monitors: list[Monitor]
    weight: torch.Tensor  # [M, d] float64
    bias: torch.Tensor  # [M] float64

    @staticmethod
    def of(monitors: list[Monitor], device: torch.device) -> _LayerPlan:
        w = torch.stack([m.weight for m in monitors]).double().to(device)
        b = torch.tensor([m.bias for m in monitors], dtype=torch.float64, device=device)
        return _LayerPlan(monitors, w, b)

    def score(self, h: torch.Tensor) -> torch.Tensor:
        """h [B, d] → [B, M] (a new tensor; h is only read). A product and a sum over d per
        row and monitor: a row's score does not depend on the other rows."""
        return (h.double()[:, None, :] * self.weight[None]).sum(-1) + self.bias


class MonitorHooks:
    """Read-only hooks that score each row's monitors at the last position of every forward."""

    def __init__(self, lm):
        hooks_of(lm)  # the steering pre-hooks first: a monitor reads the input as edited
        self.blocks = lm.layout.blocks
        self.device = lm.device
        self._handles: dict[int, object] = {}
        self._plans: dict[int, _LayerPlan] = {}
        self._rows: tuple[MonitorSet, ...] | None = None
        self._where: list[list[tuple[int, int]]] = []  # per row: (layer, column) per monitor
        self._scores: dict[int, torch.Tensor] = {}

    def set_rows(self, rows: Sequence[MonitorSet | None] | None) -> None:
        """Score these rows' monitors in the next forwards (None, or rows without monitors:
        nothing is read)."""
        rows = tuple(tuple(r or ()) for r in rows) if rows is not None else None
        if rows is not None and not any(rows):
            rows = None
        if rows == self._rows:  # Monitor compares by identity: the decode loop's common case
            self._scores = {}
            return
        self._rows, self._scores, self._plans, self._where = rows, {}, {}, []
        if rows is None:
            return
        by_layer: dict[int, list[Monitor]] = {}
        for row in rows:
            where = []
            for m in row:
                column = next((i for i, x in enumerate(by_layer.setdefault(m.layer, []))
                               if x is m), None)
                if column is None:
                    column = len(by_layer[m.layer])
                    by_layer[m.layer].append(m)
                where.append((m.layer, column))
            self._where.append(where)
        for layer, monitors in by_layer.items():
            self._plans[layer] = _LayerPlan.of(monitors, self.device)
            if layer not in self._handles:
                self._handles[layer] = self.blocks[layer].register_forward_pre_hook(
                    self._hook(layer), with_kwargs=True)

    def _hook(self, layer: int):
        def hook(module, args, kwargs):
            plan = self._plans.get(layer)
            if plan is None:
                return None
            h = args[0] if args else kwargs["hidden_states"]
            if self._rows is None or h.shape[0] != len(self._rows):
                return None  # a forward that is not the monitored batch's
            self._scores[layer] = plan.score(h[:, -1, :].detach())
            return None

        return hook

    def take(self) -> list[list[float]] | None:
        """Each row's monitor scores at the last forward's last position, in its monitors'
        order (an empty list for a row without monitors); None when nothing was monitored."""
        if self._rows is None or not self._scores:
            return None
        values = {layer: s.tolist() for layer, s in self._scores.items()}
        self._scores = {}
        out = []
        for b, where in enumerate(self._where):
            out.append([values[layer][b][col] if layer in values else float("nan")
                        for layer, col in where])
        return out

    @property
    def active(self) -> bool:
        return self._rows is not None

    def remove(self) -> None:
        for handle in self._handles.values():
            handle.remove()
        self._handles, self._plans, self._rows = {}, {}, None


def monitors_of(lm, create: bool = True) -> MonitorHooks | None:
    """`lm`'s monitor hooks (attached on first use; `create=False`: None until then)."""
    hooks = lm.__dict__.get("_monitor_hooks")
    if hooks is None and create:
        hooks = MonitorHooks(lm)
        lm.__dict__["_monitor_hooks"] = hooks
    return hooks


@torch.inference_mode()
def residual_stream(lm, ids: Sequence[int], layers: Sequence[int] | None = None
                    ) -> torch.Tensor:
    """The residual stream entering each of `layers` (default: every block) at every position of
    one token sequence, unsteered: float32 [len(layers), T, d] on the CPU."""
    layers = list(range(lm.n_layers)) if layers is None else list(layers)
    captured: dict[int, torch.Tensor] = {}

    def capture(layer: int):
        def hook(module, args, kwargs):
            captured[layer] = (args[0] if args else kwargs["hidden_states"])[0].float().cpu()
        return hook

    hooks_of(lm).set_rows(None)
    handles = [lm.layout.blocks[layer].register_forward_pre_hook(capture(layer),
                                                                 with_kwargs=True)
               for layer in sorted(set(layers))]
    try:
        input_ids = torch.tensor([list(ids)], device=lm.device)
        lm.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                 position_ids=torch.arange(input_ids.shape[1], device=lm.device)[None],
                 use_cache=False, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    return torch.stack([captured[layer] for layer in layers])


def score_positions(lm, ids: Sequence[int], monitors: Sequence[Monitor]) -> torch.Tensor:
    """Every position of `ids` on every monitor's axis, unsteered: float64 [M, T]."""
    layers = sorted({m.layer for m in monitors})
    stream = residual_stream(lm, ids, layers)
    out = []
    for m in monitors:
        plan = _LayerPlan.of([m], torch.device("cpu"))
        out.append(plan.score(stream[layers.index(m.layer)])[:, 0])
    return torch.stack(out)
