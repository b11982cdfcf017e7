"""Monitors in completions: the request's `monitor` field → the engine's per-row monitors, and
their scores → the response (per token, mean and max per choice) and the stream chunks (the
scores of the chunk's tokens).

    "monitor": ["refusal", {"pack": "casual", "layer": 12, "name": "casual12"},
                {"vector": {"data": "<base64 float32 [d]>", "layer": 12}, "bias": -0.3,
                 "name": "probe"}]

Each entry reads a loaded pack's DiM axis (default layer: the pack's), normalised so the
harmless mean is 0 and the harmful mean 1 (`steering.interventions.monitors`), or the caller's
own linear probe, scored w·h + b (its weights checked like a raw steering vector: shape, finite,
`STEER_MAX_VECTOR_NORM`; reading changes nothing, so no grant is needed). A name is the pack's,
`pack@layer` off its layer, `vector:<sha256[:12]>`, or the entry's `name`. The validation step
(`server.api.validation.validate`) resolves them with the rest of the request; a key whose policy
limits `packs` may monitor only those packs (`server.security.policy.check_monitors`, at
admission). In a response each choice carries

    "monitor": {"refusal": {"pack": "refusal", "layer": 16, "tokens": [0.12, …], "mean": …,
                            "max": …}, …}

(`tokens[i]`: generated token i, scored at the position whose output it is) and each stream chunk
that carries tokens carries `"monitor": {"refusal": [scores of its tokens], …}`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from server.api.protocol import MAX_MONITORS
from server.errors import ErrorCode, bad_request, not_found
from server.state import ServerState
from steering.interventions.monitors import Monitor, MonitorSet, monitor_of, vector_monitor
from steering.interventions.raw import decode_vector
from steering.interventions.schema import MonitorObject
from steering.interventions.spec import SteeringError


def resolve_monitors(state: ServerState, entries: Sequence[str | MonitorObject] | None
                     ) -> MonitorSet:
    """The request's monitors, checked against the loaded packs (the validation step calls it;
    the key's pack list is the policy's, `server.security.policy.check_monitors`)."""
    if not entries:
        return ()
    if not getattr(state.engine, "reads_stream", False):
        raise bad_request("this server's engine does not read the stream (monitors need the "
                          "native engine)", "monitor", ErrorCode.UNSUPPORTED_ENGINE)
    if len(entries) > MAX_MONITORS:
        raise bad_request(f"monitor may hold at most {MAX_MONITORS} entries, got "
                          f"{len(entries)}", "monitor", ErrorCode.TOO_MANY_MONITORS)
    out: list[Monitor] = []
    for i, entry in enumerate(entries):
        where = f"monitor[{i}]"
        obj = MonitorObject(pack=entry) if isinstance(entry, str) else entry
        if (obj.pack is None) == (obj.vector is None):
            raise bad_request("a monitor reads a pack or a vector (exactly one)", where,
                              ErrorCode.INVALID_MONITOR)
        if obj.vector is not None:
            out.append(_vector_monitor(state, obj, where))
            continue
        pack = state.packs.get(obj.pack)
        if pack is None:
            known = ", ".join(sorted(state.packs)) or "none loaded"
            raise not_found(f"unknown steering pack {obj.pack[:80]!r}; loaded packs: {known}",
                            f"{where}.pack" if not isinstance(entry, str) else where,
                            ErrorCode.PACK_NOT_FOUND)
        try:
            out.append(monitor_of(pack, obj.layer, obj.name, param=where))
        except SteeringError as exc:
            raise bad_request(str(exc), exc.param, ErrorCode.INVALID_MONITOR) from None
    names = [m.name for m in out]
    if len(set(names)) != len(names):
        raise bad_request(f"monitor names must be unique, got {names} (give a 'name')",
                          "monitor", ErrorCode.DUPLICATE_MONITOR)
    return tuple(out)


def _vector_monitor(state: ServerState, obj: MonitorObject, where: str) -> Monitor:
    """The caller's own probe: checked like a raw steering vector (shape, finite, norm)."""
    vector = obj.vector
    layer = vector.layer if vector.layer is not None else obj.layer
    if layer is None:
        raise bad_request("a vector monitor needs its layer (vector.layer)",
                          f"{where}.vector.layer", ErrorCode.INVALID_MONITOR)
    lm = state.lm
    try:
        weight, digest = decode_vector(vector.data, vector.shape, lm.d_model, "monitor",
                                       state.settings.max_vector_norm, f"{where}.vector")
        return vector_monitor(weight, layer, lm.n_layers, obj.bias, obj.name,
                              f"vector:{digest[:12]}", where)
    except SteeringError as exc:
        raise bad_request(str(exc), exc.param, ErrorCode.INVALID_MONITOR) from None


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def summary(monitors: MonitorSet, scores: list[list[float]], digits: int = 6) -> dict | None:
    """One choice's monitor field: per monitor its tokens' scores, mean and max."""
    if not monitors:
        return None
    out = {}
    for j, m in enumerate(monitors):
        values = [round(s[j], digits) for s in scores]
        finite = [v for v in values if math.isfinite(v)]
        out[m.name] = {"pack": m.pack, "layer": m.layer, "tokens": [_finite(v) for v in values],
                       "mean": round(sum(finite) / len(finite), digits) if finite else None,
                       "max": max(finite) if finite else None}
    return out


def delta(monitors: MonitorSet, scores: list[list[float]], digits: int = 6) -> dict | None:
    """A chunk's monitor field: per monitor the scores of the chunk's tokens."""
    if not monitors or not scores:
        return None
    return {m.name: [_finite(round(s[j], digits)) for s in scores]
            for j, m in enumerate(monitors)}
