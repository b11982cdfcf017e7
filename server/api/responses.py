"""Non-streamed responses: collect every choice, then one JSON body (or the first choice's error).

A client that disconnects first gets its engine requests cancelled and a 499 in the logs.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from server.api.jobs import choice_error, collect_until_disconnect
from server.api.monitoring import summary
from server.api.prepare import Job
from server.api.protocol import (
    ChatChoice,
    ChatCompletionResponse,
    ChoiceLogprobs,
    CompletionChoice,
    CompletionResponse,
    ResponseMessage,
    ToolCall,
)
from server.api.tools import parse_all
from server.api.tracker import Tracker
from server.context import request_context
from server.state import ServerState


async def respond(state: ServerState, job: Job, tracker: Tracker, handles: list,
                  request: Request) -> Response:
    ctx = request_context(request)
    if not await collect_until_disconnect(request, handles, tracker.add):
        tracker.finish("499")
        tracker.log_to(ctx, "client_closed")
        return Response(status_code=499)
    for ch in tracker.choices:
        err = choice_error(job, ch.finish_reason, ch.error, state.settings.request_timeout_s)
        if err is not None:
            tracker.finish(str(err.status))
            tracker.log_to(ctx, ch.finish_reason)
            raise err
    tracker.finish("200")
    tracker.log_to(ctx, None)
    return JSONResponse(build_response(job, tracker).model_dump(mode="json"))


def chat_message(job: Job, ch) -> tuple[ResponseMessage, str | None]:
    """A chat choice's message and finish reason (its tool calls parsed out when the request
    has tools)."""
    if job.tools is None:
        return ResponseMessage(content=ch.text), ch.finish_reason
    content, calls, reason = parse_all(job.tools, ch.text, ch.finish_reason)
    return ResponseMessage(content=content, tool_calls=[
        ToolCall(id=c["id"], function=c["function"]) for c in calls] or None), reason


def build_response(job: Job, tracker: Tracker) -> ChatCompletionResponse | CompletionResponse:
    applied = job.resolved.echo(tracker.choices[0].steering)  # conditions decided
    if job.kind == "chat":
        choices = [ChatChoice(
            index=ch.index, message=message, finish_reason=reason,
            logprobs=ChoiceLogprobs(content=ch.chat_logprobs) if job.logprobs else None,
            monitor=summary(job.monitors, ch.monitor))
            for ch in tracker.choices for message, reason in [chat_message(job, ch)]]
        return ChatCompletionResponse(id=job.response_id, created=job.created,
                                      model=job.resolved.model, choices=choices,
                                      usage=tracker.usage(), steering=applied)
    choices = []
    for ch in tracker.choices:
        prefix = job.prompt_texts[ch.index // job.n] if job.echo else ""
        choices.append(CompletionChoice(index=ch.index, text=prefix + ch.text,
                                        logprobs=ch.text_logprobs,
                                        finish_reason=ch.finish_reason,
                                        monitor=summary(job.monitors, ch.monitor)))
    return CompletionResponse(id=job.response_id, created=job.created, model=job.resolved.model,
                              choices=choices, usage=tracker.usage(), steering=applied)
