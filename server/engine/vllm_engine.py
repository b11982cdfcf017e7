"""The vLLM engine behind the same interface as the native one (`server.engine.core.Engine`).

vLLM's `AsyncLLM` (V1 engine: its own scheduler, paged KV cache, prefix cache, chunked prefill,
torch.compile, CUDA graphs, tensor parallelism) runs the model; steering is the plugin in
`steering.vllm`, loaded by vLLM in each of its processes. This adapter turns a
`GenerationRequest` into a vLLM request — the prompt's token ids, the sampling settings, the
steering's wire form in `SamplingParams.extra_args` and its prefix-cache salt — and vLLM's
streamed deltas back into `TokenEvent`s, one per generated token.

    engine = VllmEngine(lm, model_path, pack_paths, max_batch=16, max_queue=64)
    await engine.start()           # spawns vLLM's engine core and workers, loads the model
    handle = engine.submit(request)   # QueueFull, EngineStopped, ValueError (unsupported steering)
    async for event in handle: ...
    await engine.shutdown()

Differences from the native engine, by construction:
- conditional steering (`when`): the native engine decides it during its own prefill (unsteered
  until the condition's position, then redone from the first edited position); vLLM's scheduler
  has no such re-prefill, so this adapter decides it before submitting, with one unsteered
  forward of the prompt through the server's own copy of the model
  (`steering.interventions.conditions.decide_on_prompt`, the same residual and score), one
  request at a time on a worker thread; vLLM then gets the decided steering, prompt edits
  included. The cost is that extra prefill on the server's device; the decisions are the native
  engine's (at the server model's precision);
- `max_batch` is vLLM's `max_num_seqs`; requests beyond it wait in vLLM's own queue, and this
  adapter bounds running + waiting at `max_batch + max_queue` (QueueFull beyond);
- a row is not bit-exact with its solo run: vLLM's kernels are not batch-invariant (the steering
  edit is: each token is edited from its own values only).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

from server.engine.core import EngineStopped, GenerationRequest, QueueFull, TokenEvent
from server.engine.interface import EventStream
from steering.interventions.conditions import decide_on_prompt, pending
from steering.interventions.methods import Steering
from steering.models.loading import LoadedModel
from steering.vllm import check_version, graphs, wire
from steering.vllm.packs import ENV as PACKS_ENV
from steering.vllm.packs import environment

log = logging.getLogger(__name__)
RAY_COPY = "VLLM_RAY_EXTRA_ENV_VARS_TO_COPY"  # vLLM: more variables for Ray workers (comma list)


class _Handle(EventStream):
    """A vLLM request's stream: events put by the task that reads `AsyncLLM.generate`."""

    def __init__(self, engine: VllmEngine, request: GenerationRequest, request_id: str):
        super().__init__(request)
        self.request_id = request_id
        self._engine = engine
        self.task: asyncio.Task | None = None

    def cancel(self) -> None:
        if self.cancelled or self.done:
            return
        self.cancelled = True
        if self.task is not None and not self.task.done():
            self.task.cancel()


