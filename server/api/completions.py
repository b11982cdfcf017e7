"""The OpenAI endpoints: `POST /v1/chat/completions` and `POST /v1/completions`.

Each request is validated (`server.api.validation`), prepared into a job (`server.api.prepare`), submitted to the engine one request
per choice (`server.api.jobs`), and answered as one JSON body (`server.api.responses`) or a
server-sent event stream (`server.api.streaming`). A client that goes away cancels its engine
requests.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from server.api.jobs import submit
from server.api.prepare import CHAT, COMPLETIONS, Job, prepare
from server.api.protocol import (
    ERROR_RESPONSES,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
)
from server.api.resolve import dump
from server.api.responses import respond
from server.api.routing import CheckedBodyRoute
from server.api.streaming import stream_response
from server.api.tracker import Tracker
from server.api.validation import validate
from server.context import request_context
from server.errors import APIError
from server.observability.metrics import status_label, steering_label
from server.state import ServerState, get_state

router = APIRouter(route_class=CheckedBodyRoute)

# Server-sent events (`stream: true`): each event's `data` is a JSON chunk, the last `[DONE]`.
SSE = {"text/event-stream": {"schema": {
    "type": "object", "properties": {"data": {"type": "string"}, "event": {"type": "string"},
                                     "id": {"type": "string"}}}}}


async def run_job(state: ServerState, job: Job, request: Request) -> Response:
    """Submit `job` and answer it: a JSON body, or a stream when the request asked for one."""
    try:
        handles = submit(state, job, request)
    except APIError as exc:  # queue full, shutting down: counted once, as refused
        state.metrics.requests.labels(job.endpoint, steering_label(job.method),
                                      status_label(exc.status)).inc()
        raise
    tracker = Tracker(state, job)
    ctx = request_context(request)
    ctx.log_extra.update({"model": job.resolved.model, "n": job.n, "stream": job.stream,
                          "steering": dump(job.resolved.applied)})
    if job.stream:
        return stream_response(state, job, tracker, handles, ctx)
    return await respond(state, job, tracker, handles, request)


async def _complete(body: ChatCompletionRequest | CompletionRequest, request: Request,
                    endpoint: str) -> Response:
    state = get_state(request)
    ctx = request_context(request)
    try:
        state.require_ready()
        [job] = await prepare(state, validate(state, body), ctx.request_id, request)
    except APIError as exc:
        state.metrics.requests.labels(endpoint, "n/a", status_label(exc.status)).inc()
        raise
    ctx.log_extra["user"] = body.user
    return await run_job(state, job, request)


@router.post(CHAT, response_model=ChatCompletionResponse,
             responses={**ERROR_RESPONSES, 200: {"content": SSE}})
async def chat_completions(body: ChatCompletionRequest, request: Request):
    return await _complete(body, request, CHAT)


@router.post(COMPLETIONS, response_model=CompletionResponse,
             responses={**ERROR_RESPONSES, 200: {"content": SSE}})
async def completions(body: CompletionRequest, request: Request):
    return await _complete(body, request, COMPLETIONS)
