"""What one running server holds: settings, the model and its packs, presets, the engine."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

from fastapi import Request

from server.engine import Engine
from server.errors import APIError, ErrorCode
from server.observability.metrics import Metrics
from server.presets import Preset
from server.settings import Settings
from steering.models.loading import LoadedModel
from steering.packs.format import SteeringPack

log = logging.getLogger("server")


@dataclass
class ServerState:
    settings: Settings
    metrics: Metrics
    lm: LoadedModel | None = None
    packs: dict[str, SteeringPack] = field(default_factory=dict)
    default_pack: str | None = None
    presets: dict[str, Preset] = field(default_factory=dict)
    engine: Engine | None = None
    ready: bool = False
    draining: bool = False
    load_error: str | None = None
    loading_since: float = field(default_factory=time.time)
    started: int = field(default_factory=lambda: int(time.time()))
    token_text: Any = None  # api.tracker.TokenText: token strings for logprobs
    failed_packs: dict[str, str] = field(default_factory=dict)  # name → why it was refused
    pinned_packs: frozenset[str] = frozenset()  # loaded at start: never replaced or deleted
    rate_limiter: Any = None  # policy.RateLimiter (per-key token buckets)
    tokenizer_pool: ThreadPoolExecutor | None = None  # see `in_tokenizer_thread`
    extraction_jobs: dict[str, Any] = field(default_factory=dict)  # id → ExtractionJob
    extraction_model: Callable[[], LoadedModel] | None = None  # the jobs' model (api.extract_jobs)

    @property
    def served_name(self) -> str:
        if self.settings.served_model_name:
            return self.settings.served_model_name
        if self.lm is not None:
            return self.lm.name
        # still loading: a name, never a local path (a folder or file shows its last part)
        return PurePath(self.settings.model).name or self.settings.model

    async def in_tokenizer_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` in the server's tokenizer thread, off the event loop (chat templates and
        tokenization). One thread: a Hugging Face tokenizer is not safe to call from several
        threads at once, and requests queue for it in order."""
        if self.tokenizer_pool is None:
            self.tokenizer_pool = ThreadPoolExecutor(1, thread_name_prefix="steer-tokenize")
        return await asyncio.get_running_loop().run_in_executor(self.tokenizer_pool, fn, *args)

    def close(self) -> None:
        """Stop the tokenizer thread (the lifespan's end)."""
        if self.tokenizer_pool is not None:
            self.tokenizer_pool.shutdown(wait=False, cancel_futures=True)
            self.tokenizer_pool = None

    def require_ready(self) -> Engine:
        if self.ready and self.engine is not None and not self.draining:
            return self.engine
        if self.load_error:  # the reason is in the server log, not in responses
            message = "the model failed to load; the server log has the details"
        elif self.draining:
            message = "the server is shutting down"
        else:
            message = "the model is still loading; retry shortly"
        raise APIError(503, message, type="service_unavailable", code=ErrorCode.NOT_READY,
                       headers={"Retry-After": str(max(self.settings.retry_after_s, 1))})


def get_state(request: Request) -> ServerState:
    return request.app.state.steer
