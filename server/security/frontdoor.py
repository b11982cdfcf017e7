"""The front door: limits on HTTP connections before any request reaches the app.

uvicorn's h11 server has none of its own for a client that opens a connection and sends its
request head slowly ("slowloris"): it times out only idle keep-alive connections, after a
response. `steer serve` therefore runs uvicorn with:

| setting | uvicorn | what |
|---|---|---|
| `STEER_HEADER_TIMEOUT_S` (10) | `HeaderTimeoutH11Protocol` (below) | a connection whose request line and headers are not complete this long after the connection opened (or after its previous response) is answered 408 and closed |
| `STEER_MAX_HEADER_BYTES` (16384) | `h11_max_incomplete_event_size`, `FrontDoorMiddleware` | an incomplete head is buffered up to this size (then 400 and closed); a complete longer one gets 431 |
| `STEER_MAX_CONNECTIONS` (256) | `limit_concurrency` | with that many connections open, a new request is answered 503 at once |
| `STEER_KEEP_ALIVE_S` (5) | `timeout_keep_alive` | an idle keep-alive connection is closed |
| `STEER_ALLOWED_METHODS` (GET, HEAD, POST, DELETE) | `FrontDoorMiddleware` (outermost) | any other method is answered 405 before logging, metrics or authentication see it |

Behind a reverse proxy (nginx, Envoy, a cloud load balancer) the proxy usually enforces the same
limits; these still bound what reaches the server from inside the network (docs/deploy.md).
"""

from __future__ import annotations

import asyncio
import json

import h11
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from server.errors import APIError, ErrorCode

REQUEST_TIMEOUT = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                   b"connection: close\r\ncontent-length: %d\r\n\r\n")


def _timeout_body() -> bytes:
    body = APIError(408, "the request head (request line and headers) did not arrive in time",
                    code=ErrorCode.REQUEST_TIMEOUT).body()
    return json.dumps(body).encode()


class HeaderTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on the request head: armed when the connection
    opens and when data of a new request starts arriving; disarmed once h11 has parsed the
    request line and headers (the app then owns the request, with its own timeouts)."""

    header_timeout_s: float = 10.0
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._waiting_for_head():
            if self._head_timer is None and self.timeout_keep_alive_task is None:
                self._arm()
        else:
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self._waiting_for_head():  # a pipelined request was parsed meanwhile
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _waiting_for_head(self) -> bool:
        return self.conn.their_state is h11.IDLE

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timeout)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or not self._waiting_for_head():
            return
        if self.timeout_keep_alive_task is not None:  # idle keep-alive: uvicorn closes it
            return
        body = _timeout_body()
        self.transport.write(REQUEST_TIMEOUT % len(body) + body)
        self.transport.close()


def protocol_class(header_timeout_s: float) -> type[HeaderTimeoutH11Protocol]:
    """The protocol class for uvicorn's `http=` with this deadline."""
    return type("SteerH11Protocol", (HeaderTimeoutH11Protocol,),
                {"header_timeout_s": float(header_timeout_s)})


def uvicorn_limits(settings) -> dict:
    """The keyword arguments of `uvicorn.Config` that apply the front-door settings."""
    return {"http": protocol_class(settings.header_timeout_s),
            "limit_concurrency": settings.max_connections,
            "timeout_keep_alive": settings.keep_alive_s,
            "h11_max_incomplete_event_size": settings.max_header_bytes}


def allowed_methods(settings) -> frozenset[str]:
    return frozenset(m.strip().upper() for m in settings.allowed_methods.split(",") if m.strip())


def head_bytes(scope: Scope) -> int:
    """The size of the request head as parsed: method, path, query and headers."""
    return (len(scope.get("method", "")) + len(scope.get("raw_path") or b"")
            + len(scope.get("query_string", b"")) + sum(len(k) + len(v) + 4
                                                         for k, v in scope.get("headers", [])))


class FrontDoorMiddleware:
    """Outermost: 405 (with `Allow`) for an HTTP method not in the list and 431 for a request
    head larger than `max_head_bytes`, before anything else runs. (h11 bounds what it buffers
    of an incomplete head at the same size; a complete one arriving at once is caught here.)"""

    def __init__(self, app: ASGIApp, methods: frozenset[str], max_head_bytes: int):
        self.app = app
        self.methods = frozenset(methods)
        self.allow = ", ".join(sorted(self.methods))
        self.max_head_bytes = max_head_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            err = None
            if scope["method"] not in self.methods:
                err = APIError(405, f"HTTP method not allowed here (allowed: {self.allow})",
                               code=ErrorCode.METHOD_NOT_ALLOWED, headers={"Allow": self.allow})
            elif head_bytes(scope) > self.max_head_bytes:
                err = APIError(431, f"the request head exceeds {self.max_head_bytes} bytes",
                               code=ErrorCode.REQUEST_HEAD_TOO_LARGE)
            if err is not None:
                await err.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)
