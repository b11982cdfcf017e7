"""Reading the stream over HTTP: `POST /v1/steering/inspect` and `POST /v1/activations`.

    POST /v1/steering/inspect   {"prompt" | "messages", "completion"?, "pack"?, "layer"?, "top_k"?}
      → every layer × token score on the pack's DiM axes (the heatmap), the direction's logit
        lens, its cosine with every layer's direction (`steering.interventions.inspection`)
    POST /v1/activations        {"prompts", "layers", "positions"?, "chat"?, "format"?, "dtype"?}
      → the residual stream entering each layer at each position of each prompt
        (`steering.interventions.capture`): JSON with base64 little-endian values and their
        shape [prompts, layers, positions, d] (`format: "base64"`, the default), or a
        safetensors file with one tensor `activations` (`format: "safetensors"`)

Both run their forwards on the engine thread between decode steps (`Engine.call`), never on the
event loop nor beside the engine's own forwards; a capture goes in batches of `CAPTURE_BATCH`
prompts, one call each, so running streams keep decoding between them. Bounds: the prompt count
(`STEER_MAX_CAPTURE_PROMPTS`), the bytes one capture returns (`STEER_MAX_CAPTURE_BYTES`), each
prompt's tokens (`STEER_MAX_PROMPT_TOKENS`, the context), and per key its rate limits (one request
and the prompts' tokens are charged) and its pack policy.
"""

from __future__ import annotations

import base64
import json
from typing import Annotated, Literal

import numpy as np
import torch
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors.torch import save as save_safetensors

from server.api.prepare import render_chat
from server.api.protocol import ERROR_RESPONSES, ChatMessage, ErrorResponse
from server.api.resolve import resolve_model
from server.api.routing import CheckedBodyRoute
from server.api.validation import chat_turns, check_read_prompt
from server.context import request_context
from server.engine import EngineStopped, QueueFull
from server.errors import APIError, ErrorCode, api_error, bad_request, not_found
from server.security.policy import enforce
from server.settings import CEILING_MESSAGES, CEILING_PROMPTS
from server.state import ServerState, get_state
from steering.interventions.capture import (
    CaptureError,
    capture_ids,
    check_request,
    position_index,
)
from steering.interventions.inspection import inspect_ids
from steering.interventions.schema import at_most
from steering.packs.format import SteeringPack

INSPECT = "/v1/steering/inspect"
ACTIVATIONS = "/v1/activations"
CAPTURE_BATCH = 8  # prompts per engine call
MAX_COMPLETION_CHARS = 32_000

router = APIRouter(route_class=CheckedBodyRoute)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str | None = Field(None, description="served model id (a preset is not a model here)")


class InspectRequest(_Body):
    prompt: str | None = Field(None, description="shorthand for one user message")
    messages: Annotated[list[ChatMessage] | None, at_most(CEILING_MESSAGES, "messages")] = None
    completion: str | None = Field(None, max_length=MAX_COMPLETION_CHARS,
                                   description="an answer to score after the prompt")
    pack: str | None = Field(None, max_length=128, description="pack (default: the model's)")
    layer: int | None = Field(None, description="the direction the lens and cosines use "
                                                "(default: the pack's layer)")
    top_k: int = Field(10, ge=1, le=100, description="tokens in each side of the logit lens")

    @model_validator(mode="after")
    def _one_prompt(self):
        if (self.messages is None) == (self.prompt is None):
            raise api_error("give either messages or prompt (not both)", "messages",
                            ErrorCode.INVALID_COMBINATION)
        if self.messages is not None and not self.messages:
            raise api_error("messages must hold at least one message", "messages",
                            ErrorCode.EMPTY_MESSAGES)
        return self


class ActivationsRequest(_Body):
    prompts: Annotated[list[str | list[ChatMessage]], at_most(CEILING_PROMPTS, "prompts")] = Field(
        ..., min_length=1, description="user messages (or raw text with chat false), or chat "
                                       "conversations")
    layers: Annotated[list[int], at_most(256, "layers")] = Field(..., min_length=1, max_length=256,
                              description="block inputs to read (n_layers: the final norm's "
                                          "input)")
    positions: Annotated[list[int], at_most(64, "positions")] = Field([-1], min_length=1, max_length=64,
                                 description="token indices: negative from the prompt's end, "
                                             "non-negative from its start")
    chat: bool = Field(True, description="put each prompt through the chat template")
    format: Literal["base64", "safetensors"] = "base64"
    dtype: Literal["float16", "float32"] = "float16"


