"""The batching engine: owns the model and decodes many requests together (continuous batching).

(Why one ~620-line module: `Engine` is one state machine — the batch, its KV cache, the slots —
whose steps all read and write that state on one thread; the pieces with a job of their own are
apart: the interface types (`interface`), KV surgery (`kv`), the prefix cache (`prefix`),
sampling, detokenization, attention, thread tuning, model calls between steps (`calls`).)

One background thread runs the loop. Each step it (1) drops cancelled and timed-out requests,
(2) admits waiting requests in fair-queueing order across tenants (API keys; `_tag`) and
advances the prefill of newly admitted requests by up to one chunk's worth of prompt tokens
(`prefill_chunk`) — several short prompts in one step, a long prompt never stalling the running
ones for more than a chunk — and merges each into the batch when done,
(3) runs one batched forward for every running request, each row with its own steering through
the kernel's per-row path, and samples each row with its own generator. Every request keeps its
own slot in the batch KV cache: rows are left-padded to a common length with masked positions,
so a row computes what it would compute alone.

The hooks get each row's prompt length with its steering, so targeted edits (apply_to,
generation_window) know which positions are prompt and which generated. A request with a
condition (`when`) prefills unsteered while `ConditionGate` captures the residual it scores; the
decided steering then replaces the request's, and the prefill is redone from the first prompt
position it edits, if any. The first TokenEvent carries the steering as applied. A request's
`monitors` are scored by read-only hooks in the forward that yields each of its tokens
(`steering.interventions.monitors`); each TokenEvent carries them (`monitor`).

The serving layer uses only:

    engine = Engine(lm, max_batch=16, max_queue=64, request_timeout_s=600.0)
    await engine.start()                       # starts the background decode loop
    handle = engine.submit(GenerationRequest(...))   # raises QueueFull when the queue is full
    async for event in handle:                 # TokenEvent per generated token
        ...
    handle.cancel()                            # frees the slot at the next step
    result = await engine.call(fn)             # fn(lm) on the engine thread, between steps
    await engine.shutdown()                    # stop admitting, finish running, stop the loop
    engine.stats()                             # {"running": int, "waiting": int}
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from server.engine.attention import use_row_exact_attention
from server.engine.calls import ModelCall
from server.engine.detok import Detokenizer
from server.engine.interface import (  # noqa: F401 (the interface, re-exported)
    EngineStopped,
    GenerationRequest,
    QueueFull,
    SamplingParams,
    TokenEvent,
    _Handle,
)
from server.engine.kv import new_cache, select_row
from server.engine.prefix import PrefixCache, prompt_edits_key
from server.engine.sampling import Draw, RowSampling, draw
from server.engine.threads import ThreadTuner
from steering.interventions.conditions import ConditionGate
from steering.interventions.hooks import hooks_of
from steering.interventions.monitors import monitors_of
from steering.models.cache_arg import cache_kwargs
from steering.models.chat import template_opening
from steering.models.loading import LoadedModel, eos_ids

log = logging.getLogger(__name__)


@dataclass
class _Slot:
    """A request inside the engine."""

    handle: _Handle
    submitted: float
    deadline: float
    generator: torch.Generator | None
    detok: Detokenizer
    prefill_cache: DynamicCache | None = None
    prefilled: int = 0  # prompt tokens already in the cache
    tag: float = 0.0  # fair queueing: the virtual time it finishes at (smallest goes first)
    gate: ConditionGate | None = None  # while the prompt's conditions are undecided
    position: int = 0  # position id of the next input token
    generated: int = 0
    first_event: bool = True

    @property
    def request(self) -> GenerationRequest:
        return self.handle.request


class Engine:
    reads_stream = True  # monitors and `call` (capture, inspection); another engine may not
    def __init__(self, lm: LoadedModel, max_batch: int = 16, max_queue: int = 64,
                 request_timeout_s: float = 600.0, prefill_chunk: int = 512,
                 tune_threads: bool = False, prefix_cache: int = 16,
                 max_queue_per_tenant: int | None = None):
        self.lm = lm
        # The chat template's opening is prefilled as a chunk of its own and its keys/values
        # kept per steering of the prompt (prefix.py); `prefix_cache` entries, 0: no split.
        self.prefixes = (PrefixCache(template_opening(lm.tokenizer), prefix_cache)
                         if prefix_cache > 0 else None)
        # Opt-in: intra-op threads chosen by measuring decode steps (threads.py); CPU only. Off
        # by default: fp32 (MKL) matmuls may round differently at another thread count, so a
        # switch between steps could change a row's last bits.
        self._threads = ThreadTuner() if tune_threads and lm.device.type == "cpu" else None
        use_row_exact_attention(lm.model)  # a row attends as it does alone (attention.py)
        self.max_batch = max_batch
        self.max_queue = max_queue
        # One tenant (an API key) may hold at most this many waiting requests (None: the whole
        # queue), so one key cannot fill the queue and make everyone else's requests 429.
        self.max_queue_per_tenant = max_queue_per_tenant
        self._vtime = 0.0  # fair queueing's virtual time (`_tag`)
        self._tenant_tags: dict[str | None, float] = {}
        self.request_timeout_s = request_timeout_s
        self.prefill_chunk = prefill_chunk
        self._waiting: deque[_Slot] = deque()
        self._calls: deque[ModelCall] = deque()  # model work between steps (`call`)
        self._prefilling: _Slot | None = None
        self._rows: list[_Slot] = []  # running requests, in batch order
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [B, S] 1 = real token
        self._next_tokens: torch.Tensor | None = None  # [B] the token each row feeds next
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._thread: threading.Thread | None = None
        self._accepting = False
        self._stopping = False
        self._failing: bool | None = None  # set once a decode step is past its forward
        self._eos = eos_ids(lm)

    # ---- public ---------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._thread is not None:
            return
        self._accepting, self._stopping = True, False  # a shut-down engine may start again
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def submit(self, request: GenerationRequest) -> _Handle:
        if not self._accepting:
            raise EngineStopped("the server is shutting down and admits no new requests")
        handle = _Handle(self, request, asyncio.get_running_loop())
        now = time.monotonic()
        seed = request.sampling.seed
        generator = None
        if request.sampling.temperature > 0:
            generator = torch.Generator(device=self.lm.device)
            generator.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(6)))
        slot = _Slot(handle, now, now + self.request_timeout_s, generator,
                     Detokenizer(self.lm.tokenizer, request.sampling.stop))
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} waiting)")
            tenant, cap = request.tenant, self.max_queue_per_tenant
            if tenant is not None and cap is not None and \
                    sum(s.request.tenant == tenant for s in self._waiting) >= cap:
                raise QueueFull(f"this key's share of the queue is full ({cap} waiting)")
            slot.tag = self._tag(tenant)
            self._waiting.append(slot)
        self._wake()
        return handle

    def call(self, fn: Callable[[LoadedModel], Any]) -> asyncio.Future:
        """Run `fn(lm)` on the engine thread between two steps and get its result (or its
        exception) in the returned future: work that needs the model to itself (activation
        capture, inspection). The steering and monitor hooks are idle while it runs, and one
        call runs per step, so decoding continues between calls."""
        if not self._accepting:
            raise EngineStopped("the server is shutting down and admits no new requests")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            if len(self._calls) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} calls waiting)")
            self._calls.append(ModelCall(fn, future, loop))
        self._wake()
        return future

    def _run_call(self) -> None:
        with self._lock:
            call = self._calls.popleft() if self._calls else None
        if call is None:
            return
        hooks_of(self.lm).set_rows(None)
        watch = monitors_of(self.lm, create=False)
        if watch is not None:
            watch.set_rows(None)
        try:
            with torch.inference_mode():
                result, error = call.fn(self.lm), None
        except Exception as exc:  # the caller's error, handed to it
            result, error = None, exc
        finally:
            hooks_of(self.lm).set_rows(None)
        call.settle(result, error)

    async def shutdown(self, timeout_s: float | None = None) -> None:
        """Stop admitting, let waiting and running requests finish, then stop the loop."""
        self._accepting = False
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self.stats()["running"] + self.stats()["waiting"] > 0:
            if deadline is not None and time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        self._stopping = True
        self._wake()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)
            self._thread = None

    @property
    def accepting(self) -> bool:
        return self._accepting

    def stats(self) -> dict[str, int]:
        with self._lock:
            waiting = len(self._waiting)
        running = len(self._rows) + (1 if self._prefilling is not None else 0)
        return {"running": running, "waiting": waiting}

    def prefix_stats(self) -> dict[str, int]:
        """Prefills that reused / computed the template's opening since start (prefix.py)."""
        p = self.prefixes
        return {"prefix_cache_hits": p.hits if p else 0, "prefix_cache_misses": p.misses if p else 0}

    # ---- the loop -------------------------------------------------------------------------------

    def _wake(self) -> None:
        self._wakeup.set()

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stopping:
            if not (self._rows or self._prefilling or self._waiting or self._calls):
                self._wakeup.wait(timeout=0.5)
                self._wakeup.clear()
                continue
            if self._threads is not None:
                self._threads.apply()
            try:
                self._run_call()
                self._step()
            except Exception as exc:  # a broken step fails its requests, not the server
                log.exception("engine step failed")
                self._fail_all(f"internal error in the engine: {type(exc).__name__}: {exc}")
            self._failing = None

    @torch.inference_mode()
    def _step(self) -> None:
        self._reap()
        self._prefill_within_budget()
        if self._rows:
            width = self._mask.shape[1] if self._mask is not None else 0
            started = time.perf_counter()
            try:
                self._decode()
                if self._threads is not None:
                    self._threads.record(time.perf_counter() - started)
            except Exception as exc:
                if self._failing is not True:  # the batched forward failed, nothing was emitted
                    self._isolate(width, exc)
                else:
                    raise

    def _reap(self) -> None:
        now = time.monotonic()
        with self._lock:
            for slot in list(self._waiting):
                if slot.handle.cancelled or now > slot.deadline:
                    self._waiting.remove(slot)
                    self._finish_slot(slot, "cancelled" if slot.handle.cancelled else "timeout")
        if self._prefilling is not None and (self._prefilling.handle.cancelled
                                             or now > self._prefilling.deadline):
            slot, self._prefilling = self._prefilling, None
            self._finish_slot(slot, "cancelled" if slot.handle.cancelled else "timeout")
        gone = [i for i, s in enumerate(self._rows) if s.handle.cancelled or now > s.deadline]
        for i in gone:
            s = self._rows[i]
            self._finish_slot(s, "cancelled" if s.handle.cancelled else "timeout")
        self._drop_rows(gone)

    def _prefill_within_budget(self) -> None:
        """Prefill chunks of waiting requests, one request at a time, until this step has run
        `prefill_chunk` prompt tokens: several short prompts are admitted in one step (their
        first tokens do not each wait for a decode step), and the running rows still wait
        for one chunk's worth of prompt tokens at most. Chunk boundaries depend on the request
        alone (multiples of `prefill_chunk` from its prompt's start, or from the position a
        decided condition redoes the prefill from), so it computes the same whatever else is
        waiting."""
        budget = self.prefill_chunk
        while budget > 0:
            if self._prefilling is None:
                with self._lock:
                    nxt = self._next_waiting() if len(self._rows) < self.max_batch else None
                    if nxt is not None and self._fits(nxt, budget):
                        self._waiting.remove(nxt)
                        self._vtime = max(self._vtime, nxt.tag - 1.0)
                        self._prefilling = nxt
            slot = self._prefilling
            if slot is None or not self._fits(slot, budget):
                return
            try:
                ran = self._prefill_chunk()
            except Exception as exc:  # one request's prefill: it fails alone
                self._prefilling = None
                if slot not in self._rows:
                    self._fail_one(slot, exc)
                if slot.prefill_cache is None:  # failed while joining the batch cache: all
                    raise
                return
            budget -= ran

    def _tag(self, tenant: str | None) -> float:
        """Start-time fair queueing (Goyal et al. 1996) with a cost of 1 per request: a request
        finishes, in virtual time, one unit after its tenant's previous one or after the request
        being served now, whichever is later; the waiting request with the smallest tag goes
        first. Tenants alternate however many requests each has queued, and a tenant back from
        idle starts at the current virtual time (no credit saved up). Called under the lock."""
        tag = max(self._vtime, self._tenant_tags.get(tenant, 0.0)) + 1.0
        self._tenant_tags[tenant] = tag
        return tag

    def _next_waiting(self) -> _Slot | None:
        """The waiting request to admit next: the smallest tag, then the earliest arrival (one
        tenant alone: arrival order). Called under the lock."""
        if not self._waiting:
            return None
        return min(self._waiting, key=lambda s: (s.tag, s.submitted))

    def _fits(self, slot: _Slot, budget: int) -> bool:
        """The step's first chunk always runs; a later one only where it fits the budget left."""
        chunk = min(len(slot.request.prompt_ids) - slot.prefilled, self.prefill_chunk)
        return budget == self.prefill_chunk or chunk <= budget

    def _prefill_chunk(self) -> int:
        """Run the prefilling request's next chunk; returns how many prompt tokens it ran."""
        slot = self._prefilling
        assert slot is not None
        ids = slot.request.prompt_ids
        if slot.prefill_cache is None:
            slot.prefill_cache = new_cache()
            slot.gate = ConditionGate.open(slot.request.steering, len(ids))
        start, end = slot.prefilled, min(len(ids), slot.prefilled + self.prefill_chunk)
        gate = slot.gate  # undecided conditions: prefill unsteered and capture their residuals
        opening = self.prefixes.boundary(ids) if self.prefixes is not None else None
        key = None
        if opening is not None and start < opening < end:
            end = opening  # the opening is always a chunk of its own (prefix.py)
            if start == 0 and not (gate and gate.reads_before(opening)):
                key = prompt_edits_key(None if gate else slot.request.steering)
                cached = self.prefixes.restore(key)
                if cached is not None:
                    slot.prefill_cache, slot.prefilled = cached, opening
                    return 0
        device = self.lm.device
        input_ids = torch.tensor([ids[start:end]], device=device)
        hooks_of(self.lm).set_rows(None if gate else [slot.request.steering], [len(ids)])
        watch = self._watch([slot])
        with gate.capture(self.lm, start, end) if gate else nullcontext():
            out = self.lm.model(
                input_ids=input_ids,
                attention_mask=torch.ones(1, end, dtype=torch.long, device=device),
                position_ids=torch.arange(start, end, device=device)[None],
                use_cache=True, logits_to_keep=1,
                **cache_kwargs(self.lm.model, slot.prefill_cache))
        slot.prefilled = end
        if key is not None:
            self.prefixes.store(key, slot.prefill_cache)
        if end == len(ids) and gate is not None:
            slot.gate = None
            slot.request.steering, redo = gate.decide()
            if redo is not None:  # the decided steering edits the prompt from `redo` on
                _truncate(slot.prefill_cache, redo)
                slot.prefilled = redo
        if slot.prefilled < len(ids):
            return end - start
        slot.position = len(ids)
        token = self._sample_and_emit([slot], out.logits[:, -1, :],
                                      watch.take() if watch else None)[0]
        if token is not None:
            self._merge(slot, token)
        # only now: `stats()` (hence a draining shutdown) must never see the request in neither
        # place, or the loop could stop with it in the batch
        self._prefilling = None
        return end - start

    def _decode(self) -> None:
        device = self.lm.device
        assert self._cache is not None and self._mask is not None
        self._mask = torch.cat([self._mask, torch.ones(len(self._rows), 1, dtype=torch.long,
                                                       device=device)], dim=1)
        positions = torch.tensor([[s.position] for s in self._rows], device=device)
        hooks_of(self.lm).set_rows([s.request.steering for s in self._rows],
                               [len(s.request.prompt_ids) for s in self._rows])
        watch = self._watch(self._rows)
        out = self.lm.model(input_ids=self._next_tokens[:, None], attention_mask=self._mask,
                            position_ids=positions, use_cache=True,
                            **cache_kwargs(self.lm.model, self._cache))
        self._failing = True  # past the forward: a failure now is not one row's
        for s in self._rows:
            s.position += 1
        tokens = self._sample_and_emit(self._rows, out.logits[:, -1, :],
                                       watch.take() if watch else None)
        finished = [i for i, t in enumerate(tokens) if t is None]
        self._next_tokens = torch.tensor([t if t is not None else 0 for t in tokens],
                                         device=device)
        self._drop_rows(finished)

    # ---- sampling and events --------------------------------------------------------------------

    def _watch(self, slots: list[_Slot]):
        """The monitor hooks scoring these rows in the next forward (None: no row is
        monitored and none ever was; monitors.py)."""
        if not any(s.request.monitors for s in slots):
            watch = monitors_of(self.lm, create=False)
            if watch is not None:
                watch.set_rows(None)
            return None
        watch = monitors_of(self.lm)
        watch.set_rows([s.request.monitors for s in slots])
        return watch

    def _sample_and_emit(self, slots: list[_Slot], logits: torch.Tensor,
                         monitor: list[list[float]] | None = None) -> list[int | None]:
        """Sample one token per row and send its event (with the row's monitor scores); None
        where the request finished. A row that cannot be sampled (non-finite logits, or a
        constraint that raised) fails alone."""
        logits, failed = _constrain(slots, logits)
        draws = draw(logits, [_row_sampling(s) for s in slots])
        result: list[int | None] = []
        for i, (slot, d) in enumerate(zip(slots, draws, strict=True)):
            if i in failed or d.error is not None:
                self._fail_one(slot, failed.get(i) or FloatingPointError(d.error),
                               reset_hooks=False)
                result.append(None)
                continue
            result.append(self._emit(slot, d, monitor[i] if monitor else None))
            if slot.request.sampling.constraint is not None:
                slot.request.sampling.constraint.advance(d.token)
        return result

    def _emit(self, slot: _Slot, d: Draw, monitor: list[float] | None = None) -> int | None:
        """Send one row's token event; its token, or None when the request finished."""
        sp = slot.request.sampling
        token = d.token
        slot.generated += 1
        event = TokenEvent(token_id=token, text="", logprob=d.logprob,
                           top_logprobs=d.top_logprobs, monitor=monitor or None)
        if slot.first_event:
            event.queue_wait_s = time.monotonic() - slot.submitted
            event.steering = slot.request.steering
            slot.first_event = False
        finish = None
        if (token in self._eos and not sp.ignore_eos) or token in sp.stop_token_ids:
            finish = "stop"
            event.text = slot.detok.finish()
        else:
            event.text, hit_stop = slot.detok.add(token)
            if hit_stop:
                finish = "stop"
            elif (slot.generated >= sp.max_tokens
                  or slot.position + 1 >= self.lm.context_length):
                finish = "length"
                event.text += slot.detok.finish()
        event.finish_reason = finish
        slot.handle._push(event)
        return None if finish else token

    def _finish_slot(self, slot: _Slot, reason: str, error: str | None = None) -> None:
        slot.handle._push(TokenEvent(token_id=None, text="", finish_reason=reason, error=error))

    def _fail_one(self, slot: _Slot, exc: Exception, reset_hooks: bool = True) -> None:
        # the traceback goes to the server log (the client gets the one-line message only)
        log.error("request %s failed in the engine: %s: %s", slot.request.request_id,
                  type(exc).__name__, exc, exc_info=exc)
        self._finish_slot(slot, "error", f"internal error in the engine: "
                                         f"{type(exc).__name__}: {exc}")
        if reset_hooks:
            hooks_of(self.lm).set_rows(None)  # forget edits half-built for the failed rows

    def _isolate(self, width: int, exc: Exception) -> None:
        """The batched decode raised: undo its partial cache growth, retry each row alone on a
        copy of its cache to find the failing ones, and fail only those. The others decode on
        in the next step, unchanged (nothing was emitted for this step)."""
        log.warning("batched decode failed (%s: %s); retrying its %d rows one at a time",
                    type(exc).__name__, exc, len(self._rows))
        hooks_of(self.lm).set_rows(None)
        self._mask = self._mask[:, :width]
        _truncate(self._cache, width)
        device = self.lm.device
        bad: list[int] = []
        for i, slot in enumerate(self._rows):
            solo = select_row(self._cache, i)
            mask = torch.cat([self._mask[i:i + 1],
                              torch.ones(1, 1, dtype=torch.long, device=device)], dim=1)
            try:
                hooks_of(self.lm).set_rows([slot.request.steering], [len(slot.request.prompt_ids)])
                self.lm.model(input_ids=self._next_tokens[i:i + 1, None], attention_mask=mask,
                              position_ids=torch.tensor([[slot.position]], device=device),
                              use_cache=True, **cache_kwargs(self.lm.model, solo))
            except Exception as row_exc:
                bad.append(i)
                self._fail_one(slot, row_exc)
        hooks_of(self.lm).set_rows(None)
        if not bad:  # only the batch as a whole fails: nothing to single out
            raise exc
        self._drop_rows(bad)

    def _fail_all(self, message: str) -> None:
        slots = list(self._rows) + ([self._prefilling] if self._prefilling else [])
        for slot in slots:
            self._finish_slot(slot, "error", message)
        self._rows, self._prefilling = [], None
        self._cache = self._mask = self._next_tokens = None
        hooks_of(self.lm).set_rows(None)

    # ---- the batch KV cache ---------------------------------------------------------------------

    def _merge(self, slot: _Slot, token: int) -> None:
        """Add a prefilled request to the batch: left-pad the shorter side's cache."""
        new = slot.prefill_cache
        slot.prefill_cache = None
        device = self.lm.device
        n_new = new.layers[0].keys.shape[-2]
        new_mask = torch.ones(1, n_new, dtype=torch.long, device=device)
        tok = torch.tensor([token], device=device)
        if self._cache is None:
            self._cache, self._mask, self._next_tokens = new, new_mask, tok
            self._rows = [slot]
            return
        n_old = self._mask.shape[1]
        width = max(n_old, n_new)
        for old_layer, new_layer in zip(self._cache.layers, new.layers):
            old_layer.keys = torch.cat([_left_pad(old_layer.keys, width),
                                        _left_pad(new_layer.keys, width)])
            old_layer.values = torch.cat([_left_pad(old_layer.values, width),
                                          _left_pad(new_layer.values, width)])
        self._mask = torch.cat([_left_pad(self._mask, width), _left_pad(new_mask, width)])
        self._next_tokens = torch.cat([self._next_tokens, tok])
        self._rows.append(slot)

    def _drop_rows(self, indices: list[int]) -> None:
        if not indices:
            return
        keep = [i for i in range(len(self._rows)) if i not in set(indices)]
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._cache = self._mask = self._next_tokens = None
            hooks_of(self.lm).set_rows(None)
            return
        index = torch.tensor(keep, device=self.lm.device)
        # Columns that are padding in every remaining row can go.
        mask = self._mask[index]
        first = int(mask.any(dim=0).nonzero()[0])
        for layer in self._cache.layers:
            layer.keys = layer.keys[index, :, first:]
            layer.values = layer.values[index, :, first:]
        self._mask = mask[:, first:]
        self._next_tokens = self._next_tokens[index]


