"""A/B comparison of interventions: `POST /v1/steering/compare` and the web playground.

One prompt (chat `messages`, or `prompt` as shorthand for one user message), one set of sampling
parameters, and a list of `variants`, each a preset name or a steering object (optionally naming
a `preset` whose fields it overrides). Every variant is prepared exactly as a chat completion with
that model/steering would be, all run with the same seed, and all are submitted to the engine
together so they share its batches. The response lists, per variant: the completion, whether the
evaluation's refusal matcher fires, the refusal score, token counts, time and the applied steering.

The refusal score is the log-odds of the refusal tokens ("I", "As") at the first answer position
(`steering.evaluation.refusal.refusal_score`), computed from the **first generated token's logprobs**: the
engine reports that position's top-`SCORE_TOP` log-probabilities with the variant's steering
applied, so no second forward (and no race with the engine's steering hooks) is needed. When a
refusal token falls outside that top list its probability counts as 0 and `refusal_score_exact`
is false (the score is then a lower bound, and the token was very unlikely anyway).

A bad variant gets a 4xx whose message starts with `variants[i]:` and whose `param` names it.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
import uuid
from importlib import resources
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import Field

from server.api.errors import APIError, bad_request, not_found
from server.api.protocol import (
    INT64_MAX,
    AppliedSteering,
    ChatCompletionRequest,
    ChatMessage,
    _Lenient,
)
from server.api.protocol import SteeringParams as _SteeringParams
from server.api.routes import ERRORS
from server.api.serving import (
    Job,
    Tracker,
    _cancel,
    _wait_disconnect,
    choice_error,
    events,
    prepare_chat,
)
from server.api.serving import submit as submit_job
from server.security import policy
from server.state import ServerState, get_state
from steering.evaluation.refusal import is_refusal, refusal_token_ids

COMPARE = "/v1/steering/compare"
SCORE_TOP = 50  # top log-probabilities asked of the first token, for the refusal score

router = APIRouter()


# ---- request and response shapes ----------------------------------------------------------------


class CompareVariant(_SteeringParams):
    """A steering object, optionally on top of a preset (its fields override the preset's)."""

    preset: str | None = Field(None, description="preset name whose steering this starts from")
    label: str | None = Field(None, max_length=200, description="shown back in the response")


class CompareRequest(_Lenient):
    model: str | None = Field(None, description="served model id (presets go in variants)")
    messages: list[ChatMessage] | None = None
    prompt: str | None = Field(None, description="shorthand for one user message")
    variants: list[str | CompareVariant] = Field(
        ..., description="preset names or steering objects; all run with the same seed")
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=INT64_MAX)
    stop: str | list[str] | None = None
    user: str | None = None


class VariantResult(_Lenient):
    index: int
    label: str | None = None
    model: str
    steering: AppliedSteering
    completion: str
    finish_reason: str | None
    is_refusal: bool
    refusal_score: float | None
    refusal_score_exact: bool
    completion_tokens: int
    time_s: float
    ttft_s: float | None = None


class CompareResponse(_Lenient):
    id: str
    object: str = "steering.compare"
    created: int
    model: str
    seed: int
    prompt_tokens: int
    time_s: float
    variants: list[VariantResult]


# ---- preparing the variants ---------------------------------------------------------------------


def _variant_param(i: int, param: str | None) -> str:
    base = f"variants[{i}]"
    if not param:
        return base
    if param.startswith("steering."):
        return f"{base}.{param[len('steering.'):]}"
    if param == "model":
        return f"{base}.preset"
    return f"{base} ({param})"


def _for_variant(i: int, exc: APIError) -> APIError:
    return APIError(exc.status, f"variants[{i}]: {exc.message}", type=exc.type,
                    param=_variant_param(i, exc.param), code=exc.code, headers=exc.headers)


def _chat_request(body: CompareRequest, model: str | None,
                  steering: _SteeringParams | None) -> ChatCompletionRequest:
    messages = body.messages if body.messages is not None else [
        ChatMessage(role="user", content=body.prompt)]
    return ChatCompletionRequest(model=model, messages=messages, max_tokens=body.max_tokens,
                                 temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                                 stop=body.stop, steering=steering, user=body.user)


def _variant_model(state: ServerState, body: CompareRequest, preset: str | None) -> str | None:
    if preset is None:
        return body.model
    if "+" in preset:  # a full model id ("<served>+<preset>") is accepted too
        return preset
    return f"{body.model or state.served_name}+{preset}"


def prepare_compare(state: ServerState, body: CompareRequest, request_id: str
                    ) -> tuple[list[Job], list[str | None]]:
    s = state.settings
    if (body.messages is None) == (body.prompt is None):
        raise bad_request("give either messages or prompt (not both)", "messages")
    if body.model and "+" in body.model:
        raise bad_request("model must be the base model; name presets in the variants",
                          "model")
    if not body.variants:
        raise bad_request("variants must hold at least one variant", "variants",
                          "empty_variants")
    if len(body.variants) > s.max_compare_variants:
        raise bad_request(f"at most {s.max_compare_variants} variants are allowed, got "
                          f"{len(body.variants)}", "variants", "too_many_variants")
    # Everything the variants share is checked once, unsteered, so its errors name no variant.
    prepare_chat(state, _chat_request(body, body.model, None), f"{request_id}-check")
    jobs: list[Job] = []
    labels: list[str | None] = []
    for i, v in enumerate(body.variants):
        if isinstance(v, str):
            model, steering, label = _variant_model(state, body, v), None, v
        else:
            fields = v.model_fields_set - {"preset", "label"}
            steering = _SteeringParams(**{f: getattr(v, f) for f in fields}) if fields else None
            if v.preset is None and steering is None:
                steering = _SteeringParams()
            model, label = _variant_model(state, body, v.preset), v.label
        try:
            job = prepare_chat(state, _chat_request(body, model, steering), f"{request_id}-v{i}")
        except APIError as exc:
            raise _for_variant(i, exc) from None
        for sp in job.sampling:  # the first token's top logprobs give the refusal score
            sp.logprobs = True
            sp.top_logprobs = SCORE_TOP
        jobs.append(job)
        labels.append(label)
    return jobs, labels