# ---- shared pieces ----------------------------------------------------------------------------------


def _pack(state: ServerState, name: str | None, request: Request, param: str = "pack"
          ) -> SteeringPack:
    name = name or state.default_pack
    pack = state.packs.get(name) if name is not None else None
    if pack is None:
        known = ", ".join(sorted(state.packs)) or "none loaded"
        raise not_found(f"unknown steering pack {str(name)[:80]!r}; loaded packs: {known}",
                        param, ErrorCode.PACK_NOT_FOUND)
    key = request_context(request).api_key
    if key is not None and key.policy.packs is not None and pack.name not in key.policy.packs:
        raise APIError(403, f"key {key.id!r} is not allowed this request by policy rule "
                            f"'packs': pack {pack.name!r} is not allowed", type="permission_error",
                       param=param, code=ErrorCode.POLICY_PACKS)
    return pack


async def _on_engine(state: ServerState, fn):
    """`fn(lm)` on the engine thread between decode steps (429 on a full queue, 503 while
    shutting down, as completions answer)."""
    engine = state.require_ready()
    if not getattr(engine, "reads_stream", False):
        raise APIError(501, "this server's engine does not read the stream (inspect and "
                            "activations need the native engine)", type="server_error",
                       code=ErrorCode.UNSUPPORTED_ENGINE)
    retry = {"Retry-After": str(max(state.settings.retry_after_s, 1))}
    try:
        future = engine.call(fn)
    except QueueFull:
        raise APIError(429, "the server is busy (request queue full); retry shortly",
                       type="rate_limit_error", code=ErrorCode.QUEUE_FULL, headers=retry) from None
    except EngineStopped:
        raise APIError(503, "the server is shutting down and admits no new requests",
                       type="service_unavailable", code=ErrorCode.SHUTTING_DOWN,
                       headers=retry) from None
    return await future


def _base_model(state: ServerState, model: str | None) -> None:
    _, preset = resolve_model(state, model)
    if preset is not None:
        raise bad_request("model must be the served model here (presets steer; reading the "
                          "stream does not)", "model", ErrorCode.PRESET_NOT_ALLOWED)


# ---- inspect --------------------------------------------------------------------------------------


@router.post(INSPECT, responses={**ERROR_RESPONSES, 501: {"model": ErrorResponse}})
async def inspect(body: InspectRequest, request: Request):
    state = get_state(request)
    state.require_ready()
    _base_model(state, body.model)
    pack = _pack(state, body.pack, request)
    if body.layer is not None and not 0 <= body.layer < pack.n_layers:
        raise bad_request(f"layer must be between 0 and {pack.n_layers - 1}, got {body.layer}",
                          "layer", ErrorCode.INVALID_VALUE)
    messages = body.messages or [ChatMessage(role="user", content=body.prompt)]
    check_read_prompt(state, "messages", messages=len(messages))
    _, ids = await state.in_tokenizer_thread(render_chat, state, chat_turns(messages))
    n_prompt = len(ids)
    if body.completion:
        tail = await state.in_tokenizer_thread(
            lambda: state.lm.tokenizer(body.completion, add_special_tokens=False)["input_ids"])
        ids = ids + list(tail)
    param = "completion" if body.completion else ("messages" if body.messages else "prompt")
    check_read_prompt(state, param, tokens=len(ids))
    if len(ids) > state.lm.context_length:
        raise bad_request(f"this model's maximum context length is {state.lm.context_length} "
                          f"tokens; the prompt and completion have {len(ids)}", param,
                          ErrorCode.CONTEXT_LENGTH_EXCEEDED)
    enforce(state, request, [], prompt=[m.content if isinstance(m.content, str) else ""
                                        for m in messages], tokens=len(ids), endpoint=INSPECT)
    result = await _on_engine(state, lambda lm: inspect_ids(lm, pack, ids, n_prompt,
                                                            body.layer, body.top_k))
    return {"object": "steering.inspection", "model": state.served_name, **result.to_dict()}


# ---- activations ------------------------------------------------------------------------------------


