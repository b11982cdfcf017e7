"""Request and response shapes: the OpenAI API's, plus the `steering` object and compare.

Unknown top-level fields are ignored, as OpenAI-compatible servers do; the few whose silent
omission would mislead (tools, logit_bias, non-zero penalties, …) are refused by the models'
validators, which name the field (`param`) and an error `code`. Numbers must be finite everywhere
(`NaN`/`Infinity` are refused). Requests convert themselves, as vLLM's protocol does:
`to_sampling_params(max_tokens, choice)` gives the engine's sampling for one choice and
`SteeringParams.to_spec(pack)` the library's `SteeringSpec` (`steering` may be one object or a
list of them, `parse_steering`: errors name the element, `steering[1].generation_window`);
limits that depend on the server's
settings or on the model (context length, token counts) are checked in `server.api.prepare`.
Stream chunks (`ChatCompletionChunk`, `CompletionChunk`) send `usage` and `steering` only when set.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from server.engine import SamplingParams
from server.errors import API_ERROR, api_error, loc_param, unsupported
from steering.interventions.schema import (  # noqa: F401 (the echo types re-exported)
    Applied,
    AppliedSteering,
    ConditionObject,
    ConditionResult,
    SteeringObject,
    SteeringValue,
)

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class Lenient(BaseModel):
    """Unknown fields are kept and ignored (OpenAI clients send fields we do not use)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


class Strict(BaseModel):
    """Unknown fields are refused (a typo in a steering object must not pass silently)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# ---- requests ----------------------------------------------------------------------------------


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
    return api_error(f"{param}: {err.get('msg', 'invalid value')}", param,
                     ctx.get("code") if own else "invalid_value")


def parse_steering(value: Any, where: str = "steering") -> SteeringValue | None:
    """One steering object or a non-empty list of them; errors name the element's field."""
    if value is None:
        return None
    if isinstance(value, list):
        if not value:
            raise api_error(f"{where} must hold at least one steering object", where,
                            "empty_steering")
        if len(value) > MAX_STEERING_OBJECTS:
            raise api_error(f"{where} may hold at most {MAX_STEERING_OBJECTS} steering objects,"
                            f" got {len(value)}", where, "too_many_steering_objects")
        return [_steering_object(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return _steering_object(value, where)


class StreamOptions(Lenient):
    include_usage: bool = False


class TextPart(Lenient):
    type: str
    text: str | None = None


class ChatMessage(Lenient):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None


def _some_messages(messages: list[ChatMessage] | None) -> list[ChatMessage] | None:
    if messages is not None and not messages:
        raise api_error("messages must hold at least one message", "messages", "empty_messages")
    return messages


class _Sampling(Lenient):
    """The sampling fields every generating request has, and their conversion."""

    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop: str | list[str] | None = None
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


class _SamplingFields(_Sampling):
    model: str | None = Field(None, description="served model id, or '<model>+<preset>'")
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    steering: SteeringParams | list[SteeringParams] | None = Field(
        None, description="a steering object, or a list of them applied in order")

    @field_validator("steering", mode="before")
    @classmethod
    def _steering_shape(cls, value):
        return parse_steering(value)

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
                            "stream_options")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingFields):
    UNSUPPORTED: ClassVar[dict[str, str]] = {**_SamplingFields.UNSUPPORTED, "tools": ""}

    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)
    tools: list[Any] | None = None
    tool_choice: Any | None = None
    response_format: dict[str, Any] | None = None

    @field_validator("messages")
    @classmethod
    def _some_messages(cls, value):
        return _some_messages(value)

    @field_validator("tool_choice")
    @classmethod
    def _no_tool_choice(cls, value):
        if value not in (None, "none"):
            raise unsupported("tool_choice")
        return value

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value):
        if value and value.get("type", "text") != "text":
            raise unsupported("response_format", "only response_format {'type': 'text'} is "
                                                 "supported")
        return value

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise api_error("top_logprobs needs logprobs set to true", "top_logprobs")
        return self

    def top_logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def requested_max_tokens(self) -> tuple[int | None, str]:
        """The completion budget asked for and the field that asked for it."""
        if self.max_completion_tokens:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"


