"""The shared base of the request and response shapes (one module per endpoint over it, as
vLLM's `entrypoints/openai` protocol is laid out): the lenient base model, which logs the unknown
fields it ignores, the `steering` field (one object or a list), the sampling fields every
generating request has and their conversion to the engine's `SamplingParams`, chat messages,
usage and logprobs, stream chunks that leave unset fields out, and the error body.

Unknown fields are ignored, as OpenAI-compatible servers do, and logged (`Lenient`: names only,
capped); the few whose silent omission would mislead (tools, logit_bias, non-zero penalties, …)
are refused by the models' validators, which name the field (`param`) and an `ErrorCode`. Numbers
must be finite everywhere (`NaN`/`Infinity` are refused). Every list is bounded before its items
are validated (`at_most`, the ceilings in `server.settings`); the limits that depend on the
server's settings or on the model are `server.api.validation`'s.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from server.engine import SamplingParams
from server.errors import API_ERROR, ErrorCode, api_error, loc_param, unsupported
from server.settings import (
    CEILING_CONTENT_PARTS,
    CEILING_MAPPING,
    CEILING_STOP,
    CEILING_STOP_CHARS,
)
from steering.interventions.schema import (  # noqa: F401 (the echo types re-exported)
    TOO_MANY,
    Applied,
    AppliedSteering,
    ConditionObject,
    ConditionResult,
    MonitorObject,
    SteeringObject,
    SteeringValue,
    at_most,
)

log = logging.getLogger("server.protocol")

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
LOGGED_NAMES, LOGGED_CHARS = 16, 64  # at most this many ignored field names, each this long


class Lenient(BaseModel):
    """Unknown fields are kept and ignored (OpenAI clients send fields we do not use), and their
    names logged once per model (at most `LOGGED_NAMES`, each cut to `LOGGED_CHARS`), as vLLM's
    base model does: the server log shows what a request asked that the server did not act on."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    @model_validator(mode="after")
    def _log_ignored(self):
        extra = self.__pydantic_extra__
        if extra:
            names = [repr(str(k)[:LOGGED_CHARS]) for k in list(extra)[:LOGGED_NAMES]]
            more = f" (+{len(extra) - LOGGED_NAMES} more)" if len(extra) > LOGGED_NAMES else ""
            log.warning("%s: ignored unknown fields %s%s", type(self).__name__,
                        ", ".join(names), more)
        return self


# ---- the steering field ------------------------------------------------------------------------


MAX_STEERING_OBJECTS = 8  # in one request's list

# The steering object's schema is the library's, shared with the clients.
ConditionParams = ConditionObject
SteeringParams = SteeringObject


def _steering_object(value: Any, where: str) -> SteeringParams:
    if isinstance(value, SteeringParams):
        return value
    try:
        return SteeringParams.model_validate(value)
    except ValidationError as exc:
        raise nested_error(exc, where) from None


def nested_error(exc: ValidationError, where: str):
    """A nested model's first validation error as an API error whose param starts at `where`."""
    err = exc.errors()[0]
    ctx = err.get("ctx") or {}
    own = err.get("type") == API_ERROR
    inner = (ctx.get("param") if own else None) or loc_param(tuple(err.get("loc", ())))
    param = f"{where}.{inner}" if inner else where
    code = ErrorCode(ctx["code"]) if own and ctx.get("code") else (
        ErrorCode.TOO_MANY_ITEMS if err.get("type") == TOO_MANY else ErrorCode.INVALID_VALUE)
    return api_error(f"{param}: {err.get('msg', 'invalid value')}", param, code)


