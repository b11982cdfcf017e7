"""From a request's `model` and `steering` to the RowSteering the engine applies.

The model name picks the base model or a preset (`<served-name>+<preset>`). A `steering` object in
the body overrides the preset field by field; if it names another method, the preset is dropped
and the body's object is used alone (a preset's `k` would not fit another method).
"""

from __future__ import annotations

from dataclasses import dataclass

from server.api.errors import bad_request, not_found
from server.api.presets import Preset, split_model_name
from server.api.protocol import AppliedSteering, SteeringParams
from server.state import ServerState
from steering.interventions.methods import RowSteering, SteeringError, build_row


@dataclass
class Resolved:
    model: str  # the model id echoed back (as the client wrote it)
    preset: Preset | None
    row: RowSteering
    applied: AppliedSteering


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
                            f"{known}", param="model", code="preset_not_found")
        return model, preset
    raise not_found(f"the model {model!r} does not exist; this server serves {served!r} and "
                    f"its presets ('{served}+<preset>', see GET /v1/models)",
                    param="model", code="model_not_found")


def merge(preset: Preset | None, body: SteeringParams | None) -> SteeringParams:
    if preset is None:
        return body or SteeringParams()
    if body is None:
        return preset.steering
    given = body.model_fields_set
    if "method" in given and body.method != preset.steering.method:
        return body
    return preset.steering.model_copy(update={f: getattr(body, f) for f in given})


def resolve_steering(state: ServerState, model: str | None,
                     body: SteeringParams | None) -> Resolved:
    model_id, preset = resolve_model(state, model)
    params = merge(preset, body)
    settings = state.settings
    if preset is not None and preset.calibrated and params.method == preset.steering.method \
            and (body is None or "strength" not in body.model_fields_set):
        pack = state.packs.get(params.pack or state.default_pack or "")
        calibrated = pack.calibrated_strength(params.method) if pack is not None else None
        if calibrated is not None:
            params = params.model_copy(update={"strength": calibrated})
    lo, hi = settings.strength_min, settings.strength_max  # the operator's range; the library
    if params.method != "none" and not lo <= params.strength <= hi:  # checks the rest
        raise bad_request(f"steering.strength must be between {lo:g} and {hi:g}, "
                          f"got {params.strength:g}", "steering.strength",
                          code="strength_out_of_range")
    pack_name = params.pack or state.default_pack
    pack = None
    if params.pack is not None and params.pack not in state.packs:
        known = ", ".join(sorted(state.packs)) or "none loaded"
        raise not_found(f"unknown steering pack {params.pack!r}; loaded packs: {known}",
                        "steering.pack", code="pack_not_found")
    if pack_name is not None:
        pack = state.packs.get(pack_name)
    try:
        row = build_row(params.to_spec(pack_name), pack)
    except SteeringError as exc:
        raise bad_request(str(exc), exc.param or "steering", code="invalid_steering") from None
    applied = AppliedSteering(**row.applied(), preset=preset.name if preset else None)
    return Resolved(model_id, preset, row, applied)