class CompletionRequest(_SamplingFields):
    UNSUPPORTED: ClassVar[dict[str, str]] = {**_SamplingFields.UNSUPPORTED, "suffix": ""}

    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0)
    echo: bool = False
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    @model_validator(mode="after")
    def _supported_combinations(self):
        if self.best_of is not None and self.best_of != self.n:
            raise unsupported("best_of", "best_of other than n is not supported")
        if self.echo and self.logprobs is not None:
            raise unsupported("echo", "echo together with logprobs is not supported (no "
                                      "prompt logprobs)")
        return self

    def top_logprobs_count(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of prompts (text, or token ids)."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            return []
        if isinstance(prompt[0], int):
            return [list(prompt)]
        return list(prompt)


class CompareVariant(SteeringParams):
    """A steering object, optionally on top of a preset (its fields override the preset's), or
    `steering`: a list of steering objects (then no other steering field)."""

    preset: str | None = Field(None, description="preset name whose steering this starts from")
    label: str | None = Field(None, max_length=200, description="shown back in the response")
    steering: list[SteeringParams] | None = Field(
        None, description="a list of steering objects, applied in order")

    @field_validator("steering", mode="before")
    @classmethod
    def _steering_list(cls, value):
        if value is not None and not isinstance(value, list):
            raise api_error("steering must be a list of steering objects here (or give the "
                            "object's fields on the variant itself)", "steering")
        return parse_steering(value)

    @model_validator(mode="after")
    def _list_or_fields(self):
        if self.steering is not None and self.model_fields_set - {"preset", "label", "steering"}:
            raise api_error("a variant with a steering list takes no other steering field",
                            "steering")
        return self

    def own_steering(self) -> SteeringValue | None:
        """The steering this variant sets (None: the preset's alone)."""
        if self.steering is not None:
            return self.steering
        fields = self.model_fields_set - {"preset", "label", "steering"}  # steering: null
        if fields:
            return SteeringParams(**{f: getattr(self, f) for f in fields})
        return None if self.preset is not None else SteeringParams()


def _variant(value: Any, where: str) -> str | CompareVariant:
    if isinstance(value, str | CompareVariant):
        return value
    if isinstance(value, list):  # a bare list of steering objects
        return CompareVariant(steering=parse_steering(value, where))
    try:
        return CompareVariant.model_validate(value)
    except ValidationError as exc:
        raise nested_error(exc, where) from None


class CompareRequest(_Sampling):
    model: str | None = Field(None, description="served model id (presets go in variants)")
    messages: list[ChatMessage] | None = None
    prompt: str | None = Field(None, description="shorthand for one user message")
    variants: list[str | CompareVariant] = Field(
        ..., description="preset names, steering objects, or lists of steering objects "
                         "(bare, or as {'steering': [...], 'label': ...}); all run with the "
                         "same seed")
    seed: int | None = Field(None, ge=0, le=INT64_MAX)
    stream: bool = Field(False, description="stream every variant over one server-sent-event "
                                            "stream, events tagged by variant index")

    @field_validator("variants", mode="before")
    @classmethod
    def _variant_shapes(cls, value):
        if not isinstance(value, list):
            return value
        return [_variant(v, f"variants[{i}]") for i, v in enumerate(value)]

    @field_validator("messages")
    @classmethod
    def _some_messages(cls, value):
        return _some_messages(value)

    @model_validator(mode="after")
    def _one_prompt_base_model_some_variants(self):
        if (self.messages is None) == (self.prompt is None):
            raise api_error("give either messages or prompt (not both)", "messages")
        if self.model and "+" in self.model:
            raise api_error("model must be the base model; name presets in the variants",
                            "model")
        if not self.variants:
            raise api_error("variants must hold at least one variant", "variants",
                            "empty_variants")
        return self

    def to_chat_request(self) -> ChatCompletionRequest:
        """The chat completion every variant runs (unsteered: the variants add their steering).
        Built from fields this model has validated already."""
        messages = self.messages if self.messages is not None else [
            ChatMessage(role="user", content=self.prompt)]
        return ChatCompletionRequest.model_construct(
            model=self.model, messages=messages, max_tokens=self.max_tokens,
            temperature=self.temperature, top_p=self.top_p, seed=self.seed, stop=self.stop,
            user=self.user, ignore_eos=self.ignore_eos)


# ---- responses ---------------------------------------------------------------------------------




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


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None
    steering: Applied


class _OmitUnset(BaseModel):
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


class DeltaMessage(_OmitUnset):
    OMIT_UNSET: ClassVar[tuple[str, ...]] = ("role", "content")

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_OmitUnset):
    OMIT_UNSET: ClassVar[tuple[str, ...]] = ("usage", "system_fingerprint", "steering")

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
    steering: Applied | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
    steering: Applied | None = None


class CompletionChunk(_OmitUnset, CompletionResponse):
    """A text completion's stream chunk: the response's shape, `usage`/`steering` when set."""

    OMIT_UNSET: ClassVar[tuple[str, ...]] = ("usage", "system_fingerprint", "steering")


class VariantResult(Lenient):
    index: int
    label: str | None = None
    model: str
    steering: Applied
    completion: str
    finish_reason: str | None
    is_refusal: bool
    refusal_score: float | None
    refusal_score_exact: bool
    completion_tokens: int
    time_s: float
    ttft_s: float | None = None


class CompareResponse(Lenient):
    id: str
    object: str = "steering.compare"
    created: int
    model: str
    seed: int
    prompt_tokens: int
    time_s: float
    variants: list[VariantResult]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "steering-server"
    root: str | None = None
    context_length: int | None = None
    steering: Applied | None = None
    description: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


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
