"""Serving chat and text completions: protocol request → engine requests → protocol response.

`prepare_chat` / `prepare_completion` validate a request and turn it into a `Job` (token ids per
prompt, sampling per choice, the resolved steering). `run_job` submits one engine request per
choice (n per prompt), then either collects them into one response or streams server-sent events
ending in `data: [DONE]`. A client that goes away cancels its engine requests.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from server.api.errors import APIError, bad_request
from server.api.protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChoiceLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ResponseMessage,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from server.api.resolve import Resolved, resolve_steering
from server.engine import EngineStopped, GenerationRequest, QueueFull, SamplingParams, TokenEvent
from server.security.hardening import check_prompt_tokens, check_request
from server.security.policy import enforce_job
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
    logprobs: bool
    top_logprobs: int
    echo: bool = False

    @property
    def method(self) -> str:
        return self.resolved.applied.method

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


# ---- validation shared by both endpoints --------------------------------------------------------


def _check_common(state: ServerState, req: ChatCompletionRequest | CompletionRequest) -> None:
    s = state.settings
    check_request(state, req)
    if req.logit_bias:
        raise bad_request("logit_bias is not supported by this server", "logit_bias",
                          "unsupported_parameter")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise bad_request(f"{name} is not supported by this server (only 0)", name,
                              "unsupported_parameter")
    if req.n > s.max_n:
        raise bad_request(f"n must be at most {s.max_n}, got {req.n}", "n")
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed when stream is true",
                          "stream_options")


def _stops(state: ServerState, stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    stops = [x for x in stops if x]
    if len(stops) > state.settings.max_stop:
        raise bad_request(f"at most {state.settings.max_stop} stop sequences are allowed, "
                          f"got {len(stops)}", "stop")
    return stops


def _max_tokens(state: ServerState, requested: int | None, default: int, prompt_len: int,
                prompt_param: str, param: str = "max_tokens") -> int:
    ctx = state.lm.context_length
    check_prompt_tokens(state, prompt_len, prompt_param)
    if prompt_len >= ctx:
        raise bad_request(f"this model's maximum context length is {ctx} tokens, but the "
                          f"prompt has {prompt_len} tokens", prompt_param,
                          "context_length_exceeded")
    if requested is None:
        return max(1, min(default, ctx - prompt_len))
    limit = state.settings.max_tokens_limit
    if requested > limit:
        raise bad_request(f"{param} must be at most {limit}, got {requested}", param,
                          "max_tokens_too_large")
    if prompt_len + requested > ctx:
        raise bad_request(f"this model's maximum context length is {ctx} tokens; the request "
                          f"asks for {prompt_len + requested} ({prompt_len} in the prompt, "
                          f"{requested} to generate)", param, "context_length_exceeded")
    return requested


def _sampling(req, max_tokens: int, stops: list[str], choice: int, logprobs: bool,
              top_logprobs: int) -> SamplingParams:
    seed = None if req.seed is None else (req.seed + choice) % (2**63)
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else float(req.temperature),
        top_p=1.0 if req.top_p is None else float(req.top_p),
        seed=seed, stop=list(stops), logprobs=logprobs, top_logprobs=top_logprobs,
        ignore_eos=req.ignore_eos)


def _new_job(state: ServerState, req, kind, endpoint: str, request_id: str, resolved: Resolved,
             prompts: list[list[int]], prompt_texts: list[str], max_tokens: list[int],
             logprobs: bool, top_logprobs: int, echo: bool = False) -> Job:
    stops = _stops(state, req.stop)
    if len(prompts) * req.n > state.settings.max_choices:
        raise bad_request(f"a request may ask for at most {state.settings.max_choices} choices "
                          f"(prompts × n), got {len(prompts) * req.n}", "n")
    sampling = [_sampling(req, max_tokens[c // req.n], stops, c, logprobs, top_logprobs)
                for c in range(len(prompts) * req.n)]
    prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
    return Job(kind=kind, endpoint=endpoint, request_id=request_id,
               response_id=prefix + uuid.uuid4().hex, created=int(time.time()),
               arrival=time.perf_counter(), resolved=resolved, prompts=prompts,
               prompt_texts=prompt_texts, n=req.n, sampling=sampling, stream=req.stream,
               include_usage=bool(req.stream and req.stream_options
                                  and req.stream_options.include_usage),
               logprobs=logprobs, top_logprobs=top_logprobs, echo=echo)


# ---- chat ---------------------------------------------------------------------------------------


def _message_text(i: int, content) -> str:
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


def prepare_chat(state: ServerState, req: ChatCompletionRequest, request_id: str,
                 request: Request | None = None) -> Job:
    _check_common(state, req)
    s = state.settings
    if req.tools:
        raise bad_request("tools are not supported by this server", "tools",
                          "unsupported_parameter")
    if req.tool_choice not in (None, "none"):
        raise bad_request("tool_choice is not supported by this server", "tool_choice",
                          "unsupported_parameter")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise bad_request("only response_format {'type': 'text'} is supported",
                          "response_format", "unsupported_parameter")
    if not req.messages:
        raise bad_request("messages must hold at least one message", "messages",
                          "empty_messages")
    top = req.top_logprobs or 0
    if top and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs set to true", "top_logprobs")
    if top > s.max_top_logprobs:
        raise bad_request(f"top_logprobs must be at most {s.max_top_logprobs}, got {top}",
                          "top_logprobs")
    resolved = resolve_steering(state, req.model, req.steering)
    messages = [{"role": ROLE_MAP.get(m.role, m.role), "content": _message_text(i, m.content)}
                for i, m in enumerate(req.messages)]
    try:
        text = format_chat(state.lm.tokenizer, messages)
    except Exception as exc:  # the model's own template refuses this conversation
        raise bad_request(f"the chat template cannot render these messages: {exc}",
                          "messages", "invalid_messages") from None
    ids = list(state.lm.tokenizer(text, add_special_tokens=False)["input_ids"])
    requested = req.max_completion_tokens or req.max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
    max_tokens = _max_tokens(state, requested, s.default_max_tokens, len(ids), "messages", param)
    job = _new_job(state, req, "chat", CHAT, request_id, resolved, [ids], [text], [max_tokens],
                   req.logprobs, top)
    enforce_job(state, request, job)  # the key's policy on the resolved steering; rate limits
    return job


# ---- text completions ----------------------------------------------------------------------------


def _prompt_list(prompt) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        return []
    if isinstance(prompt[0], int):
        return [list(prompt)]
    return list(prompt)


def prepare_completion(state: ServerState, req: CompletionRequest, request_id: str,
                       request: Request | None = None) -> Job:
    _check_common(state, req)
    s = state.settings
    if req.suffix:
        raise bad_request("suffix is not supported by this server", "suffix",
                          "unsupported_parameter")
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request("best_of other than n is not supported", "best_of",
                          "unsupported_parameter")
    top = req.logprobs
    if top is not None and top > s.max_top_logprobs:
        raise bad_request(f"logprobs must be at most {s.max_top_logprobs}, got {top}",
                          "logprobs")
    if req.echo and top is not None:
        raise bad_request("echo together with logprobs is not supported (no prompt logprobs)",
                          "echo", "unsupported_parameter")
    prompts = _prompt_list(req.prompt)
    if not prompts:
        raise bad_request("prompt must not be empty", "prompt", "empty_prompt")
    resolved = resolve_steering(state, req.model, req.steering)
    tok = state.lm.tokenizer
    vocab = len(tok)
    ids_list: list[list[int]] = []
    texts: list[str] = []
    max_tokens: list[int] = []
    for i, p in enumerate(prompts):
        param = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
        if isinstance(p, str):
            ids = list(tok(p)["input_ids"])
            text = p
        else:
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise bad_request(f"token ids {bad[:5]} are outside the vocabulary "
                                  f"(0–{vocab - 1})", param, "invalid_token")
            ids = list(p)
            text = tok.decode(ids) if req.echo else ""
        if not ids:
            raise bad_request("prompt must not be empty", param, "empty_prompt")
        ids_list.append(ids)
        texts.append(text)
        max_tokens.append(_max_tokens(state, req.max_tokens, s.default_completion_max_tokens,
                                      len(ids), param))
    job = _new_job(state, req, "completion", COMPLETIONS, request_id, resolved, ids_list,
                   texts, max_tokens, top is not None, top or 0, echo=req.echo)
    enforce_job(state, request, job)  # the key's policy on the resolved steering; rate limits
    return job


# ---- running a job --------------------------------------------------------------------------------


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte ↔ printable-character table, inverted (byte-level BPE vocabularies)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
          *range(ord("®"), ord("ÿ") + 1)]
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class TokenText:
    """Token strings and bytes for logprobs (cached per id). A token holding part of a UTF-8
    character decodes to "\ufffd"; its `bytes` are still exact for byte-level vocabularies."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[int, tuple[str, list[int]]] = {}
        backend = getattr(tokenizer, "backend_tokenizer", None)
        decoder = getattr(backend, "decoder", None)
        self.byte_level = type(decoder).__name__ == "ByteLevel"
        self.special = set(getattr(tokenizer, "all_special_ids", []) or [])
        self.bytes_of = _byte_decoder() if self.byte_level else {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self.cache.get(token_id)
        if hit is None:
            text = self.tokenizer.decode([token_id])
            raw = list(text.encode())
            if self.byte_level and token_id not in self.special:
                piece = self.tokenizer.convert_ids_to_tokens(token_id)
                if isinstance(piece, str) and piece and all(ch in self.bytes_of for ch in piece):
                    raw = [self.bytes_of[ch] for ch in piece]
            hit = self.cache[token_id] = (text, raw)
        return hit


@dataclass
class Choice:
    index: int
    parts: list[str] = field(default_factory=list)
    tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None
    first_at: float | None = None
    last_at: float | None = None
    chat_logprobs: list[TokenLogprob] = field(default_factory=list)
    text_logprobs: CompletionLogprobs | None = None
    text_len: int = 0

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class Tracker:
    """Follows every choice's events: text, token counts, logprobs, latency metrics."""

    def __init__(self, state: ServerState, job: Job):
        self.job = job
        self.metrics = state.metrics
        self.method = job.method
        self.token_text = _token_text(state)
        self.choices = [Choice(c) for c in range(len(job.sampling))]
        if job.kind == "completion" and job.logprobs:
            for ch in self.choices:
                ch.text_logprobs = CompletionLogprobs()
        if job.echo:
            for ch in self.choices:
                ch.text_len = len(job.prompt_texts[ch.index // job.n])

    def add(self, c: int, ev: TokenEvent) -> None:
        ch = self.choices[c]
        now = time.perf_counter()
        m = self.method
        if ev.queue_wait_s is not None:
            self.metrics.queue_wait.labels(m).observe(ev.queue_wait_s)
        if ev.token_id is not None:
            ch.tokens += 1
            if ch.first_at is None:
                ch.first_at = now
                self.metrics.ttft.labels(m).observe(now - self.job.arrival)
            else:
                self.metrics.itl.labels(m).observe(now - ch.last_at)
            ch.last_at = now
            if self.job.logprobs and ev.logprob is not None:
                self._logprob(ch, ev)
        if ev.text:
            ch.parts.append(ev.text)
            ch.text_len += len(ev.text)
        if ev.finish_reason is not None:
            ch.finish_reason = ev.finish_reason
            ch.error = ev.error

    def _logprob(self, ch: Choice, ev: TokenEvent) -> None:
        tt = self.token_text
        token, raw = tt(ev.token_id)
        tops = (ev.top_logprobs or [])[:self.job.top_logprobs]
        if self.job.kind == "chat":
            top_entries = []
            for i, lp in tops:
                text, b = tt(i)
                top_entries.append(TopLogprob(token=text, logprob=lp, bytes=b))
            ch.chat_logprobs.append(TokenLogprob(token=token, logprob=ev.logprob, bytes=raw,
                                                 top_logprobs=top_entries))
        else:
            lp = ch.text_logprobs
            lp.tokens.append(token)
            lp.token_logprobs.append(ev.logprob)
            lp.top_logprobs.append({tt(i)[0]: lp_ for i, lp_ in tops})
            lp.text_offset.append(ch.text_len)

    def usage(self) -> Usage:
        out = sum(ch.tokens for ch in self.choices)
        return Usage(prompt_tokens=self.job.prompt_tokens, completion_tokens=out,
                     total_tokens=self.job.prompt_tokens + out)

    def finish(self, status: str) -> None:
        m, job = self.method, self.job
        self.metrics.requests.labels(job.endpoint, m, status).inc()
        self.metrics.e2e.labels(job.endpoint, m).observe(time.perf_counter() - job.arrival)
        self.metrics.prompt_tokens.labels(m).inc(job.prompt_tokens)
        self.metrics.generation_tokens.labels(m).inc(sum(ch.tokens for ch in self.choices))


def _token_text(state: ServerState) -> TokenText:
    cache = state.token_text
    if cache is None or cache.tokenizer is not state.lm.tokenizer:
        cache = state.token_text = TokenText(state.lm.tokenizer)
    return cache


def choice_error(job: Job, ch: Choice, timeout_s: float) -> APIError | None:
    reason = ch.finish_reason
    if reason in ("stop", "length"):
        return None
    if reason == "timeout":
        return APIError(504, f"the request timed out after {timeout_s:g} s "
                             f"(request id {job.request_id})", type="timeout_error",
                        code="timeout")
    if reason == "cancelled":
        return APIError(503, "the request was cancelled by the server (shutting down?)",
                        type="service_unavailable", code="cancelled")
    detail = f": {ch.error}" if ch.error else ""
    return APIError(500, f"generation failed (request id {job.request_id}){detail}",
                    type="server_error", code="engine_error")


def submit(state: ServerState, job: Job) -> list:
    engine = state.require_ready()
    handles: list = []
    try:
        for c, sp in enumerate(job.sampling):
            handles.append(engine.submit(GenerationRequest(
                prompt_ids=job.prompts[c // job.n], sampling=sp, steering=job.resolved.row,
                request_id=f"{job.request_id}-{c}")))
    except QueueFull:
        _cancel(handles)
        raise APIError(429, "the server is busy (request queue full); retry shortly",
                       type="rate_limit_error", code="queue_full",
                       headers={"Retry-After": str(state.settings.retry_after_s)}) from None
    except EngineStopped:
        _cancel(handles)
        raise APIError(503, "the server is shutting down and admits no new requests",
                       type="service_unavailable", code="shutting_down",
                       headers={"Retry-After": str(state.settings.retry_after_s)}) from None
    except ValueError as exc:
        _cancel(handles)
        raise bad_request(str(exc)) from None
    return handles


def _cancel(handles: Sequence) -> None:
    for h in handles:
        try:
            h.cancel()
        except Exception:  # already finished: nothing to free
            pass


async def events(handles: Sequence) -> AsyncIterator[tuple[int, TokenEvent]]:
    """(choice, event) from every handle as they come; unfinished handles are cancelled when
    the consumer stops early (client gone, error)."""
    finished: set[int] = set()
    if len(handles) == 1:  # no fan-in needed
        try:
            try:
                async for ev in handles[0]:
                    if ev.finish_reason is not None:
                        finished.add(0)
                    yield 0, ev
            except Exception as exc:  # surfaces as this choice's error
                finished.add(0)
                yield 0, TokenEvent(None, "", finish_reason="error", error=str(exc))
        finally:
            if not finished:
                _cancel(handles)
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(c: int, h) -> None:
        try:
            async for ev in h:
                await queue.put((c, ev))
        except Exception as exc:  # surfaces as this choice's error
            await queue.put((c, TokenEvent(None, "", finish_reason="error", error=str(exc))))
        finally:
            await queue.put((c, None))

    tasks = [asyncio.create_task(pump(c, h)) for c, h in enumerate(handles)]
    try:
        open_ = len(handles)
        while open_:
            c, ev = await queue.get()
            if ev is None:
                open_ -= 1
                continue
            if ev.finish_reason is not None:
                finished.add(c)
            yield c, ev
    finally:
        _cancel([h for c, h in enumerate(handles) if c not in finished])
        for t in tasks:
            t.cancel()


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def run_job(state: ServerState, job: Job, request: Request) -> Response:
    handles = submit(state, job)
    tracker = Tracker(state, job)
    request.state.log_extra.update({"model": job.resolved.model, "n": job.n,
                                    "stream": job.stream,
                                    "steering": job.resolved.applied.model_dump()})
    if job.stream:
        return StreamingResponse(_stream(state, job, tracker, handles, request),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})

    async def collect() -> None:
        async for c, ev in events(handles):
            tracker.add(c, ev)

    work = asyncio.create_task(collect())
    watch = asyncio.create_task(_wait_disconnect(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():  # client gone (or we are being cancelled)
            work.cancel()
            _cancel(handles)
    if not work.done() or work.cancelled():
        tracker.finish("499")
        _log_result(request, tracker, "client_closed")
        return Response(status_code=499)
    work.result()
    for ch in tracker.choices:
        err = choice_error(job, ch, state.settings.request_timeout_s)
        if err is not None:
            tracker.finish(str(err.status))
            _log_result(request, tracker, ch.finish_reason)
            raise err
    tracker.finish("200")
    _log_result(request, tracker, None)
    return JSONResponse(_response(job, tracker).model_dump(mode="json"))


def _log_result(request: Request, tracker: Tracker, outcome: str | None) -> None:
    usage = tracker.usage()
    request.state.log_extra.update({
        "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
        "finish_reasons": [ch.finish_reason for ch in tracker.choices],
        **({"outcome": outcome} if outcome else {})})


def _response(job: Job, tracker: Tracker) -> ChatCompletionResponse | CompletionResponse:
    applied = job.resolved.applied
    if job.kind == "chat":
        choices = [ChatChoice(
            index=ch.index, message=ResponseMessage(content="".join(ch.parts)),
            logprobs=ChoiceLogprobs(content=ch.chat_logprobs) if job.logprobs else None,
            finish_reason=ch.finish_reason) for ch in tracker.choices]
        return ChatCompletionResponse(id=job.response_id, created=job.created,
                                      model=job.resolved.model, choices=choices,
                                      usage=tracker.usage(), steering=applied)
    choices = []
    for ch in tracker.choices:
        prefix = job.prompt_texts[ch.index // job.n] if job.echo else ""
        choices.append(CompletionChoice(index=ch.index, text=prefix + "".join(ch.parts),
                                        logprobs=ch.text_logprobs,
                                        finish_reason=ch.finish_reason))
    return CompletionResponse(id=job.response_id, created=job.created, model=job.resolved.model,
                              choices=choices, usage=tracker.usage(), steering=applied)


# ---- streaming ------------------------------------------------------------------------------------


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _stream(state: ServerState, job: Job, tracker: Tracker, handles: list,
                  request: Request) -> AsyncIterator[str]:
    chat = job.kind == "chat"
    base = {"id": job.response_id, "object": "chat.completion.chunk" if chat else
            "text_completion", "created": job.created, "model": job.resolved.model}
    applied = job.resolved.applied.model_dump()
    usage_field = {"usage": None} if job.include_usage else {}
    status = "200"
    outcome = None

    def chunk(c: int, *, delta: dict | None = None, text: str | None = None,
              logprobs=None, finish: str | None = None, steering: bool = False) -> str:
        if chat:
            choice = {"index": c, "delta": delta or {}, "logprobs": logprobs,
                      "finish_reason": finish}
        else:
            choice = {"index": c, "text": text or "", "logprobs": logprobs,
                      "finish_reason": finish}
        data = {**base, "choices": [choice], **usage_field}
        if steering:
            data["steering"] = applied
        return _sse(data)

    try:
        for c in range(len(job.sampling)):  # an opening chunk per choice carries the steering
            if chat:
                yield chunk(c, delta={"role": "assistant", "content": ""}, steering=True)
            else:
                yield chunk(c, text=job.prompt_texts[c // job.n] if job.echo else "",
                            steering=True)
        async for c, ev in events(handles):
            ch = tracker.choices[c]
            n_lp = len(ch.chat_logprobs) if chat else (
                len(ch.text_logprobs.tokens) if ch.text_logprobs else 0)
            tracker.add(c, ev)
            lp = None
            if job.logprobs and ev.token_id is not None and ev.logprob is not None:
                if chat:
                    lp = {"content": [e.model_dump(mode="json")
                                      for e in ch.chat_logprobs[n_lp:]]}
                else:
                    t = ch.text_logprobs
                    lp = {"tokens": t.tokens[n_lp:], "token_logprobs": t.token_logprobs[n_lp:],
                          "top_logprobs": t.top_logprobs[n_lp:],
                          "text_offset": t.text_offset[n_lp:]}
            if ev.text or lp is not None:
                yield (chunk(c, delta={"content": ev.text}, logprobs=lp) if chat else
                       chunk(c, text=ev.text, logprobs=lp))
            if ev.finish_reason is not None:
                err = choice_error(job, ch, state.settings.request_timeout_s)
                if err is not None:
                    status, outcome = str(err.status), ev.finish_reason
                    yield _sse(err.body())
                    break
                yield chunk(c, finish=ch.finish_reason)
        else:
            if job.include_usage:
                yield _sse({**base, "choices": [], "usage": tracker.usage().model_dump(),
                            "steering": applied})
        yield "data: [DONE]\n\n"
    except (asyncio.CancelledError, GeneratorExit):
        status, outcome = "499", "client_closed"
        raise
    except Exception as exc:  # headers are sent: report in-band
        status, outcome = "500", "error"
        message = f"stream failed (request id {job.request_id}): {exc}"
        yield _sse(APIError(500, message, type="server_error", code="internal_error").body())
        yield "data: [DONE]\n\n"
    finally:
        _cancel_unfinished(handles, tracker)
        tracker.finish(status)
        _log_result(request, tracker, outcome)


def _cancel_unfinished(handles: Sequence, tracker: Tracker) -> None:
    _cancel([h for h, ch in zip(handles, tracker.choices) if not ch.done])
