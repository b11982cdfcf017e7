"""Attach the kernel to a model's residual stream.

`SteeringHooks` registers its hooks once (a pre-hook on every block's input, forward hooks on the
attention and MLP writers) and reads the current batch's per-row edits, which the caller swaps
with `set_rows` before each forward. Rows follow the batch dimension of the forward.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from steering.interventions.kernel import BatchEdit, RowEdit, apply_edit
from steering.interventions.methods import RowSteering, Site
from steering.models.layers import ResidualLayout


class SteeringHooks:
    def __init__(self, layout: ResidualLayout, device: torch.device, dtype: torch.dtype,
                 d_model: int):
        self.layout = layout
        self.device, self.d_model = device, d_model
        self.model_dtype = dtype  # the residual stream's dtype; the edits stay fp32
        self.dtype = torch.float32
        self._edits: dict[Site, BatchEdit] = {}
        self._key: tuple | None = None
        self._identity: RowEdit | None = None
        self._handles = []
        for layer, block in enumerate(layout.blocks):
            self._handles.append(block.register_forward_pre_hook(
                self._input_hook(layer), with_kwargs=True))
            self._handles.append(layout.attn_writer(layer).register_forward_hook(
                self._output_hook((layer, "attn"))))
            self._handles.append(layout.mlp_writer(layer).register_forward_hook(
                self._output_hook((layer, "mlp"))))

    # ---- the batch's edits -----------------------------------------------------------------

    def set_rows(self, rows: Sequence[RowSteering] | None) -> None:
        """Use these rows' edits for the next forwards (None or all-`none`: no edit at all)."""
        key = None if rows is None else tuple(rows)
        if key is self._key or (key is not None and self._key is not None and len(key) ==
                                len(self._key) and all(a is b for a, b in zip(key, self._key))):
            return  # same rows as the last forward (the decode loop's common case)
        self._key = key  # holds the rows, so their ids cannot be reused while cached
        self._edits = {}
        if not rows:
            return
        sites = sorted({site for r in rows for site in r.edits})
        if not sites:
            return
        if self._identity is None:
            self._identity = RowEdit.identity(self.d_model)
        for site in sites:
            per_row = [r.edits.get(site, self._identity) for r in rows]
            self._edits[site] = BatchEdit.stack(per_row, self.device)  # fp32 kernel

    @contextmanager
    def rows(self, rows: Sequence[RowSteering] | None) -> Iterator[None]:
        self.set_rows(rows)
        try:
            yield
        finally:
            self.set_rows(None)

    @property
    def active(self) -> bool:
        return bool(self._edits)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._edits = {}

    # ---- hooks ---------------------------------------------------------------------------------

    def _apply(self, site: Site, h: torch.Tensor) -> torch.Tensor:
        edit = self._edits.get(site)
        if edit is None:
            return h
        if h.shape[0] != edit.alpha.shape[0]:
            raise RuntimeError(f"steering rows ({edit.alpha.shape[0]}) do not match the "
                               f"batch ({h.shape[0]}) at layer {site[0]}")
        if h.dtype == torch.float32:
            return apply_edit(h, edit)
        return apply_edit(h.float(), edit).to(h.dtype)

    def _input_hook(self, layer: int):
        site = (layer, "input")

        def hook(module, args, kwargs):
            if site not in self._edits:
                return None
            if args:
                return (self._apply(site, args[0]), *args[1:]), kwargs
            kwargs = dict(kwargs)
            kwargs["hidden_states"] = self._apply(site, kwargs["hidden_states"])
            return args, kwargs

        return hook

    def _output_hook(self, site: Site):
        def hook(module, args, output):
            if site not in self._edits:
                return None
            if isinstance(output, tuple):
                return (self._apply(site, output[0]), *output[1:])
            return self._apply(site, output)

        return hook
