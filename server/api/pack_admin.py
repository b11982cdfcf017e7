"""Loading and unloading packs while serving (admin keys only; `GET /v1/steering/packs` lists).

    POST   /v1/steering/packs          {"name", "safetensors": base64, "sidecar": {…}, "replace"}
    DELETE /v1/steering/packs/{name}

An upload is the two files of a pack (`NAME.safetensors` base64-encoded, `NAME.json` as a JSON
object) and goes through the loader that start-up uses (`server.packs.load_pack_bytes`): format
version, model fingerprint, hook layout, shapes, finiteness, vectors' operations, never pickle.
The body limit (`STEER_MAX_BODY_BYTES`) applies. With keys configured only a key with
`admin: true` may call these routes (403 otherwise); with authentication off (local use) they are
open like every other route. Uploads and deletions are written to the audit log. Requests that
resolved their steering before a replacement or deletion finish on the pack they started with.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from server.api.protocol import ERROR_RESPONSES, ErrorResponse
from server.api.routing import CheckedBodyRoute
from server.context import request_context
from server.errors import APIError, ErrorCode, bad_request, not_found
from server.packs import install_pack, load_pack_bytes, remove_pack
from server.security.audit import pack_event
from server.security.auth import may_see_internals
from server.security.hardening import check_name
from server.state import get_state
from steering.packs.format import PackError

router = APIRouter(route_class=CheckedBodyRoute)  # an upload's JSON is parsed once


class PackUpload(BaseModel):
    name: str = Field(description="the pack's name in requests (`steering.pack`)")
    safetensors: str = Field(description="NAME.safetensors, base64-encoded")
    sidecar: dict = Field(description="NAME.json, the pack's sidecar object")
    replace: bool = Field(False, description="replace a loaded pack of the same name")


def _require_admin(request: Request) -> None:
    key = request_context(request).api_key
    settings = get_state(request).settings
    if key is None and (settings.auth or settings.keys or settings.keys_file):
        # fail closed: keys are configured, yet the caller's key is not where we look
        raise APIError(403, "the caller's API key could not be determined",
                       type="permission_error", code=ErrorCode.NOT_ADMIN)
    if not may_see_internals(key):  # key None: authentication is off (local use)
        raise APIError(403, f"key {key.id!r} may not load or unload packs (needs 'admin: true' "
                            "in the keys file)", type="permission_error",
                       code=ErrorCode.NOT_ADMIN)


@router.post("/v1/steering/packs", status_code=201,
             responses={**ERROR_RESPONSES, 409: {"model": ErrorResponse}})
async def upload_pack(body: PackUpload, request: Request):
    state = get_state(request)
    state.require_ready()
    _require_admin(request)
    check_name(body.name, "pack", "name")
    if body.name in state.packs and not body.replace:
        raise APIError(409, f"a pack named {body.name!r} is already loaded (send "
                            "'replace': true to replace it)", param="name",
                       code=ErrorCode.PACK_EXISTS)
    try:
        tensors = base64.b64decode(body.safetensors, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request("safetensors must be the base64 of a .safetensors file",
                          "safetensors", ErrorCode.INVALID_BASE64) from None
    sidecar = json.dumps(body.sidecar).encode()
    try:
        pack = await asyncio.to_thread(load_pack_bytes, body.name, tensors, sidecar,
                                       state.lm.model)
    except PackError as exc:
        about_tensors = any(w in str(exc) for w in ("tensor", "pickle"))
        raise bad_request(f"pack refused: {exc}", "safetensors" if about_tensors else "sidecar",
                          ErrorCode.INVALID_PACK) from None
    replaced = install_pack(state, pack)
    pack_event(request, "pack_uploaded", pack=pack.name, concept=pack.concept,
               replaced=replaced is not None, methods=pack.methods,
               safetensors_sha256=hashlib.sha256(tensors).hexdigest(),
               sidecar_sha256=hashlib.sha256(sidecar).hexdigest())
    return {"id": pack.name, "object": "steering.pack", "status": "loaded",
            "replaced": replaced is not None, "default": pack.name == state.default_pack,
            **pack.describe()}


@router.delete("/v1/steering/packs/{name}", responses=ERROR_RESPONSES)
async def delete_pack(name: str, request: Request):
    state = get_state(request)
    state.require_ready()
    _require_admin(request)
    if name not in state.packs:
        known = ", ".join(sorted(state.packs)) or "none loaded"
        raise not_found(f"unknown steering pack {name[:80]!r}; loaded packs: {known}", "name",
                        ErrorCode.PACK_NOT_FOUND)
    removed = remove_pack(state, name)
    pack_event(request, "pack_deleted", pack=name, concept=removed.concept if removed else None)
    return {"id": name, "object": "steering.pack", "deleted": True,
            "default_pack": state.default_pack}
