"""OpenAI-style errors, `{"error": {"message", "type", "param", "code"}}`, for every failure: the
types every layer of the server raises (the FastAPI handlers that answer with them are in
`server.api.errors`).

A bad request is a 4xx that says what was wrong; a 5xx is a bug (or an engine failure), and it
carries the request id so it can be found in the logs.
"""

from __future__ import annotations

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic_core import PydanticCustomError

from steering.interventions.schema import TOO_MANY

INVALID = "invalid_request_error"
API_ERROR = "api_error"  # a protocol validator's error: its ctx names `param` and `code`


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = INVALID,
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(message: str, type: str = INVALID, param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def not_found(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(404, message, param=param, code=code)


def api_error(message: str, param: str | None, code: str | None = None) -> PydanticCustomError:
    """What a protocol model's validator raises: a 400 naming `param` and `code`."""
    return PydanticCustomError(API_ERROR, message, {"param": param, "code": code})


def unsupported(param: str, message: str | None = None) -> PydanticCustomError:
    return api_error(message or f"{param} is not supported by this server", param,
                     "unsupported_parameter")


def loc_param(loc: tuple) -> str | None:
    parts = [p for p in loc if p != "body"]
    if not parts:
        return None
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out


def validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    for err in errors:
        if err.get("type") == "json_invalid":
            detail = (err.get("ctx") or {}).get("error", "")
            return bad_request(f"could not parse the request body as JSON"
                               f"{f' ({detail})' if detail else ''}", code="invalid_json")
    for err in errors:  # a validator's own error (server.api.protocol) says it all
        if err.get("type") == API_ERROR:
            ctx = err.get("ctx") or {}
            param = ctx.get("param") or loc_param(tuple(err.get("loc", ())))
            return bad_request(err.get("msg", "invalid value"), param,
                               ctx.get("code"))
    for err in errors:  # a list past its bound (the schema's `at_most`)
        if err.get("type") == TOO_MANY:
            param = loc_param(tuple(err.get("loc", ())))
            msg = err.get("msg", "too many items")
            return bad_request(f"{param}: {msg}" if param else msg, param, TOO_MANY)
    messages, first_param = [], None
    for err in errors[:5]:
        param = loc_param(tuple(err.get("loc", ())))
        first_param = first_param or param
        msg = err.get("msg", "invalid value")
        if err.get("type") == "missing" and param is None:
            msg = "a JSON object body is required"
        if err.get("type") == "model_attributes_type" and param is None:
            msg = "the request body must be a JSON object"
        messages.append(f"{param}: {msg}" if param else msg)
    if len(errors) > 5:
        messages.append(f"… and {len(errors) - 5} more")
    return bad_request("; ".join(messages), param=first_param, code="invalid_value")


