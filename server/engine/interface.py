"""What the serving layer and an engine exchange: a request, its sampling, the events it yields,
the handle `submit` returns, and the two refusals (queue full, stopping).

Any engine the server runs (the native batcher in `core`, or another behind the same calls) takes
`GenerationRequest`s and streams `TokenEvent`s through a `_Handle`; the handle's `cancel()` asks
the engine (anything with a thread-safe `_wake()`) to free the request's slot at its next step.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from steering.interventions.methods import Steering
from steering.interventions.monitors import MonitorSet


class QueueFull(Exception):
    """The waiting queue is full; answer 429 with Retry-After."""


class EngineStopped(Exception):
    """The engine is shutting down and admits nothing new; answer 503."""


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 → greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings (not included in the text)
    stop_token_ids: list[int] = field(default_factory=list)  # besides the tokenizer's EOS
    ignore_eos: bool = False  # keep going past EOS (benchmarks; vLLM's extension)
    logprobs: bool = False
    top_logprobs: int = 0
    logprobs_tokens: int | None = None  # logprobs for the first N generated tokens only (None: all)
    # Constrained decoding (e.g. JSON mode): an object with `allowed(vocab) -> bool tensor
    # [vocab] | None` (the tokens this step may take) and `advance(token)` (the one it took).
    constraint: Any = None


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    sampling: SamplingParams
    steering: Steering  # conditions are decided at prefill (then this is the decided steering)
    request_id: str = ""
    monitors: MonitorSet = ()  # axes scored at every generated token (TokenEvent.monitor)
    tenant: str | None = None  # who asked (an API key id): fair queueing between tenants


@dataclass
class TokenEvent:
    """One step of one request. `text` is the new text this token adds (may be "" while a
    multi-byte character or a possible stop string is pending). `finish_reason` is set on the
    last event: "stop" (EOS or stop string), "length" (max_tokens or context), "cancelled",
    "timeout" or "error" (then `error` holds the message)."""

    token_id: int | None
    text: str
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None
    error: str | None = None
    queue_wait_s: float | None = None  # set on the first event of a request
    steering: Steering | None = None  # first event: as applied (conditions decided)
    monitor: list[float] | None = None  # the request's monitor scores for this token


class EventStream:
    """What an engine's `submit` returns: an async iterator of a request's TokenEvents, ending
    with the one that has a `finish_reason`, and `cancel()` (each engine says how it cancels).
    A consumer that stops early (a disconnected client) cancels the request."""

    def __init__(self, request: GenerationRequest):
        self.request = request
        self._queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self.cancelled = False
        self.done = False

    def cancel(self) -> None:
        raise NotImplementedError

    def __aiter__(self) -> AsyncIterator[TokenEvent]:
        return self._events()

    async def _events(self) -> AsyncIterator[TokenEvent]:
        try:
            while True:
                event = await self._queue.get()
                yield event
                if event.finish_reason is not None:
                    self.done = True
                    return
        finally:
            if not self.done:  # the consumer went away (client disconnected)
                self.cancel()


class _Handle(EventStream):
    """The native engine's stream: events pushed from the engine thread."""

    def __init__(self, engine, request: GenerationRequest, loop: asyncio.AbstractEventLoop):
        super().__init__(request)
        self._engine = engine
        self._loop = loop

    def cancel(self) -> None:
        self.cancelled = True
        self._engine._wake()

    def _push(self, event: TokenEvent) -> None:  # called from the engine thread
        self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
