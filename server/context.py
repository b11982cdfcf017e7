"""The per-request context: what the middleware and the routes learn about one HTTP request.

One `RequestContext` per request, created by the access-log middleware (the outermost) and kept in
the ASGI scope's `state`; every later layer reads and writes its typed fields instead of loose
`request.state` attributes:

| field | written by | read by |
|---|---|---|
| `request_id`, `client_request_id` | access log | errors, audit, routes |
| `api_key` | auth | policy, audit |
| `log_extra` | routes, errors, auth, drain | access log, audit |
| `audit` | policy (`audit.note`) | audit |
| `admission` | policy (`enforce`: what the rate limits were charged) | policy (`refund`, when the engine refuses the request) |
| `json_body` | body checks (hardening) | the API routes (`server.api.routing`): parsed once |
| `finalizers` | policy (a key's in-flight slot) | audit middleware: `finish()` once the response is sent |
| `audit_salt`, `field_chars` | audit middleware (the settings) | audit lines |
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from server.security.auth import ApiKey

CONTEXT_KEY = "steer_context"
UNPARSED: Any = object()  # `json_body` before (or after) the body checks hand it over


@dataclass
class RequestContext:
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    client_request_id: str | None = None
    api_key: ApiKey | None = None  # None: authentication is off or the route is open
    log_extra: dict[str, Any] = field(default_factory=dict)  # extra fields of the access line
    audit: list[dict[str, Any]] = field(default_factory=list)  # one entry per noted steering
    json_body: Any = UNPARSED  # the request body as the body checks parsed it
    finalizers: list[Callable[[], None]] = field(default_factory=list)  # run by `finish`
    audit_salt: bytes = b""  # the audit log's prompt-hash key (set by the audit middleware)
    field_chars: int = 256  # the longest string a log or audit line carries
    admission: Any = None  # policy.Admission: what the rate limits were charged (None: nothing)

    def take_json_body(self) -> Any:
        """The parsed body, handed over once (UNPARSED when there is none to hand over)."""
        body, self.json_body = self.json_body, UNPARSED
        return body

    def finish(self) -> None:
        """Run the finalizers once (the response has been sent, or the request failed)."""
        while self.finalizers:
            self.finalizers.pop()()

    @property
    def key_id(self) -> str | None:
        return self.api_key.id if self.api_key is not None else None

    def note_error(self, code: str | None, param: str | None) -> None:
        """Put an error's code and param in the access and audit lines."""
        self.log_extra["error"] = {"code": code, "param": param}


def cap(value: Any, chars: int, items: int = 256) -> Any:
    """`value` with every string (nested in dicts and lists too, keys included) cut to `chars`
    characters and every list and dict to `items` entries: what a log or audit line may carry
    from a request."""
    if isinstance(value, str):
        return value if len(value) <= chars else value[:chars] + f"…(+{len(value) - chars})"
    if isinstance(value, dict):
        out = {str(k)[:chars]: cap(v, chars, items) for k, v in list(value.items())[:items]}
        if len(value) > items:
            out["…"] = f"+{len(value) - items} more"
        return out
    if isinstance(value, list | tuple):
        out = [cap(v, chars, items) for v in value[:items]]
        return out + [f"…(+{len(value) - items})"] if len(value) > items else out
    return value


def request_context(holder: Any) -> RequestContext:
    """The context of a request (a Starlette `Request` or an ASGI scope), created on first use."""
    scope = getattr(holder, "scope", holder)
    state = scope.setdefault("state", {})
    ctx = state.get(CONTEXT_KEY)
    if ctx is None:
        ctx = state[CONTEXT_KEY] = RequestContext()
    return ctx
