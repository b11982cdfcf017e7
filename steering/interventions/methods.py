"""From a request's steering settings to per-site kernel parameters (the design's one table).

| method    | Q                     | c                      | α            | v                      | sites |
|-----------|-----------------------|------------------------|--------------|------------------------|-------|
| none      | –                     | –                      | 0            | 0                      | – |
| actadd    | –                     | –                      | 0            | strength · r_l         | input of layer l (default: the pack's layer) |
| ablate    | r̂                     | 0                      | strength     | 0                      | every layer: input, attention and MLP outputs |
| ace       | r̂_l                   | harmless mean μ⁻_l     | 1            | strength · ‖r_l‖ · r̂_l | input of layer l |
| inlp_null | first k INLP dirs     | boundary point         | strength     | 0                      | INLP layer(s), one-sided |
| inlp_flip | first k INLP dirs     | boundary point         | 2 · strength | 0                      | INLP layer(s), one-sided |
| inlp_reflect | first k INLP dirs  | boundary point         | 2 · strength | 0                      | INLP layer(s), two-sided |

For INLP the reference point c is the class boundary (midpoint of the class means along each
direction) and the directions point toward the harmful class, so z = Qᵀ(h − c) > 0 on the harmful
side. `inlp_null` and `inlp_flip` are one-sided (the kernel's g = relu; AlterRep, Ravfogel et al.
2021): only coordinates on the harmful side move, onto the boundary (α = 1, h' = h − Q·relu(z))
or across it (α = 2, h' = h − 2·Q·relu(z)); harmless activations are left as they are. This is
the counterfactual intervention Rocchetti & Ferrara 2026 study (toward the harmless class).
`inlp_reflect` is the two-sided reflection h' = h − 2·QQᵀ(h − c): harmful activations land among
harmless ones and harmless ones among harmful ones (it raises refusal on harmless prompts); it is
kept for the geometry study.

`strength` keeps its paper meaning (1 = the method as published). A pack may also record a
calibrated strength per method (`SteeringPack.calibrated_strength`): the value extraction
measured to reach the method's effect on the validation split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from steering.interventions.catalog import DESCRIPTIONS, INLP_METHODS, METHODS  # noqa: F401 (re-exported)
from steering.interventions.kernel import RowEdit
from steering.packs.format import SteeringPack

Site = tuple[int, str]  # (layer, "input" | "attn" | "mlp")
SITE_KINDS = ("input", "attn", "mlp")


class SteeringError(ValueError):
    """Settings that cannot be applied; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class SteeringSpec:
    method: str = "none"
    strength: float = 1.0
    k: int | None = None
    layers: tuple[int, ...] | None = None
    pack: str | None = None


@dataclass
class RowSteering:
    """One request's resolved settings and its kernel parameters per site."""

    spec: SteeringSpec
    edits: dict[Site, RowEdit] = field(default_factory=dict)

    def applied(self) -> dict:
        s = self.spec
        return {"method": s.method, "strength": s.strength, "k": s.k,
                "layers": list(s.layers) if s.layers is not None else None, "pack": s.pack}


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm().clamp_min(1e-12)


def _check_layers(layers: tuple[int, ...], allowed: list[int], what: str) -> None:
    bad = [layer for layer in layers if layer not in allowed]
    if bad:
        shown = f"{allowed[0]}–{allowed[-1]}" if len(allowed) > 3 else str(allowed)
        raise SteeringError(f"layers {bad} are not available for {what} (allowed: {shown})",
                            "steering.layers")


def layer_choice(method: str, pack: SteeringPack) -> tuple[list[int], list[int]]:
    """(allowed, default) layers of `method` on `pack` (the `sites` column of the table)."""
    if method in INLP_METHODS:
        return list(pack.inlp_layers), list(pack.inlp_default_layers)
    every = list(range(pack.n_layers))
    return every, (every if method == "ablate" else [pack.layer])


def build_row(spec: SteeringSpec, pack: SteeringPack | None) -> RowSteering:
    """Validate `spec` against `pack` and produce its per-site edits."""
    method = spec.method
    if method not in METHODS:
        raise SteeringError(f"unknown steering method {method!r}; choose one of "
                            f"{', '.join(METHODS)}", "steering.method")
    if not math.isfinite(spec.strength):
        raise SteeringError("steering strength must be a finite number", "steering.strength")
    if method == "none":
        return RowSteering(replace(spec, strength=0.0, k=None, layers=None, pack=None))
    if pack is None:
        raise SteeringError(f"method {method!r} needs a steering pack, and none is loaded",
                            "steering.pack")
    if spec.k is not None and method not in INLP_METHODS:
        raise SteeringError(f"k applies to INLP methods only, not {method!r}", "steering.k")
    if spec.layers is not None and not spec.layers:
        raise SteeringError("steering layers must not be empty (omit them for the method's "
                            "default layers)", "steering.layers")
    d = pack.d_model
    if method in INLP_METHODS and not pack.inlp:
        raise SteeringError(f"pack {pack.name!r} has no INLP directions", "steering.pack")
    allowed, default = layer_choice(method, pack)
    layers = spec.layers if spec.layers is not None else tuple(default)
    _check_layers(layers, allowed, method)
    edits: dict[Site, RowEdit] = {}
    zeros = torch.zeros(d)
    s = float(spec.strength)

    if method == "ablate":
        q = _unit(pack.dim())[:, None]
        for layer in layers:
            for kind in SITE_KINDS:
                edits[(layer, kind)] = RowEdit(q=q, c=zeros, alpha=s, v=zeros)
    elif method in ("actadd", "ace"):
        for layer in layers:
            r = pack.dim(layer)
            if method == "actadd":
                edits[(layer, "input")] = RowEdit(q=torch.zeros(d, 0), c=zeros, alpha=0.0,
                                                  v=s * r)
            else:  # ACE, Marshall et al. 2024 eq. 3: project to the harmless mean, add s·r
                r_hat = _unit(r)
                edits[(layer, "input")] = RowEdit(q=r_hat[:, None], c=pack.harmless_mean(layer),
                                                  alpha=1.0, v=s * r.norm() * r_hat)
    else:  # INLP
        k_max = min(pack.inlp[layer].count for layer in layers)
        k = spec.k if spec.k is not None else k_max
        if not 1 <= k <= k_max:
            raise SteeringError(f"k must be between 1 and {k_max} for pack {pack.name!r}, "
                                f"got {k}", "steering.k")
        alpha = s if method == "inlp_null" else 2.0 * s
        one_sided = method != "inlp_reflect"
        for layer in layers:
            inl = pack.inlp[layer]
            q = inl.directions[:k].T.contiguous()  # [d, k]
            c = q @ inl.boundary[:k]  # the boundary point inside span(Q)
            edits[(layer, "input")] = RowEdit(q=q, c=c, alpha=alpha, v=zeros,
                                              one_sided=one_sided)
        spec = replace(spec, k=k)
    resolved = replace(spec, layers=tuple(sorted(set(layers))), pack=pack.name)
    return RowSteering(resolved, edits)
