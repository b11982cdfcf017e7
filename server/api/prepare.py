"""Request preparation: a validated protocol request → a `Job` the engine can run.

A job holds the token ids per prompt, one `SamplingParams` per choice (choice c is prompt c // n),
the resolved steering, and what the response needs (ids, times, echo, logprobs). Here live the
checks that need the server's settings or the model: limits, the chat template, tokenization and
the token budget (prompt + max_tokens within the context). The checks that need neither are the
protocol models' own validators (`server.api.protocol`).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from fastapi import Request

from server.api.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest
from server.api.resolve import Checked, Resolved, check_steering
from server.engine import SamplingParams
from server.errors import bad_request
from server.security.hardening import check_prompt_tokens, check_request
from server.security.policy import Admission, enforce
from server.state import ServerState
from steering.models.chat import format_chat

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
ROLE_MAP = {"developer": "system"}


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


# ---- the pieces ----------------------------------------------------------------------------------


def check_limits(state: ServerState, req: ChatCompletionRequest | CompletionRequest) -> None:
    """The settings' limits on sizes and names, before any tokenization."""
    check_request(state, req)
    s = state.settings
    if req.n > s.max_n:
        raise bad_request(f"n must be at most {s.max_n}, got {req.n}", "n")
    stops = req.stop_list()
    if len(stops) > s.max_stop:
        raise bad_request(f"at most {s.max_stop} stop sequences are allowed, got {len(stops)}",
                          "stop")


def message_text(i: int, message: ChatMessage) -> str:
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise bad_request(f"only text content parts are supported (got type "
                              f"{part.type!r})", f"messages[{i}].content[{j}]",
                              "unsupported_content")
        texts.append(part.text)
    return "".join(texts)


