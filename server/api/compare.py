"""A/B comparison of interventions: `POST /v1/steering/compare`, a sibling of chat completions.

One prompt (chat `messages`, or `prompt` as shorthand for one user message), one set of sampling
parameters, and a list of `variants`, each a preset name, a steering object (optionally naming
a `preset` whose fields it overrides) or a list of steering objects (bare, or as `{"steering":
[...], "label": ...}`). The prompt is prepared once, exactly as a chat completion
would prepare it (limits, template, token budget), and each variant only resolves its own
steering; all run with the same seed and are submitted to the engine together so they share its
batches. The response lists, per variant: the completion, whether the evaluation's refusal
matcher fires, the refusal score, token counts, time and the applied steering.

The refusal score is the log-odds of the refusal tokens ("I", "As") at the first answer position
(`steering.evaluation.refusal`), computed from the **first generated token's logprobs**: the
engine reports that position's top-`SCORE_TOP` log-probabilities (and only that position's:
`SamplingParams.logprobs_tokens = 1`) with the variant's steering applied, so no second forward
(and no race with the engine's steering hooks) is needed. When a refusal token falls outside
that top list its probability counts as 0 and `refusal_score_exact` is false (the score is then
a lower bound, and the token was very unlikely anyway).

A bad variant gets a 4xx whose message starts with `variants[i]:` and whose `param` names it.

With `"stream": true` the variants stream side by side over one server-sent-event stream; every
event's JSON names its variant by `index`:

    {"type": "start", "seed", "prompt_tokens", "variants": [{"index", "label", "model", "steering"}]}
    {"type": "delta", "index": i, "text": "..."}          as variant i generates
    {"type": "variant", "index": i, "result": {...}}      variant i finished (one `variants` entry)
    {"type": "done", "compare": {...}}                    the whole response, as without stream
    [DONE]

A variant that fails ends the stream with an in-band error event (`{"error": {...}, "index": i}`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from server.api.jobs import cancel, choice_error, collect_until_disconnect, events, submit_all
from server.api.prepare import Job, prepare
from server.api.protocol import (
    ERROR_RESPONSES,
    CompareRequest,
    CompareResponse,
    VariantResult,
)
from server.api.resolve import dump
from server.api.routing import CheckedBodyRoute
from server.api.streaming import DONE, error_event
from server.api.tracker import Choice, Tracker
from server.api.validation import COMPARE, for_variant, validate
from server.context import request_context
from server.engine import SamplingParams
from server.errors import APIError, ErrorCode
from server.observability.metrics import status_label
from server.security import audit
from server.state import ServerState, get_state
from steering.evaluation.refusal import is_refusal, refusal_score_from_logprobs, refusal_token_ids

log = logging.getLogger(__name__)

SCORE_TOP = 50  # top log-probabilities asked of the first token, for the refusal score
SCORE_POSITIONS = 1  # generated tokens that need them: the first answer position

router = APIRouter(route_class=CheckedBodyRoute)


# ---- preparing the variants ---------------------------------------------------------------------


def _score_sampling(sp: SamplingParams) -> SamplingParams:
    """`sp` asking for what the refusal score reads: the first token's top logprobs, no more."""
    return replace(sp, logprobs=True, top_logprobs=SCORE_TOP, logprobs_tokens=SCORE_POSITIONS)


async def prepare_compare(state: ServerState, body: CompareRequest, request_id: str,
                          request: Request | None = None
                          ) -> tuple[list[Job], list[str | None]]:
    """Every variant's job (`validate` checks the variants and the prompt; `prepare` admits the
    caller for all variants at once, then builds them off the event loop while the prompt is
    templated and tokenized once, unsteered, so its errors name no variant)."""
    valid = validate(state, body)
    jobs = await prepare(state, valid, request_id, request)
    return [replace(j, sampling=[_score_sampling(sp) for sp in j.sampling])
            for j in jobs], valid.labels


# ---- the endpoint -------------------------------------------------------------------------------


