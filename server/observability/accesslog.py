"""Request ids, structured (JSON) access logs and the HTTP request counter, as ASGI middleware.

One JSON line per request on the `steer.access` logger: time, request id, client, method, path,
status, duration, and what the route put in the request context's `log_extra` (model, steering,
tokens; `server.context`).

The request id is always the server's own (returned in `X-Request-ID`); a client's `X-Request-ID`
is recorded as `client_request_id`. Every string a line carries from the request (path, user,
client id, …) is cut to `max_field_chars`, so a client cannot make log lines arbitrarily long.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.context import cap, request_context
from server.observability.metrics import Metrics, http_method_label, status_label

access_log = logging.getLogger("steer.access")
REQUEST_ID_HEADER = "x-request-id"


class JsonFormatter(logging.Formatter):
    """Log records as one JSON object per line (the message, or the record's `json` dict)."""

    def format(self, record: logging.LogRecord) -> str:
        data = getattr(record, "json", None)
        if data is None:
            data = {"msg": record.getMessage()}
        out = {"ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
               "level": record.levelname.lower(), "logger": record.name, **data}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def _client_request_id(value: str | None) -> str | None:
    if value and len(value) <= 128 and value.isascii() and value.isprintable():
        return value
    return None


class AccessLogMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics, enabled: bool = True,
                 max_field_chars: int = 256):
        self.app = app
        self.metrics = metrics
        self.enabled = enabled
        self.max_field_chars = max_field_chars

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        ctx = request_context(scope)
        rid = ctx.request_id
        ctx.client_request_id = _client_request_id(headers.get(REQUEST_ID_HEADER))
        status = {"code": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"],
                                      (REQUEST_ID_HEADER.encode(), rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self.metrics.http_requests.labels(endpoint, http_method_label(scope["method"]),
                                              status_label(status["code"])).inc()
            if self.enabled and not (endpoint in {"/healthz", "/health", "/metrics", "/readyz"}
                                     and status["code"] < 400):
                client = scope.get("client")
                access_log.info("access", extra={"json": cap({
                    "request_id": rid,
                    "client_request_id": ctx.client_request_id,
                    "client": f"{client[0]}:{client[1]}" if client else None,
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status["code"],
                    "duration_ms": round((time.perf_counter() - start) * 1000, 2),
                    **ctx.log_extra,
                }, self.max_field_chars)})
