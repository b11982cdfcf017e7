"""OpenAI-style errors, `{"error": {"message", "type", "param", "code"}}`, for every failure: the
types every layer of the server raises (the FastAPI handlers that answer with them are in
`server.api.errors`).

A bad request is a 4xx that says what was wrong; a 5xx is a bug (or an engine failure), and it
carries the request id so it can be found in the logs.
"""

from __future__ import annotations

from enum import StrEnum

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic_core import PydanticCustomError

from steering.interventions.schema import TOO_MANY


class ErrorCode(StrEnum):
    """Every error `code` the server answers with: one enum, used by every layer (a test checks
    that no raise site spells a code as a string)."""

    # the body and its schema (server.security.hardening, server.api.protocol)
    INVALID_JSON = "invalid_json"
    INVALID_VALUE = "invalid_value"
    REQUEST_TOO_LARGE = "request_too_large"
    TOO_MANY_ITEMS = "too_many_items"  # a list past its hard ceiling (the schema's `at_most`)
    UNSUPPORTED_PARAMETER = "unsupported_parameter"
    UNSUPPORTED_CONTENT = "unsupported_content"
    INVALID_COMBINATION = "invalid_combination"  # fields that do not go together
    EMPTY_MESSAGES = "empty_messages"
    EMPTY_PROMPT = "empty_prompt"
    EMPTY_STEERING = "empty_steering"
    EMPTY_VARIANTS = "empty_variants"
    # the settings' limits (server.api.validation)
    TOO_MANY_MESSAGES = "too_many_messages"
    TOO_MANY_PROMPTS = "too_many_prompts"
    TOO_MANY_CHOICES = "too_many_choices"
    TOO_MANY_STOP = "too_many_stop_sequences"
    TOO_MANY_STEERING_OBJECTS = "too_many_steering_objects"
    TOO_MANY_VARIANTS = "too_many_variants"
    STOP_TOO_LONG = "stop_too_long"
    N_TOO_LARGE = "n_too_large"
    TOP_LOGPROBS_TOO_LARGE = "top_logprobs_too_large"
    MAX_TOKENS_TOO_LARGE = "max_tokens_too_large"
    PROMPT_TOO_LONG = "prompt_too_long"
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
    INVALID_MESSAGES = "invalid_messages"
    INVALID_TOKEN = "invalid_token"
    INVALID_PACK_NAME = "invalid_pack_name"
    INVALID_PRESET_NAME = "invalid_preset_name"
    # the model and its steering
    MODEL_NOT_FOUND = "model_not_found"
    PRESET_NOT_FOUND = "preset_not_found"
    PACK_NOT_FOUND = "pack_not_found"
    METHOD_NOT_IN_PACK = "method_not_in_pack"
    STRENGTH_OUT_OF_RANGE = "strength_out_of_range"
    INVALID_STEERING = "invalid_steering"
    # reading the stream (server.api.monitoring, readout, raw vectors, extraction jobs)
    INVALID_VECTOR = "invalid_vector"
    TOO_MANY_MONITORS = "too_many_monitors"
    INVALID_MONITOR = "invalid_monitor"
    DUPLICATE_MONITOR = "duplicate_monitor"
    PRESET_NOT_ALLOWED = "preset_not_allowed"
    UNSUPPORTED_ENGINE = "unsupported_engine"  # the serving engine cannot read the stream
    INVALID_CAPTURE = "invalid_capture"
    CAPTURE_TOO_LARGE = "capture_too_large"
    POSITION_OUT_OF_RANGE = "position_out_of_range"
    EXTRACT_QUOTA = "extract_quota"
    EXTRACTION_BUSY = "extraction_busy"
    JOB_EXISTS = "job_exists"
    JOB_NOT_FOUND = "job_not_found"
    UNKNOWN_DATASET = "unknown_dataset"
    INVALID_EXAMPLES = "invalid_examples"
    MIXED_EXAMPLES = "mixed_examples"
    # keys, policy, rate limits (server.security)
    MISSING_API_KEY = "missing_api_key"
    INVALID_API_KEY = "invalid_api_key"
    POLICY_METHODS = "policy_methods"
    POLICY_PRESETS = "policy_presets"
    POLICY_PACKS = "policy_packs"
    POLICY_LOWER_REFUSAL = "policy_lower_refusal"
    POLICY_STRENGTH = "policy_strength"
    POLICY_MAX_STRENGTH = "policy_max_strength"
    POLICY_MAX_K = "policy_max_k"
    POLICY_RAW_VECTORS = "policy_raw_vectors"
    RATE_LIMIT_REQUESTS = "rate_limit_requests"
    RATE_LIMIT_TOKENS = "rate_limit_tokens"
    RATE_LIMIT_CONCURRENT = "rate_limit_concurrent"
    # pack administration (server.api.pack_admin)
    NOT_ADMIN = "not_admin"
    NOT_PACK_ADMIN = "not_pack_admin"
    PACK_ADMIN_NEEDS_KEYS = "pack_admin_needs_keys"
    PACK_PINNED = "pack_pinned"
    INVALID_REQUEST = "invalid_request"
    PACK_EXISTS = "pack_exists"
    INVALID_BASE64 = "invalid_base64"
    INVALID_PACK = "invalid_pack"
    # the front door (server.security.frontdoor)
    REQUEST_TIMEOUT = "request_timeout"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    REQUEST_HEAD_TOO_LARGE = "request_head_too_large"
    # serving
    NOT_FOUND = "not_found"
    NOT_READY = "not_ready"
    QUEUE_FULL = "queue_full"
    SHUTTING_DOWN = "shutting_down"
    DRAIN_TIMEOUT = "drain_timeout"
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"
    ENGINE_ERROR = "engine_error"
    INTERNAL_ERROR = "internal_error"