def _score(first_top: list[tuple[int, float]] | None, ids: list[int]) -> tuple[float | None, bool]:
    if not first_top or not ids:
        return None, False
    top = dict(first_top)
    r = sum(math.exp(top[t]) for t in ids if t in top)
    exact = all(t in top for t in ids)
    r = min(max(r, 0.0), 1.0)
    return math.log(r + 1e-8) - math.log(1 - r + 1e-8), exact


# ---- the endpoint -------------------------------------------------------------------------------


@router.post(COMPARE, response_model=CompareResponse, responses=ERRORS)  # documented 4xx/5xx
async def compare(body: CompareRequest, request: Request):
    state = get_state(request)
    rid = getattr(request.state, "request_id", None) or uuid.uuid4().hex
    try:
        state.require_ready()
        if body.seed is None:  # one seed for every variant, reported back
            body = body.model_copy(update={"seed": secrets.randbelow(2**31)})
        jobs, labels = prepare_compare(state, body, rid)
        tokens = sum(j.prompt_tokens + sum(sp.max_tokens for sp in j.sampling) for j in jobs)
        policy.enforce(state, request, [j.resolved.applied for j in jobs],
                       prompt=jobs[0].prompt_texts, tokens=tokens, endpoint=COMPARE)
    except APIError as exc:
        state.metrics.requests.labels(COMPARE, "n/a", str(exc.status)).inc()
        raise
    log_extra = getattr(request.state, "log_extra", None)
    if isinstance(log_extra, dict):
        log_extra.update({"variants": len(jobs), "user": body.user,
                          "steering": [j.resolved.applied.model_dump() for j in jobs]})

    handles: list = []
    try:
        for job in jobs:  # submitted back to back: the engine batches them together
            handles.extend(submit_job(state, job))
    except APIError:
        _cancel(handles)
        raise
    trackers = [Tracker(state, job) for job in jobs]
    first_top: list[list[tuple[int, float]] | None] = [None] * len(jobs)
    done_at: list[float | None] = [None] * len(jobs)
    start = time.perf_counter()

    async def collect() -> None:
        async for c, ev in events(handles):
            if ev.token_id is not None and first_top[c] is None:
                first_top[c] = ev.top_logprobs or []
            trackers[c].add(0, ev)
            if ev.finish_reason is not None:
                done_at[c] = time.perf_counter()

    work = asyncio.create_task(collect())
    watch = asyncio.create_task(_wait_disconnect(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
            _cancel(handles)
    if not work.done() or work.cancelled():
        for t in trackers:
            t.finish("499")
        return Response(status_code=499)
    work.result()
    for i, (job, tr) in enumerate(zip(jobs, trackers)):
        err = choice_error(job, tr.choices[0], state.settings.request_timeout_s)
        if err is not None:
            for t in trackers:
                t.finish(str(err.status))
            raise _for_variant(i, err)
    ids = refusal_token_ids(state.lm.tokenizer)
    results = []
    for i, (job, tr) in enumerate(zip(jobs, trackers)):
        tr.finish("200")
        ch = tr.choices[0]
        text = "".join(ch.parts)
        score, exact = _score(first_top[i], ids)
        results.append(VariantResult(
            index=i, label=labels[i], model=job.resolved.model, steering=job.resolved.applied,
            completion=text, finish_reason=ch.finish_reason, is_refusal=is_refusal(text),
            refusal_score=score, refusal_score_exact=exact, completion_tokens=ch.tokens,
            time_s=round((done_at[i] or time.perf_counter()) - start, 4),
            ttft_s=round(ch.first_at - start, 4) if ch.first_at is not None else None))
    if isinstance(log_extra, dict):
        log_extra.update({"prompt_tokens": jobs[0].prompt_tokens * len(jobs),
                          "completion_tokens": sum(r.completion_tokens for r in results)})
    return CompareResponse(id="cmp-" + uuid.uuid4().hex, created=int(time.time()),
                           model=body.model or state.served_name, seed=int(body.seed),
                           prompt_tokens=jobs[0].prompt_tokens,
                           time_s=round(time.perf_counter() - start, 4), variants=results)


# ---- the playground -----------------------------------------------------------------------------

PLAYGROUND_FILES = {"index.html": "text/html; charset=utf-8",
                    "app.js": "text/javascript; charset=utf-8",
                    "style.css": "text/css; charset=utf-8"}


def _playground_file(name: str) -> bytes:
    return resources.files("server.playground").joinpath(name).read_bytes()


@router.get("/playground", include_in_schema=False)
async def playground() -> Response:
    return Response(_playground_file("index.html"), media_type=PLAYGROUND_FILES["index.html"],
                    headers={"Cache-Control": "no-cache"})


@router.get("/playground/", include_in_schema=False)
async def playground_slash() -> Any:
    return RedirectResponse("/playground")


@router.get("/playground/{name}", include_in_schema=False)
async def playground_asset(name: str) -> Response:
    if name not in PLAYGROUND_FILES:
        raise not_found(f"no playground file {name!r}")
    return Response(_playground_file(name), media_type=PLAYGROUND_FILES[name],
                    headers={"Cache-Control": "no-cache"})
