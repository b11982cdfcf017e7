"""A request's steering as it rides in vLLM's `SamplingParams.extra_args`, and back.

The front end resolves and validates a request's steering against its packs (`build_row`), then
sends the *resolved* settings, not tensors: a list of small JSON objects under
`extra_args["steering"]` (method, strength, k, layers, pack, apply_to, generation_window). Each
worker rebuilds the same per-site edits with the same `build_row` against the same pack files
(`steering.vllm.packs`), once per distinct setting (cached), so a request costs a few hundred
bytes on the wire whatever the method.

Prefix caching: vLLM caches KV blocks by token ids, including blocks filled by generated tokens,
so a later request whose prompt extends a steered conversation could reuse KV computed under
steering. A steered request therefore carries a `cache_salt` derived from its settings: requests
with equal steering share cached blocks, unsteered requests share theirs, and the two never mix.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from steering.interventions.conditions import pending
from steering.interventions.methods import (
    RowSteering,
    Steering,
    SteeringError,
    SteeringSpec,
    build_row,
    compose,
)
from steering.packs.format import SteeringPack

KEY = "steering"  # the extra_args key
FIELDS = ("method", "strength", "k", "layers", "pack", "apply_to", "generation_window")


def encode(steering: Steering | None) -> list[dict[str, Any]] | None:
    """The wire form of a resolved steering (None when it edits nothing)."""
    if steering is None:
        return None
    if pending(steering):
        raise ValueError("decide the conditions first (server.engine.vllm_engine): the plugin "
                         "applies parts, it does not score prompts")
    # a part whose condition did not hold is not sent; one that held is sent as a plain part
    parts = [p for p in steering.parts if p.spec.method != "none" and p.active]
    if not parts:
        return None
    out = []
    for part in parts:
        s = part.spec
        out.append({
            "method": s.method, "strength": float(s.strength), "k": s.k,
            "layers": list(s.layers) if s.layers is not None else None, "pack": s.pack,
            "apply_to": s.apply_to,
            "generation_window": (list(s.generation_window)
                                  if s.generation_window is not None else None),
        })
    return out


def extra_args(steering: Steering | None) -> dict[str, Any]:
    """`SamplingParams.extra_args` entries for `steering` (empty when unsteered)."""
    wire = encode(steering)
    return {} if wire is None else {KEY: wire}


def cache_salt(steering: Steering | None) -> str | None:
    """The prefix-cache salt of a steered request (None: unsteered, share the plain cache)."""
    wire = encode(steering)
    if wire is None:
        return None
    return "steering:" + hashlib.sha256(canonical(wire).encode()).hexdigest()[:32]


def canonical(wire: Sequence[Mapping[str, Any]]) -> str:
    """A stable text key of a wire form (for caches)."""
    return json.dumps(list(wire), sort_keys=True, separators=(",", ":"))


def decode(wire: Sequence[Mapping[str, Any]], packs: Mapping[str, SteeringPack],
           default_pack: str | None = None) -> Steering:
    """Rebuild the per-site edits of a wire form against `packs` (name → pack)."""
    if not isinstance(wire, (list, tuple)) or not wire:
        raise SteeringError("extra_args.steering must be a non-empty list of steering objects")
    rows: list[RowSteering] = []
    for i, obj in enumerate(wire):
        if not isinstance(obj, Mapping) or set(obj) - set(FIELDS):
            raise SteeringError(f"extra_args.steering[{i}] must be an object with fields "
                                f"{', '.join(FIELDS)}")
        name = obj.get("pack") or default_pack
        pack = packs.get(name) if name is not None else None
        if name is not None and pack is None:
            raise SteeringError(f"no steering pack named {name!r} is loaded in the vLLM worker "
                                f"(loaded: {', '.join(sorted(packs)) or 'none'})",
                                "steering.pack")
        window = obj.get("generation_window")
        spec = SteeringSpec(
            method=obj.get("method", "none"), strength=float(obj.get("strength", 1.0)),
            k=obj.get("k"),
            layers=tuple(obj["layers"]) if obj.get("layers") is not None else None,
            pack=name, apply_to=obj.get("apply_to"),
            generation_window=tuple(window) if window is not None else None)
        try:
            rows.append(build_row(spec, pack))
        except SteeringError as exc:
            raise exc.at(i) from None
    return compose(rows)
