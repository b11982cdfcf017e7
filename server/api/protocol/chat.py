"""`POST /v1/chat/completions`: the request, the response and its stream chunk."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from server.api.protocol.base import (
    Applied,
    ChatMessage,
    ChoiceLogprobs,
    Monitored,
    OmitUnset,
    SamplingFields,
    Usage,
    some_messages,
)
from server.errors import ErrorCode, api_error, unsupported
from server.settings import CEILING_MAPPING, CEILING_MESSAGES
from steering.interventions.schema import at_most


class ChatCompletionRequest(SamplingFields):
    UNSUPPORTED: ClassVar[dict[str, str]] = {**SamplingFields.UNSUPPORTED, "tools": ""}

    messages: Annotated[list[ChatMessage], at_most(CEILING_MESSAGES, "messages")]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)
    tools: Annotated[list[Any] | None, at_most(CEILING_MAPPING, "tools")] = None
    tool_choice: Any | None = None
    response_format: dict[str, Any] | None = None

    @field_validator("messages")
    @classmethod
    def _some_messages(cls, value):
        return some_messages(value)

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


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(Monitored):
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


class DeltaMessage(OmitUnset):
    OMIT_UNSET: ClassVar[tuple[str, ...]] = ("role", "content")

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(Monitored):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(OmitUnset):
    OMIT_UNSET: ClassVar[tuple[str, ...]] = ("usage", "system_fingerprint", "steering")

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
    steering: Applied | None = None
