"""`POST /v1/completions`: the request, the response and its stream chunk."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, Field, model_validator

from server.api.protocol.base import Envelope, Monitored, OmitUnset, SamplingFields
from server.errors import unsupported
from server.settings import CEILING_PROMPT_IDS, CEILING_PROMPTS
from steering.interventions.schema import at_most


def _bounded_prompt(value: Any) -> Any:
    """A prompt list within its ceiling before its items are validated: token ids (a list of
    ints) up to `CEILING_PROMPT_IDS`, prompts up to `CEILING_PROMPTS`."""
    if isinstance(value, list) and value and isinstance(value[0], int):
        return at_most(CEILING_PROMPT_IDS, "token ids").func(value)
    return at_most(CEILING_PROMPTS, "prompts").func(value)


class CompletionRequest(SamplingFields):
    UNSUPPORTED: ClassVar[dict[str, str]] = {**SamplingFields.UNSUPPORTED, "suffix": ""}

    prompt: Annotated[str | list[str] | list[Annotated[list[int], at_most(CEILING_PROMPT_IDS,
                                                                          "token ids")]]
                      | list[int], BeforeValidator(_bounded_prompt)]
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


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(Monitored):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(Envelope):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class CompletionChunk(OmitUnset, CompletionResponse):
    """A text completion's stream chunk: the response's shape, `usage`/`steering` when set."""

    OMIT_UNSET: ClassVar[tuple[str, ...]] = ("usage", "system_fingerprint", "steering")
