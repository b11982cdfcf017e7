"""`POST /v1/chat/completions`: the request, the response and its stream chunk."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from server.api.protocol.base import (
    Applied,
    ChatMessage,
    ChoiceLogprobs,
    Envelope,
    Lenient,
    Monitored,
    OmitUnset,
    SamplingFields,
    Usage,
    some_messages,
)
from server.errors import ErrorCode, api_error
from server.settings import CEILING_MAPPING, CEILING_MESSAGES
from steering.interventions.schema import at_most

TOOL_NAME = r"^[A-Za-z0-9_-]{1,64}$"


class Strict(BaseModel):
    """Unknown fields are refused (a misspelt tool field must not pass silently)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class FunctionDefinition(Lenient):
    name: str = Field(..., pattern=TOOL_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolParam(Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class ResponseFormat(Strict):
    type: Literal["text", "json_object"] = Field(
        ..., description="json_object: constrained decoding to one JSON object (a 'json' word "
                         "in the messages is required, as OpenAI requires)")


class ChatCompletionRequest(SamplingFields):
    # Fields of OpenAI's chat API this server has nothing behind: refused when set.
    UNSUPPORTED: ClassVar[dict[str, str]] = {
        **SamplingFields.UNSUPPORTED, "audio": "", "prediction": "", "web_search_options": "",
        "functions": " (use tools)", "function_call": " (use tool_choice)"}

    messages: Annotated[list[ChatMessage], at_most(CEILING_MESSAGES, "messages")]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)
    tools: Annotated[list[ToolParam] | None, at_most(CEILING_MAPPING, "tools")] = Field(
        None, description="functions the model may call, given to the model's own chat "
                          "template (server/api/tools.py)")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    modalities: list[Literal["text"]] | None = None
    audio: Any | None = None
    prediction: Any | None = None
    web_search_options: Any | None = None
    functions: Any | None = None
    function_call: Any | None = None

    @field_validator("messages")
    @classmethod
    def _some_messages(cls, value):
        return some_messages(value)

    @model_validator(mode="after")
    def _tool_choice_needs_its_tool(self):
        choice = self.tool_choice
        if choice in (None, "none", "auto"):
            return self
        if not self.tools:
            raise api_error("tool_choice other than 'none' or 'auto' needs tools", "tool_choice",
                            ErrorCode.INVALID_COMBINATION)
        if isinstance(choice, NamedToolChoice) and choice.function.name not in {
                t.function.name for t in self.tools}:
            raise api_error(f"tool_choice names {choice.function.name!r}, which is not among "
                            "the tools", "tool_choice.function.name", ErrorCode.INVALID_VALUE)
        return self

    @model_validator(mode="after")
    def _json_mode_says_json(self):
        if self.response_format is None or self.response_format.type != "json_object":
            return self
        if self.tools and self.tool_choice != "none":
            raise api_error("response_format json_object cannot be combined with tools",
                            "response_format", ErrorCode.INVALID_COMBINATION)
        texts = [m.content if isinstance(m.content, str) else " ".join(
            p.text or "" for p in (m.content or [])) for m in self.messages]
        if not any("json" in t.lower() for t in texts):
            raise api_error("'messages' must contain the word 'json' in some form to use "
                            "response_format of type json_object", "response_format",
                            ErrorCode.INVALID_COMBINATION)
        return self

    def tool_choice_value(self) -> Any:
        """tool_choice as plain data (a name object as a dict)."""
        choice = self.tool_choice
        return choice.model_dump() if isinstance(choice, BaseModel) else choice

    @property
    def json_object(self) -> bool:
        return self.response_format is not None and self.response_format.type == "json_object"

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise api_error("top_logprobs needs logprobs set to true", "top_logprobs",
                            ErrorCode.INVALID_COMBINATION)
        return self

    def top_logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def requested_max_tokens(self) -> tuple[int | None, str]:
        """The completion budget asked for and the field that asked for it."""
        if self.max_completion_tokens:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"


class FunctionCall(BaseModel):
    name: str
    arguments: str  # a JSON string, as OpenAI sends it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ToolCallDelta(ToolCall):
    index: int


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


class _ChatChoiceBase(Monitored):
    index: int
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatChoice(_ChatChoiceBase):
    message: ResponseMessage


class ChatCompletionResponse(Envelope):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage
    steering: Applied


class DeltaMessage(OmitUnset):
    OMIT_UNSET: ClassVar[tuple[str, ...]] = ("role", "content", "tool_calls")

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(_ChatChoiceBase):
    delta: DeltaMessage


class ChatCompletionChunk(OmitUnset, Envelope):
    OMIT_UNSET: ClassVar[tuple[str, ...]] = ("usage", "system_fingerprint", "steering")

    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
