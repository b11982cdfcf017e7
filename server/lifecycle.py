"""Liveness and the end of a drain: the two edges of a server's life that the engine cannot see.

`engine_alive(engine)`: False once the engine's thread has died (an exception that escaped its
loop); `/healthz` then answers 503 so an orchestrator restarts the process. An engine not yet
started, or stopped by a drain, is not dead.

`InflightMiddleware` keeps the HTTP requests in progress. `drain(state, inflight, timeout_s)`
stops admitting, lets running requests finish for `timeout_s`, then fails every request still in
progress with 503 (`drain_timeout`): a JSON error if its response has not started, else a last
server-sent `error` event; none is left hanging when the process exits.

    time ──▶  SIGTERM ─ readiness 503, new requests 503 ─ running ones finish ─ timeout: 503 the rest
"""

from __future__ import annotations

import asyncio
import json
import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.context import request_context
from server.errors import APIError, ErrorCode

log = logging.getLogger("server")

DRAIN_EXPIRED = APIError(503, "the server is shutting down and this request did not finish in "
                              "time; retry it", type="service_unavailable", code=ErrorCode.DRAIN_TIMEOUT)


def engine_alive(engine) -> bool:
    """Whether the engine's loop thread runs (True too when it is not started or was stopped)."""
    alive = getattr(engine, "alive", None)  # a public flag, where the engine offers one
    if isinstance(alive, bool):
        return alive
    thread = getattr(engine, "_thread", None)  # server/engine/core.py: the loop's thread
    return thread is None or thread.is_alive()


class _Request:
    def __init__(self, task: asyncio.Task):
        self.task = task
        self.started = False
        self.event_stream = False
        self.failed = False


class InflightMiddleware:
    """Tracks requests in progress so a drain that runs out of time can fail them with 503."""

    def __init__(self, app: ASGIApp):
        self.app = app
        self.requests: set[_Request] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        if scope["type"] != "http" or task is None:
            await self.app(scope, receive, send)
            return
        entry = _Request(task)

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                entry.started = True
                entry.event_stream = any(k.lower() == b"content-type"
                                         and v.startswith(b"text/event-stream")
                                         for k, v in message.get("headers", []))
            await send(message)

        self.requests.add(entry)
        try:
            await self.app(scope, receive, send_wrapper)
        except asyncio.CancelledError:
            if not entry.failed:
                raise
            task.uncancel()
            await self._fail(entry, scope, receive, send)
        finally:
            self.requests.discard(entry)

    @staticmethod
    async def _fail(entry: _Request, scope: Scope, receive: Receive, send: Send) -> None:
        ctx = request_context(scope)
        ctx.log_extra["outcome"] = "drain_timeout"
        ctx.note_error(DRAIN_EXPIRED.code, None)
        try:
            if not entry.started:
                await DRAIN_EXPIRED.response()(scope, receive, send)
            elif entry.event_stream:
                data = json.dumps(DRAIN_EXPIRED.body())
                await send({"type": "http.response.body", "more_body": False,
                            "body": f"event: error\ndata: {data}\n\n".encode()})
            else:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except Exception:  # the client is gone: nothing left to tell it
            pass

    def fail_all(self) -> int:
        """Cancel every request in progress; each answers 503. Returns how many."""
        count = 0
        for entry in list(self.requests):
            if not entry.failed and not entry.task.done():
                entry.failed = True
                entry.task.cancel()
                count += 1
        return count


async def drain(state, inflight: InflightMiddleware | None, timeout_s: float) -> None:
    """Stop admitting, let running requests finish for `timeout_s`, then 503 the rest."""
    state.draining = True
    engine = state.engine
    if engine is not None:
        await engine.shutdown(timeout_s=timeout_s)
        state.engine = None  # stopped: the lifespan's exit has nothing left to wait for
    if inflight is None:
        return
    failed = inflight.fail_all()
    if failed:
        log.warning("drain timeout (%g s): %d requests still in progress get 503", timeout_s,
                    failed)
    for _ in range(200):  # let them send their 503s (a few loop turns)
        if not inflight.requests:
            break
        await asyncio.sleep(0.01)
