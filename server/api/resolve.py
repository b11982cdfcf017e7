"""From a request's `model` and `steering` to the steering the engine applies.

The model name picks the base model or a preset (`<served-name>+<preset>`). A `steering` object in
the body overrides a one-object preset field by field; if it names another method, the preset is
dropped and the body's object is used alone (a preset's `k` would not fit another method). A list
on either side is taken whole: a body list replaces the preset, a list preset is used as it is
when the body has no steering. Each object of a list is checked alone (its errors name it,
`steering[1].strength`; `server.api.validation.check_steering`) into a `Checked`, which the
policy judges before `Checked.build` makes the list one `ComposedSteering` (tensors, off the
event loop).

A condition (`when`) is decided by the engine at prefill; `Resolved.echo(decided)` gives the
applied steering with its score, from the steering the engine reports on a choice's first event
(a text completion of several prompts echoes the first prompt's; each prompt is decided alone).
"""

from __future__ import annotations

from dataclasses import dataclass

from server.api.protocol import Applied, AppliedSteering, SteeringParams, SteeringValue
from server.errors import ErrorCode, not_found
from server.presets import Preset, split_model_name
from server.state import ServerState
from steering.interventions.methods import (
    Steering,
    SteeringSpec,
    applied,
    build_row,
    compose,
)
from steering.packs.format import SteeringPack


@dataclass
class Resolved:
    model: str  # the model id echoed back (as the client wrote it)
    preset: Preset | None
    row: Steering  # one object or a list; conditions still undecided
    applied: Applied  # what the request resolved to (a list for a list)

    def echo(self, decided: Steering | None) -> Applied:
        """The applied steering with the engine's decided conditions (None: as resolved)."""
        if decided is None or not any(p.outcome is not None for p in decided.parts):
            return self.applied
        return _applied(decided, self.preset, isinstance(self.applied, list))

    @property
    def parts(self) -> list[AppliedSteering]:
        return self.applied if isinstance(self.applied, list) else [self.applied]

    @property
    def method(self) -> str:
        """The method label of metrics: the method, or "composed" for a list."""
        return self.applied.method if not isinstance(self.applied, list) else "composed"


@dataclass(frozen=True)
class Part:
    """One steering object, checked (`steering.interventions.methods.check_spec`): its spec with
    defaults resolved and the packs it reads."""

    spec: SteeringSpec
    pack: SteeringPack | None
    when_pack: SteeringPack | None

    def applied(self) -> dict:
        """The object as applied (conditions undecided), the fields of `AppliedSteering`."""
        return applied(self.spec)


@dataclass
class Checked:
    """A request's steering, checked but not built: what the policy judges."""

    model: str
    preset: Preset | None
    parts: list[Part]
    listed: bool  # a list (echoed as one), or one object
    applied: Applied  # as declared (conditions undecided)

    def build(self) -> Resolved:
        """The kernel parameters of every object (tensors: call it off the event loop)."""
        rows = [build_row(p.spec, p.pack, p.when_pack) for p in self.parts]
        return Resolved(self.model, self.preset, compose(rows) if self.listed else rows[0],
                        self.applied)


def dump(steering: Applied) -> dict | list[dict]:
    """The applied steering as JSON data (log lines)."""
    if isinstance(steering, list):
        return [a.model_dump() for a in steering]
    return steering.model_dump()


def _applied(row: Steering, preset: Preset | None, listed: bool) -> Applied:
    name = preset.name if preset else None
    parts = [AppliedSteering(**p.applied(), preset=name) for p in row.parts]
    return parts if listed else parts[0]


def resolve_model(state: ServerState, model: str | None) -> tuple[str, Preset | None]:
    served = state.served_name
    if model is None or model == "":
        return served, None
    aliases = {served.lower()}
    if state.lm is not None:  # also the name the operator gave (e.g. "embedded")
        aliases |= {state.lm.name.lower(), str(state.lm.model_id).lower()}
    if model.lower() in aliases:
        return model, None
    base, preset_name = split_model_name(model)
    if preset_name is not None and base.lower() in aliases:
        preset = state.presets.get(preset_name)
        if preset is None:
            known = ", ".join(sorted(state.presets)) or "none configured"
            raise not_found(f"unknown preset {preset_name!r} in model {model!r}; presets: "
                            f"{known}", "model", ErrorCode.PRESET_NOT_FOUND)
        return model, preset
    raise not_found(f"the model {model!r} does not exist; this server serves {served!r} and "
                    f"its presets ('{served}+<preset>', see GET /v1/models)",
                    "model", ErrorCode.MODEL_NOT_FOUND)


def merge(preset: Preset | None, body: SteeringValue | None
          ) -> list[tuple[SteeringParams, bool]]:
    """The request's steering objects, each with whether it takes the preset's calibrated
    strength."""
    if preset is None:
        parts = body if isinstance(body, list) else [body or SteeringParams()]
        return [(p, False) for p in parts]
    if body is None:
        return [(p, preset.is_calibrated(i)) for i, p in enumerate(preset.parts)]
    if isinstance(body, list) or isinstance(preset.steering, list):
        return [(p, False) for p in (body if isinstance(body, list) else [body])]
    given = body.model_fields_set
    if "method" in given and body.method != preset.steering.method:
        return [(body, False)]
    merged = preset.steering.model_copy(update={f: getattr(body, f) for f in given})
    return [(merged, preset.calibrated and "strength" not in given)]
