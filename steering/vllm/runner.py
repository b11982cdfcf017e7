"""The model-runner hook: before each forward, the step's plan from the scheduled requests.

vLLM's V1 model runner (`GPUModelRunner`, which the CPU runner subclasses) prepares a step's
inputs, then calls `_model_forward` once with the flat token batch (dummy and warm-up runs call
the model directly, so they never see a plan). The wrapper installed here, in memory, reads what
the runner already holds on the host for that step — the input batch's request order, the
`query_start_loc` offsets of each request's tokens and each request's computed-token count and
prompt length — and each scheduled request's `SamplingParams.extra_args`, builds the plan
(`steering.vllm.plan`), sets it for the ops for the duration of the forward and clears it after.
Nothing here reads a device tensor, so it adds no synchronisation.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from steering.vllm import wire
from steering.vllm.ops import CURRENT
from steering.vllm.packs import PackResolver
from steering.vllm.plan import Planner, Scheduled, StepPlan

log = logging.getLogger(__name__)


class RunnerSteering:
    """Per model runner: the worker's pack resolver and its planner."""

    def __init__(self, runner: Any):
        config = runner.model_config
        text = config.hf_text_config
        self.d_model = int(config.get_hidden_size())
        self.n_layers = int(text.num_hidden_layers)
        self.resolver = PackResolver(d_model=self.d_model, n_layers=self.n_layers)
        self.planner = Planner(runner.device, self.d_model)

    def step_plan(self, runner: Any) -> StepPlan | None:
        batch = runner.input_batch
        n = batch.num_reqs
        starts = runner.query_start_loc.np
        computed = batch.num_computed_tokens_cpu
        rows: list[Scheduled] = []
        for i, req_id in enumerate(batch.req_ids[:n]):
            state = runner.requests.get(req_id)
            params = state.sampling_params if state is not None else None
            extra = params.extra_args if params is not None else None
            if not extra or wire.KEY not in extra:
                continue
            start, end = int(starts[i]), int(starts[i + 1])
            if end <= start:
                continue
            steering = self.resolver.resolve(extra[wire.KEY])
            # token index of a position p: p − (prompt length − 1) (kernel.py)
            first = int(computed[i]) - (state.num_prompt_tokens - 1)
            rows.append(Scheduled(steering, start, end - start, first))
        return self.planner.plan(rows)


def install() -> bool:
    """Wrap `GPUModelRunner._model_forward` once per process; False if already wrapped."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._model_forward
    if getattr(original, "__steering__", False):
        return False

    @functools.wraps(original)
    def _model_forward(self, *args, **kwargs):
        steering = self.__dict__.get("_steering")
        if steering is None:
            steering = self.__dict__["_steering"] = RunnerSteering(self)
        CURRENT.plan = steering.step_plan(self)
        try:
            return original(self, *args, **kwargs)
        finally:
            CURRENT.plan = None

    _model_forward.__steering__ = True
    GPUModelRunner._model_forward = _model_forward
    return True
