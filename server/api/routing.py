"""Routes that validate the body the security layer already parsed: one JSON parse per request.

`BodyLimitMiddleware` (server/security/hardening.py) parses every POST body to check it and keeps
the result in the request context. FastAPI would parse the bytes a second time for the route's
protocol model; `CheckedBodyRoute` hands it the parsed value instead (FastAPI's documented way
to change how a route reads its request: a custom `APIRoute` with its own `Request` class).
A body the checks did not parse (empty, not JSON) goes through FastAPI's parser as before.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from server.context import UNPARSED, request_context


class CheckedBodyRequest(Request):
    async def json(self) -> Any:
        parsed = request_context(self).take_json_body()
        if parsed is UNPARSED:
            return await super().json()
        return parsed


class CheckedBodyRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def checked_body_handler(request: Request) -> Response:
            return await handler(CheckedBodyRequest(request.scope, request.receive))

        return checked_body_handler
