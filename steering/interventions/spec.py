"""The library's steering settings, before they meet a pack (torch-free).

`SteeringSpec` is one steering object as the library takes it; `build_row`
(`steering.interventions.methods`) validates it against a pack and produces its kernel parameters.
The wire schema of the same object (the server's request body, the clients) is
`steering.interventions.schema`.
"""

from __future__ import annotations

from dataclasses import dataclass


class SteeringError(ValueError):
    """Settings that cannot be applied; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param

    def at(self, index: int) -> SteeringError:
        """The same error for element `index` of a steering list (`steering[1].strength`)."""
        param = self.param or "steering"
        head, dot, rest = param.partition(".")
        return SteeringError(str(self), f"{head}[{index}]{dot}{rest}")


@dataclass(frozen=True)
class Condition:
    """`when`: steer only if the prompt's DiM-axis score is above (or below) a threshold."""

    pack: str | None = None  # default: the steering object's pack
    layer: int | None = None  # default: the pack's layer
    above: float | None = None
    below: float | None = None

    def describe(self) -> dict:
        side = {"above": self.above} if self.above is not None else {"below": self.below}
        return {"pack": self.pack, "layer": self.layer, **side}


@dataclass(frozen=True)
class VectorRef:
    """Which raw vector a spec carries (`steering.interventions.raw`): the SHA-256 of its
    float32 bytes, its norm (a basis: its largest row norm), shape and layer."""

    sha256: str
    norm: float
    shape: tuple[int, ...]
    layer: int | None = None

    def describe(self) -> dict:
        return {"sha256": self.sha256, "norm": self.norm, "shape": list(self.shape),
                "layer": self.layer}


@dataclass(frozen=True)
class SteeringSpec:
    method: str = "none"
    strength: float = 1.0
    k: int | None = None
    layers: tuple[int, ...] | None = None
    pack: str | None = None
    apply_to: str | None = None  # "all", "prompt", "generation"; None: "all" (or "generation"
    generation_window: tuple[int, int | None] | None = None  # with a window) [start, end)
    when: Condition | None = None
    vector: VectorRef | None = None  # a raw vector instead of a pack's (raw.py)
