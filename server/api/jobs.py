"""Job submission and event merging, shared by chat, completions and compare.

`submit(state, job, request)` hands the engine one request per choice (429 on a full queue, 503
while shutting down: the request never ran, so its rate-limit charge is refunded and its audit and
access lines carry the refusal's code as the outcome); `events(handles)` merges the handles' token events as `(choice, event)` in
arrival order; `collect_until_disconnect(request, handles, on_event)` feeds them to `on_event`
until every choice has finished, or cancels them all when the client goes away first.
`choice_error` maps a choice's finish reason to the error its response must carry.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence

from fastapi import Request

from server.api.prepare import Job
from server.context import request_context
from server.engine import EngineStopped, GenerationRequest, QueueFull, TokenEvent
from server.errors import APIError, ErrorCode, bad_request
from server.security.policy import refund
from server.state import ServerState

log = logging.getLogger("server")


# The engine's refusals to admit a generation: (status, message, error type, code).
_NOT_ADMITTED = {
    QueueFull: (429, "the server is busy (request queue full); retry shortly",
                "rate_limit_error", ErrorCode.QUEUE_FULL),
    EngineStopped: (503, "the server is shutting down and admits no new requests",
                    "service_unavailable", ErrorCode.SHUTTING_DOWN),
}


def submit(state: ServerState, job: Job, request: Request | None = None) -> list:
    """One engine request per choice; on failure none stays queued (and, with `request`, the
    key's rate limits get back what preparing it charged)."""
    engine = state.require_ready()
    handles: list = []
    try:
        for c, sp in enumerate(job.sampling):
            handles.append(engine.submit(GenerationRequest(
                prompt_ids=job.prompts[c // job.n], sampling=sp, steering=job.resolved.row,
                request_id=f"{job.request_id}-{c}", tenant=job.tenant,
                monitors=job.monitors)))
    except (QueueFull, EngineStopped) as exc:
        cancel(handles)
        status, message, kind, code = _NOT_ADMITTED[type(exc)]
        _refused(state, request, code)
        raise APIError(status, message, type=kind, code=code,
                       headers={"Retry-After": str(state.settings.retry_after_s)}) from None
    except ValueError as exc:
        cancel(handles)
        raise bad_request(str(exc), getattr(exc, "param", None),  # SteeringError names it
                          ErrorCode.INVALID_VALUE) from None
    except BaseException:
        cancel(handles)
        raise
    return handles


def _refused(state: ServerState, request: Request | None, code: ErrorCode) -> None:
    """The engine refused a prepared request: refund its charge, note why."""
    if request is not None:
        refund(request)
        request_context(request).log_extra["outcome"] = str(code)


def submit_all(state: ServerState, jobs: Sequence[Job], request: Request | None = None) -> list:
    """Every job's handles, submitted back to back (the engine batches them together)."""
    handles: list = []
    try:
        for job in jobs:
            handles.extend(submit(state, job, request))
    except BaseException:
        cancel(handles)
        raise
    return handles


def cancel(handles: Sequence) -> None:
    for h in handles:
        try:
            h.cancel()
        except Exception:  # already finished: nothing to free
            pass


def _failed(exc: Exception) -> TokenEvent:
    """A handle that raised, as its choice's last event (the traceback goes to the log)."""
    log.exception("an engine handle failed")
    return TokenEvent(None, "", finish_reason="error", error=f"{type(exc).__name__}: {exc}")


async def events(handles: Sequence) -> AsyncIterator[tuple[int, TokenEvent]]:
    """(choice, event) from every handle as they come; unfinished handles are cancelled when
    the consumer stops early (client gone, error)."""
    finished: set[int] = set()
    if len(handles) == 1:  # no fan-in needed
        try:
            try:
                async for ev in handles[0]:
                    if ev.finish_reason is not None:
                        finished.add(0)
                    yield 0, ev
            except Exception as exc:  # surfaces as this choice's error
                finished.add(0)
                yield 0, _failed(exc)
        finally:
            if not finished:
                cancel(handles)
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(c: int, h) -> None:
        try:
            async for ev in h:
                await queue.put((c, ev))
        except Exception as exc:  # surfaces as this choice's error
            await queue.put((c, _failed(exc)))
        finally:
            await queue.put((c, None))

    tasks = [asyncio.create_task(pump(c, h)) for c, h in enumerate(handles)]
    try:
        open_ = len(handles)
        while open_:
            c, ev = await queue.get()
            if ev is None:
                open_ -= 1
                continue
            if ev.finish_reason is not None:
                finished.add(c)
            yield c, ev
    finally:
        cancel([h for c, h in enumerate(handles) if c not in finished])
        for t in tasks:
            t.cancel()


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def collect_until_disconnect(request: Request, handles: Sequence,
                                   on_event: Callable[[int, TokenEvent], None]) -> bool:
    """Feed every (choice, event) to `on_event` until all choices finish: True. When the client
    disconnects first (or the caller is cancelled) every handle is cancelled: False."""

    async def collect() -> None:
        async for c, ev in events(handles):
            on_event(c, ev)

    work = asyncio.create_task(collect())
    watch = asyncio.create_task(_wait_disconnect(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():  # client gone (or we are being cancelled)
            work.cancel()
            cancel(handles)
    if not work.done() or work.cancelled():
        return False
    work.result()
    return True


def choice_error(job: Job, finish_reason: str | None, error: str | None,
                 timeout_s: float) -> APIError | None:
    """The error a choice that ended with `finish_reason` makes its response carry (None: ok).
    A failure's detail (`error`: exception text, e.g. CUDA OOM) goes to the log, never to the
    client: the response carries the request id and a generic message."""
    if finish_reason in ("stop", "length"):
        return None
    if finish_reason == "timeout":
        return APIError(504, f"the request timed out after {timeout_s:g} s "
                             f"(request id {job.request_id})", type="timeout_error",
                        code=ErrorCode.TIMEOUT)
    if finish_reason == "cancelled":
        return APIError(503, "the request was cancelled by the server (shutting down?)",
                        type="service_unavailable", code=ErrorCode.CANCELLED)
    log.error("request %s: generation failed (%s): %s", job.request_id, finish_reason,
              error or "no detail")
    return APIError(500, f"generation failed (request id {job.request_id}); the server log has "
                         "the details", type="server_error", code=ErrorCode.ENGINE_ERROR)
