"""The engine's KV cache: transformers' `DynamicCache` whose layers append in place.

`DynamicLayer.update` appends a token with `torch.cat([keys, new])`: every decode step copies
each layer's whole cache, O(B·S) bytes per layer per token (at 8 rows × 1,000 tokens on the
embedded model ≈ 200 MB per step). `GrowingLayer` keeps keys/values as views into buffers with
spare room along the sequence axis and writes the new token into that room:

    keys = buffer[:, :, :n, :]        buffer: [B, H, capacity, D],  capacity = n + ROOM (rounded)
    update(k):  buffer[:, :, n:n+t, :] = k;  keys = buffer[:, :, :n+t, :]

A copy happens only when the room runs out (every ROOM tokens) or when the engine replaces
`keys`/`values` itself (a request joins or leaves: `_merge`, `_drop_rows`), so appending is
amortized O(1) per token. The views hold the same values in the same layout per (row, head), so
attention computes exactly what it computes on the concatenated tensors.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

ROOM = 256  # tokens of spare room per reallocation


class GrowingLayer(DynamicLayer):
    def __init__(self) -> None:
        super().__init__()
        self._kbuf: torch.Tensor | None = None
        self._vbuf: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args,
               **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = self.keys.shape[-2] if self.keys.numel() else 0
        t = key_states.shape[-2]
        if not self._owns(n, t, key_states):
            self._kbuf = self._room(self.keys, n, t, key_states)
            self._vbuf = self._room(self.values, n, t, value_states)
        self._kbuf[:, :, n:n + t] = key_states
        self._vbuf[:, :, n:n + t] = value_states
        self.keys, self.values = self._kbuf[:, :, :n + t], self._vbuf[:, :, :n + t]
        return self.keys, self.values

    def _owns(self, n: int, t: int, new: torch.Tensor) -> bool:
        """keys/values are still the first n positions of our buffers, with room for t more."""
        buf = self._kbuf
        return (buf is not None and n > 0 and n + t <= buf.shape[2]
                and buf.shape[:2] == new.shape[:2] and buf.dtype == new.dtype
                and self.keys.data_ptr() == buf.data_ptr() and self.keys.stride() == buf.stride()
                and self.values.data_ptr() == self._vbuf.data_ptr())

    @staticmethod
    def _room(old: torch.Tensor, n: int, t: int, new: torch.Tensor) -> torch.Tensor:
        capacity = -(-(n + t + ROOM) // ROOM) * ROOM
        b, h, _, d = new.shape
        buf = torch.empty(b, h, capacity, d, dtype=new.dtype, device=new.device)
        if n:
            buf[:, :, :n] = old
        return buf


def new_cache() -> DynamicCache:
    """An empty cache whose layers are `GrowingLayer`s (created on first use, one per layer)."""
    cache = DynamicCache()
    cache.layer_class_to_replicate = GrowingLayer
    return cache


def cache_of(layers: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A cache over these (keys, values) per layer that never writes into them: a layer's first
    append copies into a buffer of its own (`GrowingLayer._owns` is false for a foreign tensor)."""
    cache = new_cache()
    for keys, values in layers:
        layer = GrowingLayer()
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
        cache.layers.append(layer)
    return cache


def select_row(cache: DynamicCache, i: int) -> DynamicCache:
    """Row i of `cache` as a cache of its own that shares no buffer with it (a trial forward on
    it never writes into the batch's buffers)."""
    return cache_of((layer.keys[i:i + 1], layer.values[i:i + 1]) for layer in cache.layers)
