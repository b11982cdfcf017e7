"""Attach the kernel to a model's residual stream.

`SteeringHooks` registers its hooks once (a pre-hook on every block's input, forward hooks on the
attention and MLP writers, and a pre-hook on the model that reads each forward's position ids) and
reads the current batch's per-row edits, which the caller swaps with `set_rows` before each
forward. Rows follow the batch dimension of the forward.

A row is a `RowSteering` or a `ComposedSteering` (a list): at each site the row's active parts'
edits run in list order, so a batch becomes a short sequence of kernel passes per site — pass j
applies every row's j-th edit there (rows with fewer edits get the exact identity).

Targeted edits (apply_to, generation_window) need each position's token index: the forward's
position id minus (the row's prompt length − 1), so the last prompt position is 0 and generated
token i enters at i (kernel.py). Callers pass the prompt lengths with the rows; the position ids
come from the forward itself, so prefill chunks and decode steps are handled alike.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from steering.interventions.kernel import (
    BatchEdit,
    RowEdit,
    apply_edit,
    project_out,
    window_mask,
)
from steering.interventions.methods import Site, Steering
from steering.models.layers import ResidualLayout


class SteeringHooks:
    def __init__(self, layout: ResidualLayout, device: torch.device, dtype: torch.dtype,
                 d_model: int, root: nn.Module | None = None):
        self.layout = layout
        self.device, self.d_model = device, d_model
        self.model_dtype = dtype  # the residual stream's dtype; the edits stay fp32
        self.dtype = torch.float32
        self._passes: dict[Site, list[BatchEdit]] = {}
        self._plain: dict[Site, torch.Tensor] = {}  # sites whose one pass is a plain projection
        self._key: tuple | None = None
        self._identity: RowEdit | None = None
        self._offsets: torch.Tensor | None = None  # [B] prompt length − 1, for targeted rows
        self._token_index: torch.Tensor | None = None  # [B, T] of the current forward
        self._masks: dict[int, torch.Tensor] = {}  # per window tensor, this forward
        self._handles = []
        if root is not None:
            self._handles.append(root.register_forward_pre_hook(self._positions_hook,
                                                                with_kwargs=True))
        for layer, block in enumerate(layout.blocks):
            self._handles.append(block.register_forward_pre_hook(
                self._input_hook(layer), with_kwargs=True))
            self._handles.append(layout.attn_writer(layer).register_forward_hook(
                self._output_hook((layer, "attn"))))
            self._handles.append(layout.mlp_writer(layer).register_forward_hook(
                self._output_hook((layer, "mlp"))))

    # ---- the batch's edits -----------------------------------------------------------------

    def set_rows(self, rows: Sequence[Steering] | None,
                 prompt_lengths: Sequence[int] | None = None) -> None:
        """Use these rows' edits for the next forwards (None or all-`none`: no edit at all).
        `prompt_lengths[b]` (tokens in row b's prompt) is needed when a row is targeted."""
        lengths = tuple(prompt_lengths) if prompt_lengths is not None else None
        key = None if rows is None else tuple(rows)
        if lengths == (self._key or (None, None))[1] and self._same_rows(key):
            return  # same rows as the last forward (the decode loop's common case)
        self._key = (key, lengths)  # holds the rows, so their ids cannot be reused while cached
        self._passes, self._offsets, self._token_index, self._masks = {}, None, None, {}
        self._plain = {}
        if not rows:
            return
        per_row = [[p.edits for p in r.parts if p.active and p.edits] for r in rows]
        sites = sorted({site for parts in per_row for edits in parts for site in edits})
        if not sites:
            return
        if self._identity is None:
            self._identity = RowEdit.identity(self.d_model)
        targeted = False
        for site in sites:
            lists = [[e for edits in parts if (e := edits.get(site)) is not None]
                     for parts in per_row]
            self._passes[site] = [
                BatchEdit.stack([edits[j] if j < len(edits) else self._identity
                                 for edits in lists], self.device)  # fp32 kernel
                for j in range(max(len(edits) for edits in lists))]
            targeted |= any(p.window is not None for p in self._passes[site])
            if len(self._passes[site]) == 1 and self._passes[site][0]._projection is not None:
                self._plain[site] = self._passes[site][0]._projection
        if targeted:  # equal windows share one tensor, so each forward computes its mask once
            shared: dict[tuple, torch.Tensor] = {}
            for passes in self._passes.values():
                for p in passes:
                    if p.window is not None:
                        p.window = shared.setdefault(tuple(map(tuple, p.window.tolist())),
                                                     p.window)
            if lengths is None or len(lengths) != len(rows):
                self._passes, self._plain = {}, {}
                raise ValueError("targeted steering (apply_to, generation_window) needs the "
                                 "prompt length of every row")
            self._offsets = torch.tensor([n - 1 for n in lengths], device=self.device)

    def _same_rows(self, key: tuple | None) -> bool:
        old = self._key[0] if self._key is not None else None
        if key is old:
            return True
        return (key is not None and old is not None and len(key) == len(old)
                and all(a is b for a, b in zip(key, old)))

    @contextmanager
    def rows(self, rows: Sequence[Steering] | None,
             prompt_lengths: Sequence[int] | None = None) -> Iterator[None]:
        self.set_rows(rows, prompt_lengths)
        try:
            yield
        finally:
            self.set_rows(None)

    @property
    def active(self) -> bool:
        return bool(self._passes)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._passes, self._plain = {}, {}

    # ---- hooks ---------------------------------------------------------------------------------

    def _positions_hook(self, module, args, kwargs):
        if self._offsets is None:
            return None
        positions = kwargs.get("position_ids")
        if positions is None or positions.ndim != 2:
            raise RuntimeError("targeted steering needs the forward's position_ids [B, T]")
        self._token_index = positions.to(self.device) - self._offsets[:, None]
        self._masks = {}
        return None

    def _mask(self, edit: BatchEdit) -> torch.Tensor | None:
        if edit.window is None:
            return None
        if self._token_index is None:
            raise RuntimeError("targeted steering needs the forward's position_ids [B, T]")
        mask = self._masks.get(id(edit.window))
        if mask is None:
            mask = self._masks[id(edit.window)] = window_mask(edit.window, self._token_index)
        return mask

    def _apply(self, site: Site, h: torch.Tensor) -> torch.Tensor:
        passes = self._passes.get(site)
        return h if passes is None else self._run(passes, site, h)

    def _run(self, passes: list[BatchEdit], site: Site, h: torch.Tensor) -> torch.Tensor:
        if h.shape[0] != passes[0].alpha.shape[0]:
            raise RuntimeError(f"steering rows ({passes[0].alpha.shape[0]}) do not match the "
                               f"batch ({h.shape[0]}) at layer {site[0]}")
        x = h if h.dtype == torch.float32 else h.float()
        for edit in passes:  # list order: each part edits the previous one's output
            x = apply_edit(x, edit, mask=None if edit.window is None else self._mask(edit))
        return x if x.dtype == h.dtype else x.to(h.dtype)

    def _input_hook(self, layer: int):
        site = (layer, "input")

        def hook(module, args, kwargs):
            if site not in self._passes:
                return None
            if args:
                return (self._apply(site, args[0]), *args[1:]), kwargs
            kwargs = dict(kwargs)
            kwargs["hidden_states"] = self._apply(site, kwargs["hidden_states"])
            return args, kwargs

        return hook

    def _output_hook(self, site: Site):
        def hook(module, args, output):
            q = self._plain.get(site)  # the common case (ablation), with the least Python
            if q is not None:
                # A writer returns its output alone (an MLP) or first in a tuple (attention).
                y = output[0] if isinstance(output, tuple) else output
                if (isinstance(y, torch.Tensor) and y.dtype == torch.float32
                        and y.shape[0] == q.shape[0]):
                    y = project_out(y, q)
                    return (y, *output[1:]) if isinstance(output, tuple) else y
            passes = self._passes.get(site)
            if passes is None:
                return None
            if isinstance(output, tuple):
                return (self._run(passes, site, output[0]), *output[1:])
            return self._run(passes, site, output)

        return hook


def hooks_of(lm) -> SteeringHooks:
    """`lm`'s steering hooks (a `LoadedModel`), attached on first use and idle until rows are
    set: the steering layer wraps the model (the model knows nothing of steering)."""
    hooks = lm.__dict__.get("_steering_hooks")
    if hooks is None:
        hooks = SteeringHooks(lm.layout, lm.device, lm.dtype, lm.d_model, lm.model)
        lm.__dict__["_steering_hooks"] = hooks
    return hooks
