"""The audit log: structured JSON lines on `steer.audit`, two per steered request.

An **admission line** (`event: "admission"`) is written the moment the policy decides (before any
steering is built or the prompt tokenized), so a crash mid-generation still leaves a record of
every admitted request; a **completion line** (`event: "steered_request"`) once the response has
been sent, with the final status. Each holds the time, the server's request id (and the client's
`X-Request-ID` as `client_request_id`), the key id (never the key; `anonymous` without one), the
endpoint, the checked steering (method, strength, k, layers, pack, preset; targeting and the
condition — on the completion line with its decided score; a list as `method: "composed"` with
every object under `steering`), the tokens charged, and a salted hash of the prompt
(`prompt_hmac_sha256`: HMAC-SHA256 keyed with `STEER_AUDIT_SALT`, or a random per-process key;
a plain SHA-256 of a short prompt could be reversed by guessing) — never its text. The completion
line adds the final HTTP status, the outcome (e.g. `client_closed`, `denied`) and the token
counts. A request refused by policy or rate limit carries `denied` naming the rule on both. A
request refused before its steering was checked — no or a wrong key (401), a route the key may
not use (403), a body that fails validation (4xx on a POST) — still gets one line, with `event:
"denied_request"`, the error code and no steering.

Every field is capped (`server.context.cap`: strings at `STEER_LOG_FIELD_CHARS`, lists and
mappings at `MAX_ITEMS` entries), so no request can make a line long.

Pack uploads and deletions (`server.api.pack_admin`) write one line each at once (`pack_event`:
`event: "pack_uploaded"` / `"pack_deleted"`, the key id, the pack's name, concept, tensor and
sidecar SHA-256); a refused attempt gets the `denied_request` line like any other 4xx.

`policy.enforce` notes each request (`note`); `AuditMiddleware` (outside authentication) writes
the lines once the response has been sent, when status and token counts are known. Each line is
one `write` of one JSON object and a newline. `STEER_AUDIT_LOG` also appends them to a file.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.context import RequestContext, cap, request_context
from steering.interventions.schema import Applied, AppliedSteering

audit_log = logging.getLogger("steer.audit")
audit_log.setLevel(logging.INFO)  # always recorded, whatever the root level
MAX_ITEMS = 64  # entries of a list or mapping an audit line carries
SALT = os.urandom(32)  # the prompt-hash key of a request no audit middleware saw (tests)


def route_path(scope: Scope) -> str:
    """The path the router matches: `path` less the `root_path` it was mounted under."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        return path[len(root):] or "/"
    return path


def prompt_hash(prompt: str | Iterable[str] | None, salt: bytes) -> str | None:
    """HMAC-SHA256 of the prompt's UTF-8 (several prompts: joined by NUL), keyed with `salt`."""
    if prompt is None:
        return None
    parts = [prompt] if isinstance(prompt, str) else list(prompt)
    data = "\x00".join(parts).encode("utf-8", "surrogatepass")
    return hmac.new(salt, data, hashlib.sha256).hexdigest()


def _object(a: AppliedSteering) -> dict:
    out = {"method": a.method, "strength": a.strength, "k": a.k, "layers": a.layers,
           "pack": a.pack, "preset": a.preset}
    if a.apply_to != "all" or a.generation_window is not None:
        out.update(apply_to=a.apply_to, generation_window=a.generation_window)
    if a.when is not None:
        out.update(when=a.when, condition=a.condition.model_dump() if a.condition else None)
    if a.vector is not None:  # a raw vector: its SHA-256, norm, shape and layer, never its data
        out["vector"] = a.vector
    return out


def steering_fields(applied: Applied) -> dict:
    """The audit line's steering fields for one object or a list."""
    if isinstance(applied, list):
        return {"method": "composed", "preset": applied[0].preset if applied else None,
                "steering": [_object(a) for a in applied]}
    return _object(applied)


def note(request: Request, applied: Applied, *, prompt=None, tokens: int = 0,
         key_id: str | None = None, endpoint: str | None = None) -> dict:
    """Record one steered request (or compare variant) for the line written after the response."""
    ctx = request_context(request)
    entry = {"key_id": key_id, "endpoint": endpoint or route_path(request.scope),
             **steering_fields(applied),
             "prompt_hmac_sha256": prompt_hash(prompt, ctx.audit_salt or SALT),
             "tokens_charged": tokens}
    ctx.audit.append(entry)
    return entry