def chat_turns(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    """The conversation as the chat template takes it (text content only)."""
    return [{"role": ROLE_MAP.get(m.role, m.role), "content": message_text(i, m)}
            for i, m in enumerate(messages)]


def render_chat(state: ServerState, turns: list[dict[str, str]]) -> tuple[str, list[int]]:
    """The conversation through the model's chat template: its text and token ids."""
    tokenizer = state.lm.tokenizer
    try:
        text = format_chat(tokenizer, turns)
    except Exception as exc:  # the model's own template refuses this conversation
        raise bad_request(f"the chat template cannot render these messages: {exc}",
                          "messages", "invalid_messages") from None
    return text, list(tokenizer(text, add_special_tokens=False)["input_ids"])


def check_max_tokens(state: ServerState, requested: int | None, param: str) -> None:
    limit = state.settings.max_tokens_limit
    if requested is not None and requested > limit:
        raise bad_request(f"{param} must be at most {limit}, got {requested}", param,
                          "max_tokens_too_large")


def token_budget(state: ServerState, requested: int | None, default: int, prompt_len: int,
                 prompt_param: str, param: str = "max_tokens") -> int:
    """max_tokens for a prompt of `prompt_len` tokens: the request's, or `default` cut to fit
    the context; 400 when the prompt or prompt + max_tokens does not fit."""
    ctx = state.lm.context_length
    check_prompt_tokens(state, prompt_len, prompt_param)
    if prompt_len >= ctx:
        raise bad_request(f"this model's maximum context length is {ctx} tokens, but the "
                          f"prompt has {prompt_len} tokens", prompt_param,
                          "context_length_exceeded")
    if requested is None:
        return max(1, min(default, ctx - prompt_len))
    check_max_tokens(state, requested, param)
    if prompt_len + requested > ctx:
        raise bad_request(f"this model's maximum context length is {ctx} tokens; the request "
                          f"asks for {prompt_len + requested} ({prompt_len} in the prompt, "
                          f"{requested} to generate)", param, "context_length_exceeded")
    return requested


CHARS_PER_TOKEN = 4  # admission's estimate of a text prompt's tokens (settled once tokenized)


def estimate_tokens(state: ServerState, prompts: Sequence[str | list[int]], choices: int,
                    requested: int | None, default: int) -> int:
    """What admission charges before tokenizing: each prompt's tokens (ids as given; text at
    `CHARS_PER_TOKEN` characters a token) and every choice's whole budget (the request's
    max_tokens, or the default cut to the context)."""
    prompt = sum(len(p) if isinstance(p, list) else -(-len(p) // CHARS_PER_TOKEN)
                 for p in prompts)
    budget = requested if requested is not None else min(default, state.lm.context_length - 1)
    return prompt + choices * budget


def new_job(state: ServerState, req: ChatCompletionRequest | CompletionRequest,
            kind: Literal["chat", "completion"], endpoint: str, request_id: str,
            resolved: Resolved, prompts: list[list[int]], prompt_texts: list[str],
            max_tokens: list[int], echo: bool = False) -> Job:
    top = req.top_logprobs_count()
    prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
    return Job(kind=kind, endpoint=endpoint, request_id=request_id,
               response_id=prefix + uuid.uuid4().hex, created=int(time.time()),
               arrival=time.perf_counter(), resolved=resolved, prompts=prompts,
               prompt_texts=prompt_texts, n=req.n,
               sampling=[req.to_sampling_params(max_tokens[c // req.n], c)
                         for c in range(len(prompts) * req.n)],
               stream=req.stream, include_usage=req.include_usage, logprobs=top is not None,
               top_logprobs=top or 0, echo=echo)


def _check_top_logprobs(state: ServerState, top: int | None, param: str) -> None:
    limit = state.settings.max_top_logprobs
    if top is not None and top > limit:
        raise bad_request(f"{param} must be at most {limit}, got {top}", param)


def _check_choices(state: ServerState, prompts: int, n: int) -> None:
    limit = state.settings.max_choices
    if prompts * n > limit:
        raise bad_request(f"a request may ask for at most {limit} choices (prompts × n), got "
                          f"{prompts * n}", "n")


async def off_loop(fn, *args):
    """`fn(*args)` in a worker thread: building steering tensors never blocks the event loop."""
    return await asyncio.to_thread(fn, *args)


def admit(state: ServerState, request: Request | None, checked: Sequence[Checked],
          prompt: Sequence[str], tokens: int, endpoint: str) -> Admission | None:
    """The caller's key against every checked steering, and its rate limits charged (403, 429),
    before any tensor is built or any prompt tokenized (None: no request, no policy)."""
    if request is None:
        return None
    return enforce(state, request, [c.applied for c in checked], prompt=prompt, tokens=tokens,
                   endpoint=endpoint)


# ---- chat and text completions --------------------------------------------------------------------


async def prepare_chat(state: ServerState, req: ChatCompletionRequest, request_id: str,
                       request: Request | None = None) -> Job:
    """A chat request's job; with `request`, the caller's key policy and rate limits too.

    Order: the limits and the steering are checked (no tensor built), the key is admitted
    (policy, rate limits charged), then the steering is built in a worker thread while the
    template and tokenization run in the tokenizer thread: nothing past the cheap checks runs on
    the event loop, and nothing costly runs for a request the key may not make."""
    check_limits(state, req)
    _check_top_logprobs(state, req.top_logprobs, "top_logprobs")
    _check_choices(state, 1, req.n)
    turns = chat_turns(req.messages)
    checked = check_steering(state, req.model, req.steering)
    requested, param = req.requested_max_tokens()
    check_max_tokens(state, requested, param)
    texts = [t["content"] for t in turns]
    admission = admit(state, request, [checked], texts,
                      estimate_tokens(state, ["".join(texts)], req.n, requested,
                                      state.settings.default_max_tokens), CHAT)
    resolved, (text, ids) = await asyncio.gather(
        off_loop(checked.build), state.in_tokenizer_thread(render_chat, state, turns))
    max_tokens = token_budget(state, requested, state.settings.default_max_tokens, len(ids),
                              "messages", param)
    job = new_job(state, req, "chat", CHAT, request_id, resolved, [ids], [text], [max_tokens])
    if admission is not None:
        admission.settle(job.tokens_charged)
    return job


def _tokenize_prompt(state: ServerState, prompt: str | list[int], param: str, echo: bool
                     ) -> tuple[list[int], str]:
    tok = state.lm.tokenizer
    if isinstance(prompt, str):
        ids, text = list(tok(prompt)["input_ids"]), prompt
    else:
        vocab = len(tok)
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise bad_request(f"token ids {bad[:5]} are outside the vocabulary "
                              f"(0–{vocab - 1})", param, "invalid_token")
        ids, text = list(prompt), tok.decode(prompt) if echo else ""
    if not ids:
        raise bad_request("prompt must not be empty", param, "empty_prompt")
    return ids, text


def _tokenize_prompts(state: ServerState, req: CompletionRequest, prompts: list
                      ) -> tuple[list[list[int]], list[str], list[int]]:
    """Token ids, texts and max_tokens per prompt (in the tokenizer thread)."""
    ids_list, texts, max_tokens = [], [], []
    for i, prompt in enumerate(prompts):
        param = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
        ids, text = _tokenize_prompt(state, prompt, param, req.echo)
        ids_list.append(ids)
        texts.append(text)
        max_tokens.append(token_budget(state, req.max_tokens,
                                       state.settings.default_completion_max_tokens, len(ids),
                                       param))
    return ids_list, texts, max_tokens


async def prepare_completion(state: ServerState, req: CompletionRequest, request_id: str,
                             request: Request | None = None) -> Job:
    """A text completion's job; with `request`, the caller's key policy and rate limits too.
    The same order as `prepare_chat`: checks, admission, then building and tokenization off
    the event loop."""
    check_limits(state, req)
    _check_top_logprobs(state, req.logprobs, "logprobs")
    prompts = req.prompts()
    if not prompts:
        raise bad_request("prompt must not be empty", "prompt", "empty_prompt")
    _check_choices(state, len(prompts), req.n)
    checked = check_steering(state, req.model, req.steering)
    check_max_tokens(state, req.max_tokens, "max_tokens")
    admission = admit(state, request, [checked],
                      [p if isinstance(p, str) else str(p) for p in prompts],
                      estimate_tokens(state, prompts, len(prompts) * req.n, req.max_tokens,
                                      state.settings.default_completion_max_tokens),
                      COMPLETIONS)
    resolved, (ids_list, texts, max_tokens) = await asyncio.gather(
        off_loop(checked.build), state.in_tokenizer_thread(_tokenize_prompts, state, req,
                                                           prompts))
    job = new_job(state, req, "completion", COMPLETIONS, request_id, resolved, ids_list, texts,
                  max_tokens, echo=req.echo)
    if admission is not None:
        admission.settle(job.tokens_charged)
    return job