def _encode_prompts(state: ServerState, body: ActivationsRequest) -> list[list[int]]:
    """Token ids per prompt (in the tokenizer thread)."""
    tok = state.lm.tokenizer
    out = []
    for i, prompt in enumerate(body.prompts):
        if isinstance(prompt, str) and not body.chat:
            ids = list(tok(prompt)["input_ids"])
        else:
            messages = ([ChatMessage(role="user", content=prompt)] if isinstance(prompt, str)
                        else prompt)
            if not messages:
                raise bad_request("a conversation must hold at least one message",
                                  f"prompts[{i}]", ErrorCode.EMPTY_MESSAGES)
            if not body.chat:
                raise bad_request("a conversation needs chat true", f"prompts[{i}]",
                                  ErrorCode.INVALID_COMBINATION)
            check_read_prompt(state, f"prompts[{i}]", messages=len(messages))
            ids = render_chat(state, chat_turns(messages))[1]
        if not ids:
            raise bad_request("prompt must not be empty", f"prompts[{i}]", ErrorCode.EMPTY_PROMPT)
        out.append(ids)
    return out


@router.post(ACTIVATIONS, responses={**ERROR_RESPONSES, 501: {"model": ErrorResponse},
                                     200: {"content": {
    "application/json": {}, "application/octet-stream": {}}}})
async def activations(body: ActivationsRequest, request: Request):
    state = get_state(request)
    state.require_ready()
    s = state.settings
    _base_model(state, body.model)
    n = len(body.prompts)
    if n > s.max_capture_prompts:
        raise bad_request(f"at most {s.max_capture_prompts} prompts per capture, got {n}",
                          "prompts", ErrorCode.TOO_MANY_PROMPTS)
    lm = state.lm
    try:
        check_request(body.layers, body.positions, lm.n_layers)
    except CaptureError as exc:
        raise bad_request(str(exc), exc.param, ErrorCode.INVALID_CAPTURE) from None
    width = 2 if body.dtype == "float16" else 4
    size = n * len(body.layers) * len(body.positions) * lm.d_model * width
    if size > s.max_capture_bytes:
        raise bad_request(f"this capture would return {size} bytes ({n} prompts × "
                          f"{len(body.layers)} layers × {len(body.positions)} positions × "
                          f"{lm.d_model} × {width} bytes); the limit is {s.max_capture_bytes}",
                          "layers", ErrorCode.CAPTURE_TOO_LARGE)
    ids = await state.in_tokenizer_thread(_encode_prompts, state, body)
    for i, x in enumerate(ids):
        check_read_prompt(state, f"prompts[{i}]", tokens=len(x))
        if len(x) > lm.context_length:
            raise bad_request(f"prompt {i} has {len(x)} tokens; the context is "
                              f"{lm.context_length}", f"prompts[{i}]", ErrorCode.CONTEXT_LENGTH_EXCEEDED)
        for p in body.positions:
            try:
                position_index(p, len(x), i)
            except CaptureError as exc:
                raise bad_request(str(exc), "positions", ErrorCode.POSITION_OUT_OF_RANGE) from None
    enforce(state, request, [], prompt=[p if isinstance(p, str) else json.dumps(
        [m.model_dump() for m in p]) for p in body.prompts], tokens=sum(map(len, ids)),
        endpoint=ACTIVATIONS)
    parts = []
    for start in range(0, n, CAPTURE_BATCH):
        chunk = ids[start:start + CAPTURE_BATCH]
        parts.append(await _on_engine(state, lambda lm, chunk=chunk: capture_ids(
            lm, chunk, body.layers, body.positions, batch_size=CAPTURE_BATCH)))
    values = torch.cat(parts).to(torch.float16 if body.dtype == "float16" else torch.float32)
    meta = {"layers": body.layers, "positions": body.positions,
            "prompt_tokens": [len(x) for x in ids], "model": state.served_name}
    request_context(request).log_extra.update({"prompt_tokens": sum(map(len, ids)),
                                               "capture_bytes": size})
    if body.format == "safetensors":
        data = save_safetensors({"activations": values.contiguous()},
                                metadata={k: json.dumps(v) for k, v in meta.items()})
        return Response(data, media_type="application/octet-stream",
                        headers={"X-Activations-Shape": ",".join(map(str, values.shape))})
    array = values.numpy().astype("<f2" if body.dtype == "float16" else "<f4")
    return {"object": "activations", **meta, "shape": list(values.shape), "dtype": body.dtype,
            "data": base64.b64encode(np.ascontiguousarray(array).tobytes()).decode(),
            "usage": {"prompt_tokens": sum(map(len, ids))}}