class VllmEngine:
    def __init__(self, lm: LoadedModel, model_path: str, pack_paths: Mapping[str, str],
                 max_batch: int = 16, max_queue: int = 64, request_timeout_s: float = 600.0,
                 dtype: str = "auto", enforce_eager: bool = False,
                 tensor_parallel_size: int = 1, max_model_len: int | None = None,
                 engine_args: Mapping[str, Any] | None = None):
        self.lm = lm
        self.model_path = model_path
        self.pack_paths = dict(pack_paths)
        self.max_batch, self.max_queue = max_batch, max_queue
        self.request_timeout_s = request_timeout_s
        self.dtype, self.enforce_eager = dtype, enforce_eager
        self.tensor_parallel_size = tensor_parallel_size
        self.max_model_len = max_model_len
        self.engine_args = dict(engine_args or {})
        self._llm: Any = None
        self._handles: set[_Handle] = set()
        self._stopping = False
        self._counter = 0
        self._deciding = threading.Lock()  # one condition forward at a time through `lm`

    # ---- life ----------------------------------------------------------------------------------

    async def start(self) -> None:
        import os

        check_version()
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        os.environ.update(environment(self.pack_paths))  # inherited by vLLM's processes
        # vLLM's Ray executor copies only the variables it is told of to workers on other nodes.
        extra = [v for v in os.environ.get(RAY_COPY, "").split(",") if v.strip()]
        os.environ[RAY_COPY] = ",".join(dict.fromkeys([*extra, PACKS_ENV]))
        extra = dict(self.engine_args)
        import torch

        if torch.cuda.is_available() and not self.enforce_eager:
            # CUDA graphs must not capture the steering ops (steering/vllm/graphs.py).
            extra.setdefault("compilation_config", graphs.compilation_config())
        args = AsyncEngineArgs(model=self.model_path, dtype=self.dtype, seed=0,
                               max_num_seqs=self.max_batch, enforce_eager=self.enforce_eager,
                               tensor_parallel_size=self.tensor_parallel_size,
                               max_model_len=self.max_model_len, **extra)
        self._llm = await asyncio.to_thread(AsyncLLM.from_engine_args, args)

    @property
    def alive(self) -> bool:
        return self._llm is None or not self._llm.errored

    async def shutdown(self, timeout_s: float | None = None) -> None:
        self._stopping = True
        tasks = [h.task for h in self._handles if h.task is not None]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=timeout_s)
            for h in list(self._handles):
                if h.task in late:
                    h.cancel()
            if late:
                await asyncio.wait(late, timeout=5.0)
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None

    def stats(self) -> dict[str, int]:
        return {"running": len(self._handles), "waiting": 0}

    def prefix_stats(self) -> dict[str, int]:
        return {}

    # ---- requests ------------------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> _Handle:
        if self._stopping or self._llm is None:
            raise EngineStopped()
        if len(self._handles) >= self.max_batch + self.max_queue:
            raise QueueFull()
        # unsupported steering raises here, before a handle; conditions are decided in `_run`
        built = None if pending(request.steering) else self._vllm_request(request)
        self._counter += 1
        handle = _Handle(self, request, f"{request.request_id or 'req'}#{self._counter}")
        handle.task = asyncio.create_task(self._run(handle, built))
        self._handles.add(handle)
        return handle

    def _decide(self, request: GenerationRequest) -> Steering:
        """The request's steering with its conditions decided on its prompt (module docstring)."""
        with self._deciding:
            return decide_on_prompt(self.lm, request.prompt_ids, request.steering)

    def _vllm_request(self, request: GenerationRequest) -> tuple[Any, Any]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        s = request.sampling
        prompt = TokensPrompt(prompt_token_ids=list(request.prompt_ids))
        salt = wire.cache_salt(request.steering)
        if salt is not None:
            prompt["cache_salt"] = salt
        top = s.top_logprobs if s.logprobs else None
        extra: dict[str, Any] = {}
        if s.constraint is not None:  # JSON mode: vLLM's own structured outputs, same schema
            from vllm.sampling_params import StructuredOutputsParams

            extra["structured_outputs"] = StructuredOutputsParams(json=s.constraint.schema)
        params = SamplingParams(
            max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p, seed=s.seed,
            stop=list(s.stop) or None, stop_token_ids=list(s.stop_token_ids) or None,
            ignore_eos=s.ignore_eos, logprobs=top, output_kind=RequestOutputKind.DELTA,
            extra_args=wire.extra_args(request.steering) or None, **extra)
        return params, prompt

    async def _run(self, handle: _Handle, built: tuple[Any, Any] | None) -> None:
        submitted = time.monotonic()
        first = True
        sent = 0
        try:
            async with asyncio.timeout(self.request_timeout_s):
                if built is None:  # conditional: decide, then build the vLLM request
                    decided = await asyncio.to_thread(self._decide, handle.request)
                    handle.request = dataclasses.replace(handle.request, steering=decided)
                    built = self._vllm_request(handle.request)
                params, prompt = built
                async for out in self._llm.generate(prompt, params, handle.request_id):
                    comp = out.outputs[0]
                    events = self._events(handle, comp, sent)
                    sent += len(comp.token_ids)
                    for ev in events:
                        if first:
                            ev.queue_wait_s = time.monotonic() - submitted
                            ev.steering = handle.request.steering
                            first = False
                        handle._queue.put_nowait(ev)
                    if out.finished:
                        return
            handle._queue.put_nowait(TokenEvent(None, "", finish_reason="stop"))
        except TimeoutError:
            await self._abort(handle)
            handle._queue.put_nowait(TokenEvent(None, "", finish_reason="timeout"))
        except asyncio.CancelledError:
            await self._abort(handle)
            handle._queue.put_nowait(TokenEvent(None, "", finish_reason="cancelled"))
        except Exception as exc:  # surfaces as this request's error (the API maps it to 500)
            log.exception("vllm request %s failed", handle.request_id)
            handle._queue.put_nowait(TokenEvent(None, "", finish_reason="error",
                                                error=f"{type(exc).__name__}: {exc}"))
        finally:
            self._handles.discard(handle)

    async def _abort(self, handle: _Handle) -> None:
        try:
            if self._llm is not None:
                await self._llm.abort(handle.request_id)
        except Exception:  # already finished
            pass

    def _events(self, handle: _Handle, comp: Any, sent: int) -> list[TokenEvent]:
        """One TokenEvent per new token; the delta's text rides on its last token."""
        s = handle.request.sampling
        ids = list(comp.token_ids)
        events = []
        for i, tid in enumerate(ids):
            ev = TokenEvent(int(tid), comp.text if i == len(ids) - 1 else "")
            if s.logprobs and comp.logprobs is not None and i < len(comp.logprobs):
                index = sent + i
                if s.logprobs_tokens is None or index < s.logprobs_tokens:
                    entry = comp.logprobs[i]
                    chosen = entry.get(tid)
                    ev.logprob = None if chosen is None else float(chosen.logprob)
                    ranked = sorted(entry.items(), key=lambda kv: kv[1].rank or 0)
                    ev.top_logprobs = [(int(t), float(lp.logprob)) for t, lp in ranked
                                       if lp.rank is not None and lp.rank <= s.top_logprobs]
            events.append(ev)
        if comp.finish_reason is not None:
            reason = "length" if comp.finish_reason == "length" else (
                "cancelled" if comp.finish_reason == "abort" else "stop")
            if events:
                events[-1].finish_reason = reason
            else:
                events.append(TokenEvent(None, comp.text, finish_reason=reason))
        return events
