"""Extraction as a job over the API (pack-admin keys only): a pack from contrastive prompts,
extracted beside serving and served as soon as it is done, without a restart.

    POST   /v1/steering/packs/extract        {"name", "positive": [...], "negative": [...]}
                                             or {"name", "dataset": "refusal" | "<concept>", "n"}
                                             → 202 {"id", "status", "progress", ...}
    GET    /v1/steering/packs/extract        every job's progress
    GET    /v1/steering/packs/extract/{id}   progress (stage, fraction, ETA) and, once done, the
                                             pack's description
    DELETE /v1/steering/packs/extract/{id}   cancel (at the job's next forward)

Needs the pack-admin grant (`pack_admin: true` with `lower_refusal: true`; no keys configured:
refused, as uploads are); a pack loaded at start cannot be replaced. A class is a list of
prompts (strings) or of {prompt, completion} objects (then activations are
read on the completion, as `steer extract --positive FILE` reads them); a `dataset` is the shipped
refusal prompts (harmful vs harmless train, the first `n` of each) or a shipped concept
(`steering.data.contrastive.SHIPPED_CONCEPTS`). Quotas: at least 4 and at most
`STEER_MAX_EXTRACT_PROMPTS` examples per class, each at most `STEER_MAX_EXTRACT_PROMPT_CHARS`
characters, and `STEER_MAX_EXTRACT_JOBS` jobs at once (429 beyond).

The job (`steering.extraction.jobs.ExtractionJob`) runs on its own full-precision copy of the
served model (loaded per job: the extraction's hooks must never touch the serving model), at a
lower thread priority and with its forwards limited to `STEER_EXTRACT_SHARE` of the wall clock.
On success the pack is checked like an upload: against the served model (`check_compatible`)
and against the shipped refusal pack (`steering.packs.consistency`: a concept's direction may
not point against refusal), saved to `STEER_PACKS_DIR` when one is set (so a restart serves it
too), and installed
(`server.packs.install_pack`): requests may name it at once. Submission and cancellation are
audit lines (`pack_extraction_submitted`, `pack_extraction_cancelled`); the outcome is logged.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from server.api.pack_admin import _refuse_pinned, _require_pack_admin
from server.api.protocol import ERROR_RESPONSES, ErrorResponse
from server.api.routing import CheckedBodyRoute
from server.errors import APIError, ErrorCode, bad_request, not_found
from server.packs import install_pack
from server.security.audit import pack_event
from server.security.hardening import check_name
from server.settings import CEILING_EXAMPLES
from server.state import ServerState, get_state
from steering.data.contrastive import SHIPPED_CONCEPTS, Example, load_examples
from steering.data.prompts import load_instructions
from steering.extraction.jobs import ExtractionJob
from steering.interventions.schema import at_most
from steering.packs.consistency import check_against_refusal
from steering.packs.format import PackError, check_compatible

log = logging.getLogger("server")

EXTRACT = "/v1/steering/packs/extract"
KEPT_JOBS = 32  # finished jobs kept for GET (the oldest go first)

router = APIRouter(route_class=CheckedBodyRoute)


class ExampleObject(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str
    completion: str | None = None


class ExtractRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = Field(description="the pack's name once served (`steering.pack`)")
    positive: Annotated[list[str | ExampleObject] | None,
                        at_most(CEILING_EXAMPLES, "examples")] = Field(
        None, description="examples of the concept (prompts, or {prompt, completion})")
    negative: Annotated[list[str | ExampleObject] | None,
                        at_most(CEILING_EXAMPLES, "examples")] = Field(
        None, description="contrasting examples, the same kind as `positive`")
    dataset: str | None = Field(None, description="instead of the lists: 'refusal' (the "
                                                  "shipped harmful vs harmless prompts) or a "
                                                  "shipped concept")
    n: int | None = Field(None, ge=4, description="examples per class taken from `dataset`")
    replace: bool = Field(False, description="replace a served pack of the same name")


def _examples(entries: list, where: str, max_chars: int) -> list[Example]:
    out = []
    for i, e in enumerate(entries):
        prompt, completion = (e, None) if isinstance(e, str) else (e.prompt, e.completion)
        for text, field in ((prompt, "prompt"), (completion, "completion")):
            if text is not None and len(text) > max_chars:
                raise bad_request(f"{where}[{i}].{field} has {len(text)} characters; the limit "
                                  f"is {max_chars}", f"{where}[{i}]", ErrorCode.PROMPT_TOO_LONG)
        if not prompt.strip():
            raise bad_request("an example's prompt must not be empty", f"{where}[{i}]",
                              ErrorCode.EMPTY_PROMPT)
        out.append(Example(prompt, completion))
    return out


def _classes(state: ServerState, body: ExtractRequest
             ) -> tuple[list[Example], list[Example], tuple[str, str]]:
    s = state.settings
    if body.dataset is not None:
        if body.positive is not None or body.negative is not None:
            raise bad_request("give either dataset or positive and negative", "dataset",
                              ErrorCode.INVALID_COMBINATION)
        n = min(body.n or 64, s.max_extract_prompts)
        if body.dataset == "refusal":
            pos = [Example(p) for p in load_instructions("harmful_train")[:n]]
            neg = [Example(p) for p in load_instructions("harmless_train")[:n]]
            return pos, neg, (f"harmful_train[:{n}]", f"harmless_train[:{n}]")
        shipped = SHIPPED_CONCEPTS.get(body.dataset)
        if shipped is None:
            known = ", ".join(["refusal", *sorted(SHIPPED_CONCEPTS)])
            raise bad_request(f"unknown dataset {body.dataset[:80]!r} (known: {known})",
                              "dataset", ErrorCode.UNKNOWN_DATASET)
        return (load_examples(shipped.positive)[:n], load_examples(shipped.negative)[:n],
                (shipped.positive, shipped.negative))
    if body.positive is None or body.negative is None:
        raise bad_request("give positive and negative examples (or a dataset)",
                          "positive" if body.positive is None else "negative",
                          ErrorCode.INVALID_EXAMPLES)
    classes = []
    for where, entries in (("positive", body.positive), ("negative", body.negative)):
        if not 4 <= len(entries) <= s.max_extract_prompts:
            raise bad_request(f"{where} must hold 4 to {s.max_extract_prompts} examples, got "
                              f"{len(entries)}", where, ErrorCode.EXTRACT_QUOTA)
        classes.append(_examples(entries, where, s.max_extract_prompt_chars))
    pos, neg = classes
    if {e.completion is None for e in pos} | {e.completion is None for e in neg} == {True,
                                                                                       False}:
        raise bad_request("either every example has a completion or none has", "negative",
                          ErrorCode.MIXED_EXAMPLES)
    return pos, neg, ("request.positive", "request.negative")


def _default_loader(state: ServerState):
    """The job's model: the served model again, at full precision (fp32 on a CPU, bf16 on a
    GPU), as the default pack is extracted."""
    import steering

    s, lm = state.settings, state.lm

    def load():
        full = "fp32" if lm.device.type == "cpu" else "bf16"
        return steering.load_model(s.model, str(lm.device), precision=full)

    return load


def _finish(state: ServerState, loop: asyncio.AbstractEventLoop):
    """What a job does when it ends: check, save and install its pack (on the event loop)."""

    def install(job: ExtractionJob) -> None:
        pack = job.pack
        reference = state.packs.get("refusal") if "refusal" in state.pinned_packs else None
        try:
            check_compatible(pack, state.lm.model)
            if reference is not None:  # as an upload is (an inverted refusal is refused)
                check_against_refusal(pack, reference)
            if pack.name in state.pinned_packs:
                raise PackError(f"pack {pack.name!r} was loaded at start and cannot be "
                                "replaced while serving")
        except PackError as exc:
            job.status, job.error, job.pack = "failed", f"the pack does not fit the served " \
                                                        f"model: {exc}", None
            log.error("extraction job %s: %s", job.id, job.error)
            return
        if state.settings.packs_dir:
            try:
                pack.save(Path(state.settings.packs_dir) / pack.name)
            except OSError as exc:  # served now; only a restart loses it
                log.warning("extraction job %s: could not save pack %s: %s", job.id, pack.name,
                            exc)
        install_pack(state, pack)
        log.info("extraction job %s: pack %r served (layer %d, %.1f s)", job.id, pack.name,
                 pack.layer, (job.finished or 0) - (job.started or 0))

    def done(job: ExtractionJob) -> None:
        if job.status == "succeeded" and job.pack is not None:
            try:
                loop.call_soon_threadsafe(install, job)
            except RuntimeError:  # the server is gone
                pass
        else:
            log.info("extraction job %s ended: %s %s", job.id, job.status, job.error or "")

    return done


def _describe(state: ServerState, job: ExtractionJob) -> dict:
    out = {"object": "steering.extraction_job", **job.progress()}
    served = state.packs.get(job.name)
    if job.status == "succeeded" and served is not None and served is job.pack:
        out["pack"] = {k: v for k, v in served.describe().items() if k != "meta"}
        out["served"] = True
    else:
        out["served"] = False
    return out


def _job(state: ServerState, job_id: str) -> ExtractionJob:
    job = state.extraction_jobs.get(job_id)
    if job is None:
        raise not_found(f"no extraction job {job_id[:80]!r}", "id", ErrorCode.JOB_NOT_FOUND)
    return job


@router.post(EXTRACT, status_code=202,
             responses={**ERROR_RESPONSES, 409: {"model": ErrorResponse}})
async def submit_extraction(body: ExtractRequest, request: Request):
    state = get_state(request)
    state.require_ready()
    _require_pack_admin(request)
    check_name(body.name, "pack", "name")
    _refuse_pinned(state, body.name, "replaced")
    if body.name in state.packs and not body.replace:
        raise APIError(409, f"a pack named {body.name!r} is already loaded (send 'replace': "
                            "true to replace it)", param="name", code=ErrorCode.PACK_EXISTS)
    running = [j for j in state.extraction_jobs.values() if not j.done]
    if len(running) >= state.settings.max_extract_jobs:
        raise APIError(429, f"{len(running)} extraction job(s) running; at most "
                            f"{state.settings.max_extract_jobs} at once", type="rate_limit_error",
                       code=ErrorCode.EXTRACTION_BUSY, headers={"Retry-After": "30"})
    if any(j.name == body.name for j in running):
        raise APIError(409, f"an extraction job for {body.name!r} is running", param="name",
                       code=ErrorCode.JOB_EXISTS)
    positive, negative, sources = _classes(state, body)
    loader = state.extraction_model or _default_loader(state)
    try:
        job = ExtractionJob(body.name, positive, negative, load=loader,
                            share=state.settings.extract_share, sources=sources,
                            on_done=_finish(state, asyncio.get_running_loop()))
    except ValueError as exc:
        raise bad_request(str(exc), "positive", ErrorCode.INVALID_EXAMPLES) from None
    finished = [k for k, j in state.extraction_jobs.items() if j.done]
    for k in finished[:max(0, len(finished) - KEPT_JOBS + 1)]:
        del state.extraction_jobs[k]
    state.extraction_jobs[job.id] = job
    data = json.dumps([[e.prompt, e.completion] for e in positive + negative]).encode()
    pack_event(request, "pack_extraction_submitted", pack=body.name, job=job.id,
               positive=len(positive), negative=len(negative), sources=list(sources),
               data_sha256=hashlib.sha256(data).hexdigest())
    job.start()
    return JSONResponse(_describe(state, job), status_code=202,
                        headers={"Location": f"{EXTRACT}/{job.id}"})


@router.get(EXTRACT, responses=ERROR_RESPONSES)
async def list_extractions(request: Request):
    state = get_state(request)
    _require_pack_admin(request)
    return {"object": "list", "data": [_describe(state, j)
                                       for j in state.extraction_jobs.values()]}


@router.get(EXTRACT + "/{job_id}", responses=ERROR_RESPONSES)
async def extraction_progress(job_id: str, request: Request):
    state = get_state(request)
    _require_pack_admin(request)
    return _describe(state, _job(state, job_id))


@router.delete(EXTRACT + "/{job_id}", responses=ERROR_RESPONSES)
async def cancel_extraction(job_id: str, request: Request):
    state = get_state(request)
    _require_pack_admin(request)
    job = _job(state, job_id)
    status: Literal["cancelling", "finished"] = "finished" if job.done else "cancelling"
    if not job.done:
        job.cancel()
        pack_event(request, "pack_extraction_cancelled", pack=job.name, job=job.id)
    return {**_describe(state, job), "cancel": status}
