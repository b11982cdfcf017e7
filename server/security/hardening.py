"""Input hardening: body size, JSON that Python accepts but JSON does not, odd unicode, and names
that must stay inside their folder.

`BodyLimitMiddleware` runs after authentication (an unauthenticated request is refused before its
body is read). It reads each POST/PUT/PATCH body once (413 past `max_body_bytes`, whatever
Content-Length says) and refuses, with 400 and a clear message: `NaN`/`Infinity` anywhere, nesting
deeper than 64, lone UTF-16 surrogates and NUL characters in any string. Right-to-left marks and
other printable unicode pass. Parsing flags non-finite numbers and a regex flags suspect escapes,
so a clean body costs one parse and one pass over its containers; a flagged one is walked value by
value with one iterator per open container (O(n) time, O(depth) extra memory; the path is rebuilt
only for the error) to name the field, and
bodies past `OFF_LOOP_BYTES` are parsed and walked in a worker thread, off the event loop. The
parsed body is kept in the request context, and the API routes validate it without parsing the
bytes again (`server.api.routing`).
The request limits themselves (counts, lengths, names in a request) are `server.api.validation`'s.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.context import UNPARSED, request_context
from server.errors import APIError, ErrorCode, bad_request
from server.security.audit import route_path

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # packs, presets: no '/', no '..'
MAX_DEPTH = 64
OFF_LOOP_BYTES = 64 * 1024  # larger bodies are checked in a worker thread


def valid_name(name: str) -> bool:
    """A pack or preset name: letters, digits, '.', '_', '-', not starting with a dot."""
    return bool(NAME_RE.match(name)) and ".." not in name


def check_name(name: str, what: str, param: str) -> None:
    if not valid_name(name):
        raise bad_request(f"invalid {what} name {name[:80]!r}: use 1–64 letters, digits, '.', "
                          "'_' or '-' (no paths)", param, ErrorCode(f"invalid_{what}_name"))


# ---- request bodies ----------------------------------------------------------------------------


class _NonFinite(str):
    """What `NaN`, `Infinity` and `-Infinity` parse to here, so the walk can name where."""


def _param(path: list) -> str | None:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else ("." if out else "") + str(p)
    return out or None


def _string_problem(s: str) -> str | None:
    if "\x00" in s:
        return "strings must not contain NUL (U+0000) characters"
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return "strings must not contain lone UTF-16 surrogates (invalid unicode)"
    return None


def _value_problem(v) -> str | None:
    if isinstance(v, _NonFinite):
        return f"{str(v)} is not valid JSON; numbers must be finite"
    if isinstance(v, str):
        return _string_problem(v)
    if isinstance(v, float) and not math.isfinite(v):
        return "numbers must be finite (this one overflows)"
    return None


def _children(v):
    if isinstance(v, dict):
        return iter(v.items())
    if isinstance(v, list):
        return enumerate(v)
    return None


_PLAIN = frozenset({int, bool, type(None)})


def _walk(value) -> tuple[str, str | None] | None:
    """The first problem (message, param) in the parsed body's values or depth.

    Depth-first with one iterator per open container: every value is visited once and nothing
    is copied per element; `path` holds the keys of the open branch (at most MAX_DEPTH)."""
    problem = _value_problem(value)
    if problem:
        return problem, None
    top = _children(value)
    if top is None:
        return None
    iters, path = [top], [None]
    while iters:
        try:
            key, v = next(iters[-1])
        except StopIteration:
            iters.pop()
            path.pop()
            continue
        path[-1] = key
        if type(v) in _PLAIN and type(key) is int:  # a list's number, bool or null: nothing to check
            continue
        if isinstance(key, str):
            problem = _string_problem(key)
            if problem:
                return problem, _param(path[:-1])
        problem = _value_problem(v)
        if problem:
            return problem, _param(path)
        child = _children(v)
        if child is not None:
            if len(iters) >= MAX_DEPTH:
                return f"the JSON body is nested deeper than {MAX_DEPTH} levels", None
            iters.append(child)
            path.append(None)
    return None


# A JSON string escape that may decode to NUL or to half of a UTF-16 surrogate pair. Raw NUL and
# raw invalid UTF-8 never reach the walk: `json.loads` refuses them itself.
_SUSPECT_ESCAPE = re.compile(rb"\\u(?:0000|[dD][89a-fA-F])")
# A number literal that may overflow a float to inf: an exponent of 3+ digits or 300+ digits.
_SUSPECT_NUMBER = re.compile(rb"[eE][+]?0*[1-9][0-9]{2}|[0-9]{300}")


def _too_deep(value) -> bool:
    """Whether containers nest deeper than MAX_DEPTH: visits containers only, copies nothing."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if depth > MAX_DEPTH:
            return True
        for child in (v.values() if type(v) is dict else v) if type(v) in (dict, list) else ():
            if type(child) is dict or type(child) is list:
                stack.append((child, depth + 1))
    return False


