"""Loading and unloading packs while serving (`pack_admin` keys only; `GET /v1/steering/packs`
lists).

    POST   /v1/steering/packs          {"name", "safetensors": base64, "sidecar": {…}, "replace"}
    DELETE /v1/steering/packs/{name}

Who may: a key with `pack_admin: true`, which the keys file grants only together with the
refusal-lowering grant (`lower_refusal: true`; `server.security.keysfile`), because a pack decides
what every method does with it. With no keys configured nobody may (403 `pack_admin_needs_keys`):
a keyless server's packs are the ones it started with. Keys without the grant get 403
`not_pack_admin`.

What may change: packs uploaded while serving. The packs loaded at start (`state.pinned_packs`:
the default pack, the shipped concept packs, the packs of `STEER_PACKS_DIR` and
`STEER_EXTRA_PACKS`) cannot be replaced or deleted (409 `pack_pinned`).

An upload is the two files of a pack (`NAME.safetensors` base64-encoded, `NAME.json` as a JSON
object). The route reads its body itself, in chunks, up to `STEER_MAX_PACK_BYTES` (413 beyond;
the general `STEER_MAX_BODY_BYTES` does not apply here, so a real extracted pack fits), checks it
like every JSON body, and loads it through the loader that start-up uses
(`server.packs.load_pack_bytes`): format version, model fingerprint, hook layout, shapes, float32
tensors, finiteness, orthonormal INLP rows, vectors' operations, never pickle — and then against
the shipped refusal pack (`steering.packs.consistency`: a refusal pack's DiM sign, length and
harmless mean; no other concept may run against refusal). Uploads and deletions are written to the
audit log, and so is a refused deletion. Requests that resolved their steering before a
replacement or deletion finish on the pack they started with.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field, ValidationError

from server.api.protocol import ERROR_RESPONSES, ErrorResponse
from server.context import request_context
from server.errors import APIError, ErrorCode, bad_request, not_found
from server.packs import install_pack, load_pack_bytes, remove_pack
from server.security.audit import pack_event
from server.security.auth import keys_configured
from server.security.hardening import check_json, check_name, too_large
from server.state import ServerState, get_state
from steering.packs.format import PackError

PACK_UPLOAD_PATH = "/v1/steering/packs"
router = APIRouter()


class PackUpload(BaseModel):
    name: str = Field(description="the pack's name in requests (`steering.pack`)")
    safetensors: str = Field(description="NAME.safetensors, base64-encoded")
    sidecar: dict = Field(description="NAME.json, the pack's sidecar object")
    replace: bool = Field(False, description="replace a pack of the same name uploaded "
                                             "earlier (packs loaded at start cannot be)")


def _require_pack_admin(request: Request) -> None:
    settings = get_state(request).settings
    if not keys_configured(settings):
        raise APIError(403, "loading and unloading packs needs API keys: configure a key with "
                            "'pack_admin: true' (this server has none, so its packs are the "
                            "ones it started with)", type="permission_error",
                       code=ErrorCode.PACK_ADMIN_NEEDS_KEYS)
    key = request_context(request).api_key
    if key is None:  # fail closed: keys are configured, yet the caller's key is not where we look
        raise APIError(403, "the caller's API key could not be determined",
                       type="permission_error", code=ErrorCode.NOT_PACK_ADMIN)
    if not (key.pack_admin and key.policy.lower_refusal):
        raise APIError(403, f"key {key.id!r} may not load or unload packs (needs "
                            "'pack_admin: true' and 'lower_refusal: true' in the keys file)",
                       type="permission_error", code=ErrorCode.NOT_PACK_ADMIN)


def _refuse_pinned(state: ServerState, name: str, what: str) -> None:
    if name in state.pinned_packs:
        raise APIError(409, f"pack {name!r} was loaded at start and cannot be {what} while "
                            "serving (upload under another name, or restart with the new pack)",
                       param="name", code=ErrorCode.PACK_PINNED)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, read chunk by chunk; 413 as soon as it passes `limit` bytes."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def _parse_upload(request: Request, limit: int) -> PackUpload:
    raw = await _read_body(request, limit)
    data = await asyncio.to_thread(check_json, raw)  # NaN, depth, odd unicode: 400 naming it
    if not isinstance(data, dict):
        raise bad_request("the body must be a JSON object with name, safetensors and sidecar",
                          None, ErrorCode.INVALID_JSON)
    try:
        return PackUpload.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise bad_request(f"{param}: {first['msg']}" if param else first["msg"], param,
                          ErrorCode.INVALID_REQUEST) from None


@router.post(PACK_UPLOAD_PATH, status_code=201,
             responses={**ERROR_RESPONSES, 409: {"model": ErrorResponse},
                        413: {"model": ErrorResponse}},
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                 "schema": PackUpload.model_json_schema()}}}})
async def upload_pack(request: Request):
    state = get_state(request)
    state.require_ready()
    _require_pack_admin(request)
    body = await _parse_upload(request, state.settings.max_pack_bytes)
    check_name(body.name, "pack", "name")
    _refuse_pinned(state, body.name, "replaced")
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
    reference = state.packs.get("refusal") if "refusal" in state.pinned_packs else None
    try:
        pack = await asyncio.to_thread(load_pack_bytes, body.name, tensors, sidecar,
                                       state.lm.model, reference)
    except PackError as exc:
        about_tensors = any(w in str(exc) for w in ("tensor", "pickle", "INLP", "direction",
                                                    "mean"))
        raise bad_request(f"pack refused: {exc}", "safetensors" if about_tensors else "sidecar",
                          ErrorCode.INVALID_PACK) from None
    _refuse_pinned(state, pack.name, "replaced")  # state may have changed meanwhile
    replaced = install_pack(state, pack)
    pack_event(request, "pack_uploaded", pack=pack.name, concept=pack.concept,
               replaced=replaced is not None, methods=pack.methods,
               safetensors_sha256=hashlib.sha256(tensors).hexdigest(),
               sidecar_sha256=hashlib.sha256(sidecar).hexdigest())
    return {"id": pack.name, "object": "steering.pack", "status": "loaded",
            "replaced": replaced is not None, "default": pack.name == state.default_pack,
            **pack.describe()}


@router.delete("/v1/steering/packs/{name}",
               responses={**ERROR_RESPONSES, 409: {"model": ErrorResponse}})
async def delete_pack(name: str, request: Request):
    try:
        state = get_state(request)
        state.require_ready()
        _require_pack_admin(request)
        if name not in state.packs:
            known = ", ".join(sorted(state.packs)) or "none loaded"
            raise not_found(f"unknown steering pack {name[:80]!r}; loaded packs: {known}",
                            "name", ErrorCode.PACK_NOT_FOUND)
        _refuse_pinned(state, name, "deleted")
    except APIError as exc:  # a refused deletion is audited too (not only POSTs are)
        if exc.status not in (401, 403):  # those the audit middleware writes itself
            pack_event(request, "denied_request", pack=name[:80], status=exc.status,
                       outcome="denied", denied=exc.code, param=exc.param)
        raise
    removed = remove_pack(state, name)
    pack_event(request, "pack_deleted", pack=name, concept=removed.concept if removed else None)
    return {"id": name, "object": "steering.pack", "deleted": True,
            "default_pack": state.default_pack}
