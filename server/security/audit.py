"""The audit log: one structured JSON line per steered request, on the `steer.audit` logger.

Each line holds the time, the request id, the key id (never the key), the endpoint, the resolved
steering (method, strength, k, layers, pack, preset), the final HTTP status (and outcome, e.g.
`client_closed`), the token counts, and the SHA-256 of the prompt — never its text. A request
refused by policy or rate limit is audited too, with `denied` naming the rule.

`policy.enforce` notes each request (`note`); `AuditMiddleware` writes the lines once the
response has been sent, when status and token counts are known. `STEER_AUDIT_LOG` also appends
the lines to a file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.protocol import AppliedSteering

audit_log = logging.getLogger("steer.audit")
audit_log.setLevel(logging.INFO)  # always recorded, whatever the root level


def prompt_hash(prompt: str | Iterable[str] | None) -> str | None:
    """sha256 over the prompt's UTF-8 (several prompts: joined by NUL)."""
    if prompt is None:
        return None
    parts = [prompt] if isinstance(prompt, str) else list(prompt)
    data = "\x00".join(parts).encode("utf-8", "surrogatepass")
    return hashlib.sha256(data).hexdigest()


def note(request: Request, applied: AppliedSteering, *, prompt=None, tokens: int = 0,
         key_id: str | None = None, endpoint: str | None = None) -> dict:
    """Record one steered request (or compare variant) for the line written after the response."""
    entry = {"key_id": key_id, "endpoint": endpoint or request.url.path,
             "method": applied.method, "strength": applied.strength, "k": applied.k,
             "layers": applied.layers, "pack": applied.pack, "preset": applied.preset,
             "prompt_sha256": prompt_hash(prompt), "tokens_charged": tokens}
    notes = getattr(request.state, "audit", None)
    if notes is None:
        notes = []
        request.state.audit = notes
    notes.append(entry)
    return entry


def _add_file(path: str) -> None:
    target = str(Path(path).resolve())
    if any(getattr(h, "_steer_audit", None) == target for h in audit_log.handlers):
        return
    handler = logging.FileHandler(target, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler._steer_audit = target  # type: ignore[attr-defined]
    audit_log.addHandler(handler)
    audit_log.setLevel(logging.INFO)


class AuditMiddleware:
    def __init__(self, app: ASGIApp, path: str | None = None):
        self.app = app
        if path:
            _add_file(path)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            state = scope.get("state") or {}
            for entry in state.get("audit") or []:
                extra = state.get("log_extra") or {}
                line = {"ts": datetime.now(UTC).isoformat(timespec="milliseconds"),
                        "time": time.time(), "event": "steered_request",
                        "request_id": state.get("request_id"), **entry,
                        "status": status["code"],
                        "outcome": extra.get("outcome"),
                        "prompt_tokens": extra.get("prompt_tokens"),
                        "completion_tokens": extra.get("completion_tokens")}
                audit_log.info(json.dumps(line, default=str), extra={"json": line})