def check_json(body: bytes) -> Any:
    """Refuse (400) what `_walk` refuses, at C speed for the common case; return the parsed body
    (`UNPARSED` when it is empty or not JSON: FastAPI's parser then reports it).

    The parser flags `NaN`/`Infinity` as it goes and regexes over the raw bytes flag escapes that
    can decode to NUL or a lone surrogate and numbers that can overflow; only a flagged body (or a too-deep one) is walked
    value by value to name the offending field, so a 1 MiB array of numbers costs one parse and
    one pass over its containers instead of a Python call per value."""
    if not body.strip():
        return UNPARSED
    flagged = False

    def _constant(name: str) -> _NonFinite:
        nonlocal flagged
        flagged = True
        return _NonFinite(name)

    try:
        data = json.loads(body, parse_constant=_constant)
    except ValueError:  # JSONDecodeError, bad UTF-8: FastAPI's own parser reports it
        return UNPARSED
    except RecursionError:
        raise bad_request(f"the JSON body is nested deeper than {MAX_DEPTH} levels", None,
                          ErrorCode.INVALID_JSON) from None
    if not (flagged or _SUSPECT_ESCAPE.search(body) or _SUSPECT_NUMBER.search(body)
            or _too_deep(data)):
        return data
    problem = _walk(data)
    if problem:
        message, param = problem
        raise bad_request(f"{param}: {message}" if param else message, param,
                          ErrorCode.INVALID_VALUE)
    return data


def declared_length(scope: Scope) -> int:
    """The request's Content-Length (0 when absent or not a number)."""
    for k, v in scope.get("headers", []):
        if k.lower() == b"content-length":
            try:
                return int(v)
            except ValueError:
                return 0
    return 0


def too_large(limit: int) -> APIError:
    return APIError(413, f"the request body exceeds {limit} bytes", code=ErrorCode.REQUEST_TOO_LARGE)


class BodyLimitMiddleware:
    """`streamed`: routes (path → their own limit) that read their body themselves, in chunks
    (the pack upload); only a declared length above that limit is refused here."""

    def __init__(self, app: ASGIApp, max_bytes: int, streamed: dict[str, int] | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.streamed = dict(streamed or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in {"POST", "PUT", "PATCH"}:
            await self.app(scope, receive, send)
            return
        own = self.streamed.get(route_path(scope))
        if own is not None:
            if declared_length(scope) > own:
                await too_large(own).response()(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        too_big = too_large(self.max_bytes)
        if declared_length(scope) > self.max_bytes:
            await too_big.response()(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await too_big.response()(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            if len(body) > OFF_LOOP_BYTES:
                parsed = await asyncio.to_thread(check_json, body)
            else:
                parsed = check_json(body)
        except APIError as err:
            await err.response()(scope, receive, send)
            return
        request_context(scope).json_body = parsed  # the routes use it: one parse per body
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