def admission(request: Request, entries: list[dict], denied=None) -> None:
    """The admission lines of noted entries, written now: admitted, or `denied` (an APIError)
    with its code and status."""
    ctx = request_context(request)
    for entry in entries:
        _emit(ctx, {"ts": datetime.now(UTC).isoformat(timespec="milliseconds"),
                    "time": time.time(), "event": "admission", "request_id": ctx.request_id,
                    "client_request_id": ctx.client_request_id, **entry,
                    "key_id": entry.get("key_id") or _key_id(ctx), "admitted": denied is None,
                    **({"status": denied.status, "denied": denied.code} if denied else {})})


def decide_notes(ctx: RequestContext, decided: list[Applied]) -> None:
    """Put the steering as applied (conditions decided at prefill) into the noted lines, one per
    noted request or compare variant, in order."""
    for entry, applied in zip(ctx.audit, decided):
        entry.update(steering_fields(applied))


class _AppendHandler(logging.Handler):
    """Appends each record as one `write` of one line to a file opened with O_APPEND: a process
    killed mid-write leaves whole lines only (no buffered half-line), and several processes may
    share the file."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = (self.format(record).replace("\n", " ") + "\n").encode("utf-8")
            while data:  # a regular file takes the whole line at once; loop only if it does not
                data = data[os.write(self.fd, data):]
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass
        super().close()


def _add_file(path: str) -> None:
    target = str(Path(path).resolve())
    if any(getattr(h, "_steer_audit", None) == target for h in audit_log.handlers):
        return
    handler = _AppendHandler(target)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler._steer_audit = target  # type: ignore[attr-defined]
    audit_log.addHandler(handler)
    audit_log.setLevel(logging.INFO)


class AuditMiddleware:
    def __init__(self, app: ASGIApp, path: str | None = None, max_field_chars: int = 256,
                 salt: str | None = None):
        self.app = app
        self.field_chars = max_field_chars
        self.salt = salt.encode("utf-8") if salt else os.urandom(32)  # per app: per process
        if path:
            _add_file(path)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}
        ctx = request_context(scope)
        ctx.audit_salt, ctx.field_chars = self.salt, self.field_chars

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            ctx.finish()  # e.g. the key's in-flight slot (policy)
            write_lines(scope, status["code"])


def _key_id(ctx: RequestContext) -> str:
    return ctx.key_id or "anonymous"


def write_lines(scope: Scope, status: int) -> None:
    """The request's audit lines: one per noted steering, or one for a refused request."""
    ctx = request_context(scope)
    extra = ctx.log_extra
    common = {"request_id": ctx.request_id, "client_request_id": ctx.client_request_id}
    entries = ctx.audit
    for entry in entries:
        line = {"ts": datetime.now(UTC).isoformat(timespec="milliseconds"),
                "time": time.time(), "event": "steered_request", **common, **entry,
                "key_id": entry.get("key_id") or _key_id(ctx),
                "status": status,
                "outcome": extra.get("outcome") or ("denied" if entry.get("denied") else None),
                "prompt_tokens": extra.get("prompt_tokens"),
                "completion_tokens": extra.get("completion_tokens")}
        _emit(ctx, line)
    if entries or not (status in (401, 403) or (scope.get("method") == "POST"
                                                 and 400 <= status < 500)):
        return
    error = extra.get("error") or {}
    _emit(ctx, {"ts": datetime.now(UTC).isoformat(timespec="milliseconds"),
                "time": time.time(), "event": "denied_request", **common,
                "key_id": _key_id(ctx), "endpoint": route_path(scope), "method": None,
                "strength": None, "k": None, "layers": None, "pack": None, "preset": None,
                "status": status, "outcome": "denied", "denied": error.get("code"),
                "param": error.get("param")})


def pack_event(request: Request, event: str, **fields) -> None:
    """One audit line for a pack loaded or unloaded while serving."""
    ctx = request_context(request.scope)
    _emit(ctx, {"ts": datetime.now(UTC).isoformat(timespec="milliseconds"),
                "time": time.time(), "event": event, "request_id": ctx.request_id,
                "client_request_id": ctx.client_request_id, "key_id": _key_id(ctx),
                "endpoint": route_path(request.scope), **fields})


def _emit(ctx: RequestContext, line: dict) -> None:
    line = cap(line, ctx.field_chars, MAX_ITEMS)
    audit_log.info(json.dumps(line, default=str), extra={"json": line})
