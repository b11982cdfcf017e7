"""The steering packs a vLLM worker resolves requests against, and its cache of resolved rows.

The front end names the pack files in `STEERING_VLLM_PACKS` before it starts the engine; vLLM's
processes inherit the environment, so every worker (engine core, tensor-parallel ranks) loads the
same files and rebuilds bit-identical edits. The value is a JSON object {name: path} or a single
path (the pack's own name then). A pack is loaded on the first request that uses it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from steering.interventions.methods import Steering
from steering.packs.format import SteeringPack, load_pack
from steering.vllm import wire

ENV = "STEERING_VLLM_PACKS"


def pack_paths(value: str | None = None) -> dict[str, str]:
    """{name: path} from the environment variable's value (empty when unset)."""
    value = os.environ.get(ENV, "") if value is None else value
    if not value.strip():
        return {}
    if value.lstrip().startswith("{"):
        parsed = json.loads(value)
        if not isinstance(parsed, dict) or not all(isinstance(v, str) for v in parsed.values()):
            raise ValueError(f"{ENV} must be a JSON object of pack name → path")
        return dict(parsed)
    return {"": value}  # one path; its name comes from the pack


def environment(paths: Mapping[str, str]) -> dict[str, str]:
    """The environment entry that makes vLLM's workers load `paths` ({name: path})."""
    return {ENV: json.dumps(dict(paths))}


class PackResolver:
    """Worker side: loads the named packs lazily and caches each distinct wire form's rows (the
    cache also keeps the rows' tensors alive, so the plan can key its caches on their ids)."""

    def __init__(self, paths: Mapping[str, str] | None = None, d_model: int | None = None,
                 n_layers: int | None = None):
        self._paths = dict(pack_paths() if paths is None else paths)
        self._packs: dict[str, SteeringPack] = {}
        self._rows: dict[str, Steering] = {}
        self.d_model, self.n_layers = d_model, n_layers

    @property
    def packs(self) -> dict[str, SteeringPack]:
        if self._paths:
            for name, path in list(self._paths.items()):
                pack = load_pack(path, name=name or None)
                self._check(pack)
                self._packs[pack.name] = pack
            self._paths = {}
        return self._packs

    def _check(self, pack: SteeringPack) -> None:
        if self.d_model is not None and pack.d_model != self.d_model:
            raise ValueError(f"steering pack {pack.name!r} has hidden size {pack.d_model}; the "
                             f"served model has {self.d_model}")
        if self.n_layers is not None and pack.n_layers != self.n_layers:
            raise ValueError(f"steering pack {pack.name!r} covers {pack.n_layers} layers; the "
                             f"served model has {self.n_layers}")

    def resolve(self, value: Sequence[Any]) -> Steering:
        key = wire.canonical(value)
        row = self._rows.get(key)
        if row is None:
            packs = self.packs
            default = next(iter(packs)) if len(packs) == 1 else None
            row = self._rows[key] = wire.decode(value, packs, default)
        return row