def _truncate(cache: DynamicCache, length: int) -> None:
    """Keep the first `length` positions of every row of a cache."""
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None:
            layer.keys, layer.values = layer.keys[..., :length, :], layer.values[..., :length, :]


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """Left-pad the sequence axis (dim 2 for [B, H, S, D] caches, dim 1 for [B, S] masks)."""
    axis = 2 if t.ndim == 4 else 1
    missing = width - t.shape[axis]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[axis] = missing
    return torch.cat([torch.zeros(shape, dtype=t.dtype, device=t.device), t], dim=axis)


def _constrain(slots: list[_Slot], logits: torch.Tensor
               ) -> tuple[torch.Tensor, dict[int, Exception]]:
    """Rows with a constraint (JSON mode): every token it does not allow set to the lowest
    finite float (probability 0 after softmax; finite, so `draw`'s check for broken logits
    still means what it says). A row whose constraint raises fails alone (by row index)."""
    rows = [i for i, s in enumerate(slots) if s.request.sampling.constraint is not None]
    failed: dict[int, Exception] = {}
    if not rows:
        return logits, failed
    logits = logits.float().clone()
    for i in rows:
        try:
            allowed = slots[i].request.sampling.constraint.allowed(logits.shape[-1])
        except Exception as exc:  # the row fails, the batch goes on
            failed[i] = exc
            continue
        if allowed is not None:
            logits[i].masked_fill_(~allowed.to(logits.device), torch.finfo(logits.dtype).min)
    return logits, failed


def _row_sampling(slot: _Slot) -> RowSampling:
    sp = slot.request.sampling
    wants = sp.logprobs and (sp.logprobs_tokens is None or slot.generated < sp.logprobs_tokens)
    return RowSampling(sp.temperature, sp.top_p, slot.generator,
                       (sp.top_logprobs or 0) if wants else None)
