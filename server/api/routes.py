"""HTTP routes besides generation: models, steering discovery, probes, metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from server.api.protocol import (
    MAX_STEERING_OBJECTS,
    AppliedSteering,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from server.api.validation import check_steering
from server.context import request_context
from server.errors import APIError, ErrorCode, not_found
from server.security.auth import may_see_internals
from server.security.policy import effect
from server.state import ServerState, get_state
from steering.catalog import APPLY_TO, CONTROLS
from steering.interventions.methods import DESCRIPTIONS, INLP_METHODS, METHODS, layer_choice

router = APIRouter()


# ---- models -------------------------------------------------------------------------------------


def _model_cards(state: ServerState) -> list[ModelCard]:
    name = state.served_name
    ctx = state.lm.context_length if state.lm is not None else None
    cards = [ModelCard(id=name, created=state.started, root=name,  # never the local path
                       context_length=ctx,
                       description="the base model (unsteered unless the request's "
                                   "`steering` says otherwise)")]
    for preset in state.presets.values():
        model_id = f"{name}+{preset.name}"
        try:  # what the preset resolves to with the loaded packs
            applied = check_steering(state, model_id, None).applied
        except APIError:  # not loaded yet: show the preset as written
            shown = [AppliedSteering(method=p.method, strength=p.strength, k=p.k,
                                     layers=p.layers, pack=p.pack, preset=preset.name)
                     for p in preset.parts]
            applied = shown if isinstance(preset.steering, list) else shown[0]
        cards.append(ModelCard(id=model_id, created=state.started, root=name,
                               context_length=ctx, description=preset.description,
                               steering=applied))
    return cards


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request):
    return ModelList(data=_model_cards(get_state(request)))


@router.get("/v1/models/{model_id:path}", response_model=ModelCard,
            responses={404: {"model": ErrorResponse}})
async def get_model(model_id: str, request: Request):
    for card in _model_cards(get_state(request)):
        if card.id == model_id:
            return card
    raise not_found(f"the model {model_id!r} does not exist", "model", ErrorCode.MODEL_NOT_FOUND)


# ---- steering discovery -------------------------------------------------------------------------


REFUSED = "refused at load; the server log has the reason"


@router.get("/v1/steering/packs")
async def list_packs(request: Request):
    """The packs. Their sidecar `meta` and why a pack was refused (which names files) are shown
    only to admin keys (or with authentication off)."""
    state = get_state(request)
    state.require_ready()
    internals = may_see_internals(request_context(request).api_key)
    data = []
    for name, pack in state.packs.items():
        info = pack.describe()
        if not internals:
            info.pop("meta", None)
        data.append({"id": name, "object": "steering.pack", "default": name == state.default_pack,
                     "status": "loaded", **info})
    failed = [{"id": name, "error": error if internals else REFUSED}
              for name, error in state.failed_packs.items()]  # refused at load (server/packs.py)
    data += [{"id": f["id"], "object": "steering.pack", "default": False, "status": "failed",
              "error": f["error"]} for f in failed]
    return {"object": "list", "data": data, "failed": failed}


@router.get("/v1/steering/methods")
async def list_methods(request: Request):
    state = get_state(request)
    s = state.settings
    packs = state.packs
    data = []
    for method in METHODS:
        entry = {"id": method, "object": "steering.method", "description": DESCRIPTIONS[method],
                 "strength": None if method == "none" else
                 {"min": s.strength_min, "max": s.strength_max, "default": 1.0},
                 "uses_k": method in INLP_METHODS, "effect": effect(method), "packs": {}}
        if method != "none":
            for name, pack in packs.items():
                if method in INLP_METHODS and not pack.inlp:
                    continue
                allowed, default = layer_choice(method, pack)
                info = {"k": {"min": 1, "max": pack.max_k()}} if method in INLP_METHODS else {}
                info.update(allowed_layers=allowed, default_layers=default)
                info["calibrated_strength"] = pack.calibrated_strength(method)
                entry["packs"][name] = info
        data.append(entry)
    return {"object": "list", "data": data, "controls": controls(state)}


def controls(state: ServerState) -> dict:
    """The fields every steering object takes besides its method's (GET /v1/steering/methods)."""
    return {
        "apply_to": {"description": CONTROLS["apply_to"], "values": list(APPLY_TO),
                     "default": "all"},
        "generation_window": {"description": CONTROLS["generation_window"],
                              "example": [0, 8]},
        "when": {"description": CONTROLS["when"],
                 "fields": {"pack": "default: the steering object's pack",
                            "layer": "default: the pack's layer",
                            "above": "threshold (give above or below)", "below": "threshold"},
                 "packs": {name: {"layer": p.layer, "position": p.position}
                           for name, p in state.packs.items()},
                 "example": {"pack": state.default_pack, "above": 0.5}},
        "list": {"description": CONTROLS["list"], "max_objects": MAX_STEERING_OBJECTS,
                 "example": [{"method": "ablate"},
                             {"method": "actadd", "strength": 1.5, "apply_to": "generation"}]},
    }


# ---- probes and metrics -------------------------------------------------------------------------


@router.get("/healthz")
@router.get("/health", include_in_schema=False)  # vLLM's name: guidellm checks it by default
async def healthz(request: Request):
    from server.lifecycle import engine_alive  # local: lifecycle imports api.errors

    engine = get_state(request).engine
    if engine is not None and not engine_alive(engine):
        return JSONResponse({"status": "engine thread stopped"}, status_code=503)
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request):
    from server.lifecycle import engine_alive  # local: lifecycle imports api.errors

    state = get_state(request)
    dead = state.engine is not None and not engine_alive(state.engine)
    if state.ready and not state.draining and not dead:
        return {"status": "ready", "model": state.served_name,
                "packs": sorted(state.packs)}
    status = "failed" if state.load_error or dead else \
        "draining" if state.draining else "loading"
    body = {"status": status}
    if state.load_error:  # the reason is in the server log, not in a public probe
        body["error"] = "the model failed to load; the server log has the details"
    elif dead:  # nothing can be served: take this replica out of the rotation
        body["error"] = "the engine thread stopped; the server log has the details"
    return JSONResponse(body, status_code=503,
                        headers={"Retry-After": str(max(state.settings.retry_after_s, 1))})


@router.get("/metrics")
async def metrics(request: Request):
    data, content_type = get_state(request).metrics.render()
    return Response(data, media_type=content_type)
