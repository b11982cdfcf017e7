"""The per-choice tracker: every choice's text, token count, logprobs, timing and metrics.

`Tracker(state, job).add(choice, event)` takes the engine's token events as they come (in any
order across choices); the response builders read `choices` and `usage()`, and `finish(status)`
records the request's metrics once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from server.api.prepare import Job
from server.api.protocol import CompletionLogprobs, TokenLogprob, TopLogprob, Usage
from server.api.resolve import dump
from server.context import RequestContext
from server.engine import TokenEvent
from server.observability.metrics import status_label, steering_label
from server.security.audit import decide_notes
from server.state import ServerState
from steering.interventions.methods import Steering


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


def token_text(state: ServerState) -> TokenText:
    """The server's token-string cache for its tokenizer."""
    cache = state.token_text
    if cache is None or cache.tokenizer is not state.lm.tokenizer:
        cache = state.token_text = TokenText(state.lm.tokenizer)
    return cache


@dataclass
class Choice:
    index: int
    parts: list[str] = field(default_factory=list)
    tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None
    first_at: float | None = None
    last_at: float | None = None
    finished_at: float | None = None
    first_top: list[tuple[int, float]] | None = None  # the first token's top logprobs
    steering: Steering | None = None  # as the engine applied it (conditions decided)
    chat_logprobs: list[TokenLogprob] = field(default_factory=list)
    text_logprobs: CompletionLogprobs | None = None
    text_len: int = 0
    monitor: list[list[float]] = field(default_factory=list)  # per token: each monitor's score

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def logprob_count(self) -> int:
        """How many tokens have logprobs so far (chat or text)."""
        if self.text_logprobs is not None:
            return len(self.text_logprobs.tokens)
        return len(self.chat_logprobs)


class Tracker:
    """Follows every choice's events: text, token counts, logprobs, latency metrics."""

    def __init__(self, state: ServerState, job: Job):
        self.job = job
        self.metrics = state.metrics
        self.method = steering_label(job.method)  # a fixed label set (metrics.py)
        self.token_text = token_text(state)
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
        if ev.steering is not None:
            ch.steering = ev.steering
        if ev.token_id is not None:
            ch.tokens += 1
            if ch.first_at is None:
                ch.first_at = now
                ch.first_top = ev.top_logprobs or []
                self.metrics.ttft.labels(m).observe(now - self.job.arrival)
            else:
                self.metrics.itl.labels(m).observe(now - ch.last_at)
            ch.last_at = now
            if ev.monitor is not None:
                ch.monitor.append(ev.monitor)
            if self.job.logprobs and ev.logprob is not None:
                self._logprob(ch, ev)
        if ev.text:
            ch.parts.append(ev.text)
            ch.text_len += len(ev.text)
        if ev.finish_reason is not None:
            ch.finish_reason = ev.finish_reason
            ch.error = ev.error
            ch.finished_at = now

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
        self.metrics.requests.labels(job.endpoint, m, status_label(status)).inc()
        self.metrics.e2e.labels(job.endpoint, m).observe(time.perf_counter() - job.arrival)
        self.metrics.prompt_tokens.labels(m).inc(job.prompt_tokens)
        self.metrics.generation_tokens.labels(m).inc(sum(ch.tokens for ch in self.choices))

    def log_to(self, ctx: RequestContext, outcome: str | None) -> None:
        """Token counts, finish reasons and the outcome into the access and audit lines."""
        usage = self.usage()
        decided = self.job.resolved.echo(self.choices[0].steering if self.choices else None)
        if decided is not self.job.resolved.applied:  # conditions decided: log their scores
            decide_notes(ctx, [decided])
            ctx.log_extra["steering"] = dump(decided)
        ctx.log_extra.update({
            "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "finish_reasons": [ch.finish_reason for ch in self.choices],
            **({"outcome": outcome} if outcome else {})})
