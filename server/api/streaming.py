"""Streamed responses: server-sent events built from the protocol's chunk models.

Per choice an opening chunk (the assistant role, or the echoed prompt) carrying the applied
steering, then a chunk per piece of text (with its logprobs), a closing chunk with the finish
reason (and, when the steering has a condition, the steering again with the condition decided at
prefill: its score and whether it applied); with `stream_options.include_usage` a last chunk with the usage; then `data: [DONE]`.
A choice that fails ends the stream with an in-band error event (the headers are sent).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi.responses import StreamingResponse

from server.api.jobs import cancel, choice_error, events
from server.api.monitoring import delta
from server.api.prepare import Job
from server.api.protocol import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChoiceLogprobs,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    DeltaMessage,
    ToolCallDelta,
)
from server.api.tools import finish_reason, start
from server.api.tracker import Choice, Tracker
from server.context import RequestContext
from server.errors import APIError, ErrorCode
from server.state import ServerState

DONE = "data: [DONE]\n\n"
log = logging.getLogger("server")


def error_event(err: APIError) -> str:
    """An error body as one server-sent event (OpenAI's in-band stream error)."""
    return f"data: {json.dumps(err.body(), ensure_ascii=False, separators=(',', ':'))}\n\n"


@dataclass
class ChunkBuilder:
    """The chunks of one job's stream (chat or text completion)."""

    job: Job

    def _chunk(self, choices: list, **extra) -> ChatCompletionChunk | CompletionChunk:
        job = self.job
        if job.include_usage:
            extra.setdefault("usage", None)
        cls = ChatCompletionChunk if job.kind == "chat" else CompletionChunk
        return cls(id=job.response_id, created=job.created, model=job.resolved.model,
                   choices=choices, **extra)

    def _choice(self, c: int, text: str | None = None, *, role: bool = False,
                logprobs=None, finish: str | None = None, monitor: dict | None = None,
                calls: list[dict] | None = None):
        if self.job.kind == "chat":
            message = DeltaMessage(role="assistant", content="") if role else (
                DeltaMessage(content=text) if text is not None else DeltaMessage())
            if calls:
                message.tool_calls = [ToolCallDelta(**call) for call in calls]
            return ChatChunkChoice(index=c, delta=message, logprobs=logprobs,
                                   finish_reason=finish, monitor=monitor)
        return CompletionChoice(index=c, text=text or "", logprobs=logprobs,
                                finish_reason=finish, monitor=monitor)

    def opening(self, c: int) -> str:
        job = self.job
        text = job.prompt_texts[c // job.n] if job.echo else ""
        return self._chunk([self._choice(c, text, role=True)],
                           steering=job.resolved.applied).sse()

    def piece(self, c: int, text: str, logprobs, monitor: dict | None = None,
              calls: list[dict] | None = None) -> str:
        return self._chunk([self._choice(c, text, logprobs=logprobs, monitor=monitor,
                                         calls=calls)]).sse()

    def closing(self, c: int, finish: str, decided=None, monitor: dict | None = None) -> str:
        extra = {}
        if any(p.when is not None for p in self.job.resolved.parts):
            extra["steering"] = self.job.resolved.echo(decided)
        return self._chunk([self._choice(c, finish=finish, monitor=monitor)], **extra).sse()

    def new_monitor(self, ch: Choice, sent: list[int]) -> dict | None:
        """The monitor scores `ch` gained since the last chunk that carried them (`sent[c]`:
        how many tokens' scores went out)."""
        scores = ch.monitor[sent[ch.index]:]
        sent[ch.index] = len(ch.monitor)
        return delta(self.job.monitors, scores)

    def usage(self, tracker: Tracker) -> str:
        decided = tracker.choices[0].steering if tracker.choices else None
        return self._chunk([], usage=tracker.usage(),
                           steering=self.job.resolved.echo(decided)).sse()

    def new_logprobs(self, ch: Choice, since: int):
        """The logprobs `ch` gained after its first `since` tokens, as the chunk carries them."""
        if self.job.kind == "chat":
            return ChoiceLogprobs(content=ch.chat_logprobs[since:])
        t = ch.text_logprobs
        return CompletionLogprobs(tokens=t.tokens[since:], token_logprobs=t.token_logprobs[since:],
                                  top_logprobs=t.top_logprobs[since:],
                                  text_offset=t.text_offset[since:])


def stream_response(state: ServerState, job: Job, tracker: Tracker, handles: list,
                    ctx: RequestContext) -> StreamingResponse:
    return StreamingResponse(_stream(state, job, tracker, handles, ctx),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _stream(state: ServerState, job: Job, tracker: Tracker, handles: list,
                  ctx: RequestContext) -> AsyncIterator[str]:
    chunks = ChunkBuilder(job)
    status, outcome = "200", None
    parsers = [start(job.tools) for _ in job.sampling] if job.tools is not None else None
    sent = [0] * len(job.sampling)  # per choice: tokens whose monitor scores went out
    try:
        for c in range(len(job.sampling)):  # an opening chunk per choice carries the steering
            yield chunks.opening(c)
        async for c, ev in events(handles):
            ch = tracker.choices[c]
            seen = ch.logprob_count
            tracker.add(c, ev)
            lp = None
            if job.logprobs and ev.token_id is not None and ev.logprob is not None:
                lp = chunks.new_logprobs(ch, seen)
            text, calls, reason = ev.text, None, ch.finish_reason
            if parsers is not None:  # tool calls: held back until their block closes
                text, calls = parsers[c].feed(ev.text)
                if ev.finish_reason is not None:
                    rest, last = parsers[c].finish(ended=ev.finish_reason == "stop")
                    text, calls = text + rest, calls + last
                    reason = finish_reason(parsers[c], ch.finish_reason)
            if text or lp is not None or calls:
                yield chunks.piece(c, text, lp, chunks.new_monitor(ch, sent), calls)
            if ev.finish_reason is not None:
                err = choice_error(job, ch.finish_reason, ch.error,
                                   state.settings.request_timeout_s)
                if err is not None:
                    status, outcome = str(err.status), ev.finish_reason
                    yield error_event(err)
                    break
                yield chunks.closing(c, reason, ch.steering, chunks.new_monitor(ch, sent))
        else:
            if job.include_usage:
                yield chunks.usage(tracker)
        yield DONE
    except (asyncio.CancelledError, GeneratorExit):
        status, outcome = "499", "client_closed"
        raise
    except Exception:  # headers are sent: report in-band, the details to the log only
        status, outcome = "500", "error"
        log.exception("request %s: stream failed", job.request_id)
        message = f"stream failed (request id {job.request_id}); the server log has the details"
        yield error_event(APIError(500, message, type="server_error", code=ErrorCode.INTERNAL_ERROR))
        yield DONE
    finally:
        cancel([h for h, ch in zip(handles, tracker.choices) if not ch.done])
        tracker.finish(status)
        tracker.log_to(ctx, outcome)
