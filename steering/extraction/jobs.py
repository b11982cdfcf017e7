"""Extraction as a job: a contrastive pack extracted in a background thread, with progress (stage,
fraction, ETA), cancellation, and a bounded share of the machine.

    job = ExtractionJob("tone", positive, negative, load=lambda: load_model(...))
    job.start()
    job.progress()      # {"status", "stage", "fraction", "eta_s", "elapsed_s", ...}
    job.cancel()        # stops at the next forward
    job.wait(); job.pack

The job runs `steering.extraction.concept.extract_concept` (DiM per candidate layer, held-out
separation, the KL check, INLP) on **its own copy of the model** from `load()`: the extraction's
forwards register hooks and read activations on the model they run, so they must never run on a
model another thread is serving with. Everything else is the extraction as `steer extract` runs
it; the job only watches it, through two hooks on its private model's root module:

- **progress**: the extraction's forwards are counted and compared with the number it will run
  (`planned_forwards`, from the split sizes and the batch size: one per batch of each class's
  train and validation activations, then the KL check's batches); the stage is the step those
  forwards belong to. ETA = elapsed time in the forwards × (forwards left / forwards done).
- **share**: after each forward of t seconds the job sleeps t·(1/share − 1), so over time it
  uses at most `share` of the wall clock for forwards; the thread also runs at a lower CPU
  priority (`nice`, Linux: per thread), so a serving thread wins the cores when both want them.
- **cancel**: the pre-hook raises `Cancelled` at the next forward once `cancel()` was called.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from steering.data.contrastive import Example
from steering.extraction.concept import ConceptConfig, extract_concept, split
from steering.models.loading import LoadedModel
from steering.packs.format import SteeringPack

log = logging.getLogger(__name__)

STAGES = ("queued", "loading", "activations", "selection", "inlp", "done")


class Cancelled(Exception):
    """Raised inside the extraction when its job was cancelled."""


def _split_sizes(n: int, fraction: float) -> tuple[int, int]:
    """(train, val) sizes of `split` (concept.py) for n examples."""
    n_val = min(n - 2, max(2, round(n * fraction)))
    return n - n_val, n_val


def planned_forwards(n_layers: int, n_positive: int, n_negative: int,
                     config: ConceptConfig, completions: bool = False) -> _Plan:
    """The forwards `extract_concept` runs: one per batch of each split's activations; for the
    KL check, the base logits of the validation prompts, then ablate and actadd for each of the
    best-separating candidates; with completions, the behavioural score's log-likelihoods of
    both sides' held-out completions, unsteered and with each candidate. (A job passes no
    scorer, so prompt-only examples get no behavioural score.)"""
    bs = config.batch_size
    pos_train, pos_val = _split_sizes(n_positive, config.val_fraction)
    neg_train, neg_val = _split_sizes(n_negative, config.val_fraction)
    acts = sum(math.ceil(n / bs) for n in (pos_train, neg_train, pos_val, neg_val))
    kl_batches = math.ceil(min(config.kl_prompts, neg_val) / bs)
    lo = max(1, int(config.min_layer_fraction * n_layers))
    hi = max(lo + 1, int(config.max_layer_fraction * n_layers))
    candidates = len(range(lo, hi, config.layer_stride)) * max(1, config.positions)
    checked = min(config.kl_candidates, candidates)
    behaviour = (2 * (1 + checked) * math.ceil(min(config.behaviour_prompts, neg_val) / bs)
                 if completions else 0)
    return _Plan(acts, kl_batches * (1 + 2 * checked) + behaviour)


@dataclass
class _Plan:
    activations: int  # forwards reading the four splits' activations
    kl: int  # forwards of the KL check (base logits, then ablate and actadd per candidate)
    # and of the behavioural score

    @property
    def total(self) -> int:
        return self.activations + self.kl

    def stage(self, done: int) -> str:
        return "activations" if done < self.activations else "selection"


class ExtractionJob:
    """One contrastive extraction in a background thread (module docstring)."""

    def __init__(self, name: str, positive: Sequence[Example], negative: Sequence[Example],
                 load: Callable[[], LoadedModel], config: ConceptConfig | None = None,
                 share: float = 0.5, nice: int = 10, sources: tuple[str, str] = ("positive",
                                                                                  "negative"),
                 on_done: Callable[[ExtractionJob], None] | None = None):
        if not 0 < share <= 1:
            raise ValueError(f"share must be in (0, 1], got {share}")
        if {e.completion is None for e in positive} != {e.completion is None for e in negative}:
            raise ValueError("both classes must be prompt-only, or both prompt/completion pairs")
        split(positive, (config or ConceptConfig()).val_fraction, 0)  # ≥ 4 examples per class
        split(negative, (config or ConceptConfig()).val_fraction, 0)
        self.id = "extract-" + uuid.uuid4().hex[:16]
        self.name = name
        self.positive, self.negative = list(positive), list(negative)
        self.load, self.config = load, config or ConceptConfig()
        self.share, self.nice, self.sources = share, nice, sources
        self.on_done = on_done
        self.status = "queued"  # queued, running, succeeded, failed, cancelled
        self.stage = "queued"
        self.error: str | None = None
        self.pack: SteeringPack | None = None
        self.created = time.time()
        self.started: float | None = None
        self.finished: float | None = None
        self.forwards = 0
        self.plan: _Plan | None = None
        self._forward_time = 0.0  # seconds spent in the extraction's forwards
        self._slept = 0.0
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- control ------------------------------------------------------------------------------

    def start(self) -> ExtractionJob:
        self._thread = threading.Thread(target=self._run, name=f"steer-{self.id}", daemon=True)
        self._thread.start()
        return self

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelling(self) -> bool:
        return self._cancel.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    # ---- progress -----------------------------------------------------------------------------

    def fraction(self) -> float:
        """0 → 1 over the job: loading 5%, forwards to 95%, INLP and the rest to 100%."""
        if self.status == "succeeded":
            return 1.0
        if self.plan is None:
            return 0.0 if self.stage == "queued" else 0.02
        done = min(self.forwards, self.plan.total) / max(1, self.plan.total)
        return round(0.05 + 0.9 * done if self.stage != "inlp" else 0.95, 4)

    def eta_s(self) -> float | None:
        if self.status != "running" or self.plan is None or self.forwards == 0:
            return None
        left = max(0, self.plan.total - self.forwards)
        per = (self._forward_time + self._slept) / self.forwards
        return round(per * left, 1)

    def progress(self) -> dict:
        now = self.finished or time.time()
        return {"id": self.id, "name": self.name, "status": self.status, "stage": self.stage,
                "fraction": self.fraction(), "eta_s": self.eta_s(),
                "elapsed_s": round(now - self.started, 1) if self.started else 0.0,
                "forwards": self.forwards, "planned_forwards": self.plan.total if self.plan
                else None, "share": self.share, "error": self.error,
                "created": int(self.created)}

    # ---- the thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        self.started = time.time()
        self.status = "running"
        _lower_priority(self.nice)
        lm = None
        # The terminal status is published with `done`, in `finally`: a client that sees
        # "cancelled" or "failed" may submit again at once, and the job must no longer count
        # as running then (the memory is freed first, which takes a while under load).
        outcome: tuple[str, str | None] = ("failed", "the extraction thread was interrupted")
        try:
            if self._cancel.is_set():
                raise Cancelled
            self.stage = "loading"
            lm = self.load()
            self.plan = planned_forwards(lm.n_layers, len(self.positive), len(self.negative),
                                         self.config, self.positive[0].completion is not None)
            self.stage = "activations"
            handles = self._watch(lm)
            try:
                pack = extract_concept(lm, self.positive, self.negative, self.name,
                                       self.config, sources=self.sources)
            finally:
                for h in handles:
                    h.remove()
            self.pack = pack
            outcome = ("succeeded", None)
        except Cancelled:
            outcome = ("cancelled", None)
        except Exception as exc:  # reported by the job's status; the traceback to the log
            log.exception("extraction job %s failed", self.id)
            outcome = ("failed", f"{type(exc).__name__}: {exc}")
        finally:
            lm = None
            gc.collect()  # the model copy's modules and hooks form cycles: free it now
            self.finished = time.time()
            self.stage, (self.status, self.error) = "done", outcome
            self._done.set()
            if self.on_done is not None:
                try:
                    self.on_done(self)
                except Exception:  # the job's result stands; the log says what failed
                    log.exception("extraction job %s: on_done failed", self.id)

    def _watch(self, lm: LoadedModel) -> list:
        began: list[float] = []

        def before(module, args, kwargs):
            if self._cancel.is_set():
                raise Cancelled
            began.append(time.perf_counter())

        def after(module, args, kwargs, output):
            spent = time.perf_counter() - began.pop()
            self._forward_time += spent
            self.forwards += 1
            assert self.plan is not None
            if self.forwards >= self.plan.total:
                self.stage = "inlp"  # the forwards are over: INLP and the pack's record
            else:
                self.stage = self.plan.stage(self.forwards)
            pause = spent * (1.0 / self.share - 1.0)
            if pause > 0 and not self._cancel.wait(pause):
                self._slept += pause

        return [lm.model.register_forward_pre_hook(before, with_kwargs=True),
                lm.model.register_forward_hook(after, with_kwargs=True)]


def _lower_priority(nice: int) -> None:
    """This thread's niceness to `nice` (Linux applies it per thread; threads it starts, such as
    its OpenMP workers, inherit it)."""
    if nice <= 0 or not hasattr(os, "setpriority"):
        return
    try:
        tid = threading.get_native_id()
        if os.getpriority(os.PRIO_PROCESS, tid) < nice:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
    except OSError as exc:  # not permitted: run at the old priority
        log.warning("could not lower the extraction thread's priority: %s", exc)
