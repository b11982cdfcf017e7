"""The FastAPI exception handlers: every failure as an OpenAI-style error body
(`server.errors`), with the error's code and param noted for the access log."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.context import request_context
from server.errors import INVALID, APIError, ErrorCode, error_body, validation_error

log = logging.getLogger("server")


def _note(request: Request, exc: APIError) -> APIError:
    """Put the error's code and param in the access log line."""
    request_context(request).note_error(exc.code, exc.param)
    return exc


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return _note(request, exc).response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return _note(request, validation_error(exc)).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        return JSONResponse(error_body(message, INVALID if exc.status_code < 500 else
                                       "server_error"),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        rid = request_context(request).request_id
        log.exception("unhandled error in request %s", rid)
        return JSONResponse(error_body(f"internal error (request id {rid})", "server_error",
                                       code=ErrorCode.INTERNAL_ERROR), status_code=500)