INVALID = "invalid_request_error"
API_ERROR = "api_error"  # a protocol validator's error: its ctx names `param` and `code`


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = INVALID,
                 param: str | None = None, code: ErrorCode | None = None,
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


def bad_request(message: str, param: str | None, code: ErrorCode) -> APIError:
    return APIError(400, message, param=param, code=code)


def not_found(message: str, param: str | None, code: ErrorCode) -> APIError:
    return APIError(404, message, param=param, code=code)


def api_error(message: str, param: str | None, code: ErrorCode) -> PydanticCustomError:
    """What a protocol model's validator raises: a 400 naming `param` and `code`."""
    return PydanticCustomError(API_ERROR, message, {"param": param, "code": str(code)})


def unsupported(param: str, message: str | None = None) -> PydanticCustomError:
    return api_error(message or f"{param} is not supported by this server", param,
                     ErrorCode.UNSUPPORTED_PARAMETER)


PARAM_PART_CHARS = 64  # a field name in `param` (a client's unknown key may be any length)


def loc_param(loc: tuple) -> str | None:
    parts = [p for p in loc if p != "body"]
    if not parts:
        return None
    out = ""
    for p in parts[:16]:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            name = str(p)
            name = name if len(name) <= PARAM_PART_CHARS else name[:PARAM_PART_CHARS] + "…"
            out += ("." if out else "") + name
    return out


def validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    for err in errors:
        if err.get("type") == "json_invalid":
            detail = (err.get("ctx") or {}).get("error", "")
            return bad_request(f"could not parse the request body as JSON"
                               f"{f' ({detail})' if detail else ''}", None,
                               ErrorCode.INVALID_JSON)
    for err in errors:  # a validator's own error (server.api.protocol) says it all
        if err.get("type") == API_ERROR:
            ctx = err.get("ctx") or {}
            param = ctx.get("param") or loc_param(tuple(err.get("loc", ())))
            return bad_request(err.get("msg", "invalid value"), param,
                               ErrorCode(ctx.get("code") or ErrorCode.INVALID_VALUE))
    for err in errors:  # a list past its bound (the schema's `at_most`)
        if err.get("type") == TOO_MANY:
            param = loc_param(tuple(err.get("loc", ())))
            msg = err.get("msg", "too many items")
            return bad_request(f"{param}: {msg}" if param else msg, param,
                               ErrorCode.TOO_MANY_ITEMS)
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
    return bad_request("; ".join(messages), first_param, ErrorCode.INVALID_VALUE)