def _event(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


class _Run:
    """One comparison in flight: its jobs, their trackers, and the results they make."""

    def __init__(self, state: ServerState, body: CompareRequest, jobs: list[Job],
                 labels: list[str | None]):
        self.state, self.body, self.jobs, self.labels = state, body, jobs, labels
        self.trackers = [Tracker(state, job) for job in jobs]
        self.start = time.perf_counter()
        self.ids = refusal_token_ids(state.lm.tokenizer)

    def choice(self, i: int) -> Choice:
        return self.trackers[i].choices[0]

    def error(self, i: int) -> APIError | None:
        ch = self.choice(i)
        err = choice_error(self.jobs[i], ch.finish_reason, ch.error,
                           self.state.settings.request_timeout_s)
        return for_variant(i, err) if err is not None else None

    def result(self, i: int) -> VariantResult:
        job, ch = self.jobs[i], self.choice(i)
        score, exact = refusal_score_from_logprobs(dict(ch.first_top or []), self.ids)
        return VariantResult(
            index=i, label=self.labels[i], model=job.resolved.model,
            steering=job.resolved.echo(ch.steering), completion=ch.text,
            finish_reason=ch.finish_reason, is_refusal=is_refusal(ch.text),
            refusal_score=score, refusal_score_exact=exact, completion_tokens=ch.tokens,
            time_s=round((ch.finished_at or time.perf_counter()) - self.start, 4),
            ttft_s=round(ch.first_at - self.start, 4) if ch.first_at is not None else None)

    def response(self, results: list[VariantResult]) -> CompareResponse:
        return CompareResponse(id="cmp-" + uuid.uuid4().hex, created=int(time.time()),
                               model=self.body.model or self.state.served_name,
                               seed=int(self.body.seed), prompt_tokens=self.jobs[0].prompt_tokens,
                               time_s=round(time.perf_counter() - self.start, 4),
                               variants=results)

    def finish(self, status: str) -> None:
        for t in self.trackers:
            t.finish(status)

    def log(self, request: Request, results: list[VariantResult]) -> None:
        ctx = request_context(request)
        decided = [r.steering for r in results]
        audit.decide_notes(ctx, decided)
        ctx.log_extra.update({"prompt_tokens": self.jobs[0].prompt_tokens * len(self.jobs),
                              "completion_tokens": sum(r.completion_tokens for r in results),
                              "steering": [dump(d) for d in decided]})

    def start_event(self) -> str:
        return _event({"type": "start", "seed": int(self.body.seed),
                       "prompt_tokens": self.jobs[0].prompt_tokens,
                       "variants": [{"index": i, "label": self.labels[i], "model": j.resolved.model,
                                     "steering": dump(j.resolved.applied)}
                                    for i, j in enumerate(self.jobs)]})


@router.post(COMPARE, response_model=CompareResponse,
             responses={**ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}}}})
async def compare(body: CompareRequest, request: Request):
    state = get_state(request)
    ctx = request_context(request)
    try:
        state.require_ready()
        if body.seed is None:  # one seed for every variant, reported back
            body = body.model_copy(update={"seed": secrets.randbelow(2**31)})
        jobs, labels = await prepare_compare(state, body, ctx.request_id, request)
    except APIError as exc:
        state.metrics.requests.labels(COMPARE, "n/a", status_label(exc.status)).inc()
        raise
    ctx.log_extra.update({"variants": len(jobs), "user": body.user, "stream": body.stream,
                          "steering": [dump(j.resolved.applied) for j in jobs]})

    try:
        handles = submit_all(state, jobs, request)  # one choice per variant: handle i is variant i
    except APIError as exc:  # queue full, shutting down: counted once, as refused
        state.metrics.requests.labels(COMPARE, "n/a", status_label(exc.status)).inc()
        raise
    run = _Run(state, body, jobs, labels)
    if body.stream:
        return StreamingResponse(_stream(run, handles, request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    completed = await collect_until_disconnect(request, handles,
                                               lambda i, ev: run.trackers[i].add(0, ev))
    if not completed:
        run.finish("499")
        return Response(status_code=499)
    for i in range(len(jobs)):
        err = run.error(i)
        if err is not None:
            run.finish(str(err.status))
            raise err
    run.finish("200")
    results = [run.result(i) for i in range(len(jobs))]
    run.log(request, results)
    return run.response(results)


async def _stream(run: _Run, handles: list, request: Request) -> AsyncIterator[str]:
    status = "200"
    results: dict[int, VariantResult] = {}
    try:
        yield run.start_event()
        async for i, ev in events(handles):
            run.trackers[i].add(0, ev)
            if ev.text:
                yield _event({"type": "delta", "index": i, "text": ev.text})
            if ev.finish_reason is None:
                continue
            err = run.error(i)
            if err is not None:
                status = str(err.status)
                yield _event({**err.body(), "index": i})
                break
            results[i] = run.result(i)
            yield _event({"type": "variant", "index": i,
                          "result": results[i].model_dump(mode="json")})
        else:
            ordered = [results[i] for i in range(len(run.jobs))]
            run.log(request, ordered)
            yield _event({"type": "done", "compare": run.response(ordered).model_dump(mode="json")})
        yield DONE
    except (asyncio.CancelledError, GeneratorExit):
        status = "499"
        raise
    except Exception:  # headers are sent: report in-band, details to the log only
        status = "500"
        rid = run.jobs[0].request_id.rpartition("-v")[0] or run.jobs[0].request_id
        log.exception("request %s: compare stream failed", rid)
        message = f"compare stream failed (request id {rid}); the server log has the details"
        yield error_event(APIError(500, message, type="server_error",
                                   code=ErrorCode.INTERNAL_ERROR))
        yield DONE
    finally:
        cancel([h for i, h in enumerate(handles) if not run.choice(i).done])
        run.finish(status)
