"""The steering object on the wire: one pydantic schema for the server's request body and the
clients (torch-free), and its echo as applied (`AppliedSteering`).

The server's protocol (`server.api.protocol`) takes these models as they are; the Python client
(`clients.steering_client`) subclasses them with a positional `method`. Unknown fields are refused
(a typo in a steering object must not pass silently) and numbers must be finite. `to_spec` gives
the library's `SteeringSpec`; what depends on a pack (layers, k) is checked by `build_row`.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_serializer
from pydantic_core import PydanticCustomError

from steering.catalog import CONTROLS, METHODS
from steering.interventions.spec import Condition, SteeringSpec

MAX_LAYERS = 256  # entries in `layers` (more than any served model has)
MAX_VECTOR_CHARS = 16 * 4 * 16384 * 4 // 3 + 4  # base64 of a 16 × 16384 float32 basis
TOO_MANY = "too_many_items"  # the error type of a list past its bound (servers map it to a code)


def at_most(limit: int, what: str = "entries") -> BeforeValidator:
    """Refuse a list (or mapping) longer than `limit` before its items are validated: pydantic's
    own `max_length` counts after validating every item, so a 300 KB list would cost its full
    validation before being refused."""
    def check(value: Any) -> Any:
        if isinstance(value, list | dict) and len(value) > limit:
            raise PydanticCustomError(TOO_MANY, "at most {limit} {what} are allowed, got {n}",
                                      {"limit": limit, "what": what, "n": len(value)})
        return value
    return BeforeValidator(check)


class ConditionObject(BaseModel):
    """`when`: apply the steering object only if the prompt's score on a pack's DiM axis
    (harmless mean 0, harmful mean 1) is above / below a threshold; exactly one of the two
    (checked by the library)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    pack: str | None = Field(None, max_length=128, description="pack whose DiM axis scores the "
                                                                "prompt (default: the steering "
                                                                "object's pack)")
    layer: int | None = Field(None, description="layer read (default: the pack's)")
    above: float | None = None
    below: float | None = None

    def to_condition(self) -> Condition:
        return Condition(pack=self.pack, layer=self.layer, above=self.above, below=self.below)


class VectorObject(BaseModel):
    """`vector`: the steering object's own vector instead of a pack's
    (`steering.interventions.raw`): actadd adds it, ablate projects out its direction, the INLP
    methods take an orthonormal basis [k, d]. Needs the key's raw-vector grant."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    data: str = Field(..., max_length=MAX_VECTOR_CHARS,
                      description="little-endian float32 values, base64-encoded")
    shape: Annotated[list[int] | None, at_most(2, "shape dimensions")] = Field(
        None, min_length=1, max_length=2, description="[d] or [k, d] (default: from the data)")
    layer: int | None = Field(None, description="actadd: its default layer; INLP: the layer "
                                                "the basis edits (required)")


class MonitorObject(BaseModel):
    """One monitor of a completion, scored per generated token
    (`steering.interventions.monitors`): a pack's DiM axis at a layer (harmless mean 0, harmful
    mean 1), or the caller's own probe, `vector` (weights w, with its `layer`) and `bias` b,
    scored w·h + b."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    pack: str | None = Field(None, max_length=128, description="pack whose axis is read")
    layer: int | None = Field(None, description="layer read (default: the pack's)")
    name: str | None = Field(None, max_length=128, description="label in the response "
                                                               "(default: pack, or pack@layer)")
    vector: VectorObject | None = Field(None, description="instead of a pack: the probe's "
                                                          "weights [d] (vector.layer: where)")
    bias: float = Field(0.0, description="the probe's bias (with vector)")


MonitorValue = list[str | MonitorObject]  # pack names, or objects


class SteeringObject(BaseModel):
    """The intervention for a request. Omitted fields take the method's defaults."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    method: str = Field("none", max_length=64, description=", ".join(METHODS))
    strength: float = Field(1.0, description="scale of the edit (1 = the method as published); "
                                             "bounds are configured")
    k: int | None = Field(None, description="leading INLP directions (INLP methods only)")
    layers: Annotated[list[int] | None, at_most(MAX_LAYERS, "layers")] = Field(
        None, max_length=MAX_LAYERS, description="layers to edit (default: the method's; "
                                                  "each at most once)")
    pack: str | None = Field(None, max_length=128,
                             description="pack name (default: the model's pack)")
    apply_to: Literal["all", "prompt", "generation"] | None = Field(
        None, description=CONTROLS["apply_to"])
    generation_window: Annotated[list[int | None] | None, at_most(2, "window bounds")] = Field(
        None, min_length=1, max_length=2, description=CONTROLS["generation_window"])
    when: ConditionObject | None = Field(None, description=CONTROLS["when"])
    vector: VectorObject | None = Field(None, description="the object's own vector instead of "
                                                          "a pack's (needs the raw-vector grant)")

    def to_spec(self, pack: str | None) -> SteeringSpec:
        """The library's spec; `pack` is the pack it runs on (this object's, or the default)."""
        window = self.generation_window
        return SteeringSpec(method=self.method, strength=float(self.strength), k=self.k,
                            layers=tuple(self.layers) if self.layers is not None else None,
                            pack=pack, apply_to=self.apply_to,
                            generation_window=tuple(window) if window is not None else None,
                            when=self.when.to_condition() if self.when is not None else None)


SteeringValue = SteeringObject | list[SteeringObject]  # one object, or a request's list


# ---- the steering as applied (echoed in responses, read by the policy and the audit log) --------


class ConditionResult(BaseModel):
    score: float  # the prompt on the pack's DiM axis (harmless mean 0, harmful mean 1)
    applied: bool


class AppliedSteering(BaseModel):
    """What was actually applied (defaults resolved; a condition once decided at prefill)."""

    method: str
    strength: float
    k: int | None = None
    layers: list[int] | None = None
    pack: str | None = None
    preset: str | None = None
    apply_to: str = "all"
    generation_window: list[int | None] | None = None
    when: dict[str, Any] | None = None
    condition: ConditionResult | None = None
    vector: dict[str, Any] | None = None  # a raw vector: sha256, norm, shape, layer

    # Controls left at their defaults are left out of the JSON (an untargeted, unconditional
    # object reads as it always did).
    DEFAULTS: ClassVar[dict[str, Any]] = {"apply_to": "all", "generation_window": None,
                                          "when": None, "condition": None, "vector": None}

    @model_serializer(mode="wrap")
    def _omit_defaults(self, handler):
        data = handler(self)
        for name, default in self.DEFAULTS.items():
            if name in data and data[name] == default and not (name == "condition"
                                                               and self.when is not None):
                data.pop(name)
        return data


Applied = AppliedSteering | list[AppliedSteering]  # one object, or a request's list
