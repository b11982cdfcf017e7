"""Request preparation: a validated request (`server.api.validation`) → the `Job`s the engine runs.

`prepare(state, valid, request_id, request)` admits the caller (`server.security.policy.enforce`:
the key's policy on the checked steering, rate limits charged with the validation's estimate),
then builds the steering in a worker thread while the chat template and tokenization run in the
tokenizer thread — nothing costly runs on the event loop, and nothing costly runs for a request
the key may not make — and ends with the token budget (`validation.check_budget`) and the charge
settled to what the request costs.

A job holds the token ids per prompt, one `SamplingParams` per choice (choice c is prompt c // n),
the resolved steering, and what the response needs (ids, times, echo, logprobs). A compare makes
one job per variant over the same prompt.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, replace
from typing import Literal

from fastapi import Request

from server.api.resolve import Checked, Resolved
from server.api.structured import json_constraint
from server.api.tools import ToolPlan, plan, template_messages
from server.api.validation import (
    CHAT,
    COMPARE,
    COMPLETIONS,
    ValidRequest,
    check_budget,
    check_token_ids,
)
from server.context import request_context
from server.engine import SamplingParams
from server.errors import ErrorCode, bad_request
from server.security.policy import Admission, enforce
from server.state import ServerState
from steering.models.chat import format_chat

__all__ = ["CHAT", "COMPLETIONS", "Job", "prepare", "render_chat"]


@dataclass
class Job:
    kind: Literal["chat", "completion"]
    endpoint: str
    request_id: str
    response_id: str
    created: int
    arrival: float
    resolved: Resolved
    prompts: list[list[int]]
    prompt_texts: list[str]
    n: int
    sampling: list[SamplingParams]  # one per choice: choice c is prompt c // n
    stream: bool
    include_usage: bool
    logprobs: bool  # the response reports logprobs
    top_logprobs: int
    echo: bool = False
    monitors: tuple = ()  # steering.interventions.monitors.Monitor per axis (server.api.monitoring)
    tenant: str | None = None  # the caller's key id (the engine queues keys fairly)
    tools: ToolPlan | None = None  # chat with tools: the answer is parsed into tool calls
    json_object: bool = False  # response_format json_object: decoding is constrained

    @property
    def method(self) -> str:
        return self.resolved.method

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def tokens_charged(self) -> int:
        """What a rate limit charges: the prompts and every choice's whole budget."""
        return self.prompt_tokens + sum(sp.max_tokens for sp in self.sampling)


# ---- off the event loop ---------------------------------------------------------------------------


def render_chat(state: ServerState, turns: list[dict], tools: ToolPlan | None = None
                ) -> tuple[str, list[int]]:
    """The conversation through the model's chat template (with the tools, and the answer's
    forced start when `tool_choice` asks for a call): its text and token ids."""
    tokenizer = state.lm.tokenizer
    try:
        text = format_chat(tokenizer, template_messages(turns), tools.tools if tools else None)
    except Exception as exc:  # the model's own template refuses this conversation
        raise bad_request(f"the chat template cannot render these messages: {exc}",
                          "messages", ErrorCode.INVALID_MESSAGES) from None
    if tools is not None:
        text += tools.forced_prefix
    return text, list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tool_plan(valid: ValidRequest) -> ToolPlan | None:
    """A chat request's tools and tool_choice (None: none in play)."""
    body = valid.body
    if valid.kind != "chat" or not getattr(body, "tools", None):
        return None
    return plan([t.model_dump(exclude_none=True) for t in body.tools],
                body.tool_choice_value(), body.parallel_tool_calls)


def _tokenize(state: ServerState, valid: ValidRequest
              ) -> tuple[list[list[int]], list[str], list[int]]:
    """Token ids, texts and max_tokens per prompt (in the tokenizer thread)."""
    ids_list, texts, max_tokens = [], [], []
    echo = getattr(valid.body, "echo", False)
    tok = state.lm.tokenizer
    for prompt in valid.prompts:
        if prompt.turns is not None:
            text, ids = render_chat(state, prompt.turns, tool_plan(valid))
        elif prompt.text is not None:
            text, ids = prompt.text, list(tok(prompt.text)["input_ids"])
        else:
            check_token_ids(state, prompt.ids, prompt.param)
            text, ids = (tok.decode(prompt.ids) if echo else ""), prompt.ids
        ids_list.append(ids)
        texts.append(text)
        max_tokens.append(check_budget(state, valid, len(ids), prompt.param))
    return ids_list, texts, max_tokens


def _build(checked: list[Checked]) -> list[Resolved]:
    """Every run's steering tensors (in a worker thread)."""
    return [c.build() for c in checked]


async def _tools_and_json(state: ServerState, valid: ValidRequest, job: Job) -> None:
    """A chat job's tool plan (a named call stops after its block) and, in JSON mode, one
    grammar matcher per choice (server/api/structured.py)."""
    job.tools = tool_plan(valid)
    if job.tools is not None and job.tools.stop:
        for sp in job.sampling:
            sp.stop = [*sp.stop, *job.tools.stop]
    job.json_object = bool(getattr(valid.body, "json_object", False))
    if job.json_object:
        for sp in job.sampling:
            sp.constraint = await state.in_tokenizer_thread(json_constraint, state)


# ---- the step -------------------------------------------------------------------------------------


def admit(state: ServerState, request: Request | None, valid: ValidRequest) -> Admission | None:
    """The caller's key against every checked steering, and its rate limits charged (403, 429),
    before any tensor is built or any prompt tokenized (None: no request, no policy)."""
    if request is None:
        return None
    return enforce(state, request, [c.applied for c in valid.steering],
                   prompt=valid.prompt_texts, tokens=valid.estimate, endpoint=valid.endpoint,
                   monitors=valid.monitor_packs)


async def prepare(state: ServerState, valid: ValidRequest, request_id: str,
                  request: Request | None = None) -> list[Job]:
    """One job per run of `valid` (a request: one; a compare: one per variant, request ids
    suffixed `-v<i>`); with `request`, the caller is admitted first."""
    admission = admit(state, request, valid)
    resolved, (ids_list, texts, max_tokens) = await asyncio.gather(
        asyncio.to_thread(_build, valid.steering),
        state.in_tokenizer_thread(_tokenize, state, valid))
    body = valid.body
    top = body.top_logprobs_count()
    sampling = [body.to_sampling_params(max_tokens[c // body.n], c)
                for c in range(valid.choices)]
    prefix = "chatcmpl-" if valid.kind == "chat" else "cmpl-"
    base = Job(kind=valid.kind, endpoint=valid.endpoint, request_id=request_id,
               response_id=prefix + uuid.uuid4().hex, created=int(time.time()),
               arrival=time.perf_counter(), resolved=resolved[0], prompts=ids_list,
               prompt_texts=texts, n=body.n, sampling=sampling, stream=body.stream,
               include_usage=body.include_usage, logprobs=top is not None,
               top_logprobs=top or 0, echo=getattr(body, "echo", False),
               monitors=valid.monitors,
               tenant=request_context(request).key_id if request is not None else None)
    if valid.kind == "chat":
        await _tools_and_json(state, valid, base)
    jobs = [base] if valid.endpoint != COMPARE else [
        replace(base, request_id=f"{request_id}-v{i}", resolved=r)
        for i, r in enumerate(resolved)]
    if admission is not None:
        admission.settle(sum(j.tokens_charged for j in jobs))
    return jobs