def parse_steering(value: Any, where: str = "steering") -> SteeringValue | None:
    """One steering object or a non-empty list of them; errors name the element's field."""
    if value is None:
        return None
    if isinstance(value, list):
        if not value:
            raise api_error(f"{where} must hold at least one steering object", where,
                            ErrorCode.EMPTY_STEERING)
        if len(value) > MAX_STEERING_OBJECTS:
            raise api_error(f"{where} may hold at most {MAX_STEERING_OBJECTS} steering objects,"
                            f" got {len(value)}", where, ErrorCode.TOO_MANY_STEERING_OBJECTS)
        return [_steering_object(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return _steering_object(value, where)


MAX_MONITORS = 8  # in one request's `monitor` list


def parse_monitor(value: Any) -> list[str | MonitorObject] | None:
    """`monitor`: a list of pack names or monitor objects (`server.api.monitoring`); errors name
    the entry."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise api_error("monitor must be a list of pack names or monitor objects", "monitor",
                        ErrorCode.INVALID_VALUE)
    if len(value) > MAX_MONITORS:
        raise api_error(f"monitor may hold at most {MAX_MONITORS} entries, got {len(value)}",
                        "monitor", ErrorCode.TOO_MANY_MONITORS)
    out: list[str | MonitorObject] = []
    for i, entry in enumerate(value):
        if isinstance(entry, str | MonitorObject):
            out.append(entry)
            continue
        try:
            out.append(MonitorObject.model_validate(entry))
        except ValidationError as exc:
            raise nested_error(exc, f"monitor[{i}]") from None
    return out


# ---- what every generating request has ---------------------------------------------------------


class StreamOptions(Lenient):
    include_usage: bool = False


class TextPart(Lenient):
    type: str
    text: str | None = None


class ChatMessage(Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[str | list[TextPart] | None,
                       at_most(CEILING_CONTENT_PARTS, "content parts")] = None
    name: str | None = None
    # an assistant turn's calls (server.api.tools), and a tool turn's call id
    tool_calls: Annotated[list[dict[str, Any]] | None,
                          at_most(CEILING_CONTENT_PARTS, "tool calls")] = None
    tool_call_id: str | None = None


def some_messages(messages: list[ChatMessage] | None) -> list[ChatMessage] | None:
    if messages is not None and not messages:
        raise api_error("messages must hold at least one message", "messages",
                        ErrorCode.EMPTY_MESSAGES)
    return messages


def _bounded_stop(value: Any) -> Any:
    """Stop sequences within their ceilings (count, characters) before anything else."""
    stops = value if isinstance(value, list) else [value]
    at_most(CEILING_STOP, "stop sequences").func(stops)
    for i, stop in enumerate(stops):
        if isinstance(stop, str) and len(stop) > CEILING_STOP_CHARS:
            where = f"stop[{i}]" if isinstance(value, list) else "stop"
            raise api_error(f"{where} has {len(stop)} characters; at most {CEILING_STOP_CHARS} "
                            "are allowed", where, ErrorCode.STOP_TOO_LONG)
    return value


class Sampling(Lenient):
    """The sampling fields every generating request has, and their conversion."""

    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop: Annotated[str | list[str] | None, BeforeValidator(_bounded_stop)] = None
    user: str | None = None
    ignore_eos: bool = Field(False, description="keep generating past the end-of-sequence token "
                                                "(vLLM's extension; for benchmarks)")

    def stop_list(self) -> list[str]:
        """The stop strings as a list (empty ones dropped)."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [x for x in stops if x]

    def top_logprobs_count(self) -> int | None:
        """How many top log-probabilities each token reports (None: no logprobs at all)."""
        return None

    def to_sampling_params(self, max_tokens: int, choice: int = 0) -> SamplingParams:
        """The engine's sampling for choice `choice` (its seed is the request's + `choice`)."""
        top = self.top_logprobs_count()
        seed = None if self.seed is None else (self.seed + choice) % (2**63)
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else float(self.temperature),
            top_p=1.0 if self.top_p is None else float(self.top_p), seed=seed,
            stop=self.stop_list(), logprobs=top is not None, top_logprobs=top or 0,
            ignore_eos=self.ignore_eos)


class SamplingFields(Sampling):
    model: str | None = Field(None, description="served model id, or '<model>+<preset>'")
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: Annotated[dict[str, float] | None, at_most(CEILING_MAPPING)] = None
    steering: SteeringParams | list[SteeringParams] | None = Field(
        None, description="a steering object, or a list of them applied in order")

    monitor: list[str | MonitorObject] | None = Field(
        None, description="packs whose DiM axis is scored at every generated token (names, or "
                          "{pack, layer, name}, or a probe {vector, bias}); the scores come back "
                          "per choice and per chunk")

    @field_validator("steering", mode="before")
    @classmethod
    def _steering_shape(cls, value):
        return parse_steering(value)

    @field_validator("monitor", mode="before")
    @classmethod
    def _monitor_shape(cls, value):
        return parse_monitor(value)

    # Fields accepted for compatibility but refused when set (name → note on what is allowed).
    UNSUPPORTED: ClassVar[dict[str, str]] = {"logit_bias": "", "presence_penalty": " (only 0)",
                                             "frequency_penalty": " (only 0)"}

    @model_validator(mode="after")
    def _refuse_unsupported(self):
        for name, note in self.UNSUPPORTED.items():
            if getattr(self, name):
                raise unsupported(name, f"{name} is not supported by this server{note}")
        return self

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise api_error("stream_options is only allowed when stream is true",
                            "stream_options", ErrorCode.INVALID_COMBINATION)
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


# ---- what every response has --------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class Monitored(BaseModel):
    """A choice that may carry monitor scores (`server.api.monitoring`): left out of the JSON
    when the request asked for none."""

    monitor: dict[str, Any] | None = None

    @model_serializer(mode="wrap")
    def _omit_monitor(self, handler):
        data = handler(self)
        if data.get("monitor", 0) is None:
            data.pop("monitor")
        return data


class Envelope(BaseModel):
    """What every completion response and stream chunk carries, in OpenAI's order; each
    endpoint narrows `object` and `choices` (and makes `usage`/`steering` required where a full
    response always has them)."""

    id: str
    object: str
    created: int
    model: str
    choices: list
    usage: Usage | None = None
    system_fingerprint: str | None = None
    steering: Applied | None = None


class OmitUnset(BaseModel):
    """A model whose `OMIT_UNSET` fields are left out of its JSON unless they were set (the
    wire format of OpenAI's stream chunks: `usage` only when asked for, `role` only once)."""

    OMIT_UNSET: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler):
        data = handler(self)
        for name in self.OMIT_UNSET:
            if name not in self.model_fields_set:
                data.pop(name, None)
        return data

    def sse(self) -> str:
        """This chunk as one server-sent event."""
        return f"data: {self.model_dump_json()}\n\n"


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# The error bodies every endpoint documents (OpenAPI `responses`).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 413, 429, 500, 503, 504)}
