"""`POST /v1/steering/compare`: one prompt under several steering variants (the request, each
variant, the response)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, ValidationError, field_validator, model_validator

from server.api.protocol.base import (
    INT64_MAX,
    Applied,
    ChatMessage,
    Lenient,
    Sampling,
    SteeringParams,
    SteeringValue,
    nested_error,
    parse_steering,
    some_messages,
)
from server.api.protocol.chat import ChatCompletionRequest
from server.errors import ErrorCode, api_error
from server.settings import CEILING_MESSAGES, CEILING_VARIANTS
from steering.interventions.schema import at_most


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
                            "object's fields on the variant itself)", "steering",
                            ErrorCode.INVALID_VALUE)
        return parse_steering(value)

    @model_validator(mode="after")
    def _list_or_fields(self):
        if self.steering is not None and self.model_fields_set - {"preset", "label", "steering"}:
            raise api_error("a variant with a steering list takes no other steering field",
                            "steering", ErrorCode.INVALID_COMBINATION)
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


class CompareRequest(Sampling):
    model: str | None = Field(None, description="served model id (presets go in variants)")
    messages: Annotated[list[ChatMessage] | None, at_most(CEILING_MESSAGES, "messages")] = None
    prompt: str | None = Field(None, description="shorthand for one user message")
    variants: Annotated[list[str | CompareVariant],
                        at_most(CEILING_VARIANTS, "variants")] = Field(
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
        at_most(CEILING_VARIANTS, "variants").func(value)  # runs before the annotation's check
        return [_variant(v, f"variants[{i}]") for i, v in enumerate(value)]

    @field_validator("messages")
    @classmethod
    def _some_messages(cls, value):
        return some_messages(value)

    @model_validator(mode="after")
    def _one_prompt_base_model_some_variants(self):
        if (self.messages is None) == (self.prompt is None):
            raise api_error("give either messages or prompt (not both)", "messages",
                            ErrorCode.INVALID_COMBINATION)
        if self.model and "+" in self.model:
            raise api_error("model must be the base model; name presets in the variants",
                            "model", ErrorCode.INVALID_VALUE)
        if not self.variants:
            raise api_error("variants must hold at least one variant", "variants",
                            ErrorCode.EMPTY_VARIANTS)
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
