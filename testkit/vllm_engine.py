"""vLLM's offline engine on the embedded model, with or without the steering plugin (tests, bench).

Each engine is a few processes (front end, engine core, worker) holding the model: start one at a
time, and stop it before the next (`engine(...)` is a context manager). vLLM reads the plugin
selection and the pack paths from the environment when it spawns its processes, so `engine` sets
them for the start only.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from steering.interventions.hooks import hooks_of
from steering.interventions.methods import Steering, compose
from steering.vllm import packs as vllm_packs
from steering.vllm import wire

KV_GB = "1"  # VLLM_CPU_KVCACHE_SPACE: KV cache size in GiB (CPU build)


@contextmanager
def _environ(values: Mapping[str, str | None]) -> Iterator[None]:
    def put(settings: Mapping[str, str | None]) -> None:  # None: unset
        for k, v in settings.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    old = {k: os.environ.get(k) for k in values}
    try:
        put(values)
        yield
    finally:
        put(old)


@contextmanager
def engine(model: str, *, plugin: bool = True, pack_paths: Mapping[str, str] | None = None,
           dtype: str = "float32", enforce_eager: bool = True, max_num_seqs: int = 32,
           max_model_len: int = 1024, environ: Mapping[str, str] | None = None,
           **kwargs: Any) -> Iterator[Any]:
    """An `LLM` on `model` (a checkpoint folder); `plugin=False` leaves the plugin out;
    `environ`: more variables for vLLM's processes."""
    from vllm import LLM

    env: dict[str, str | None] = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get(
        "VLLM_CPU_KVCACHE_SPACE", KV_GB)}
    # A step on a loaded shared machine can outlast vLLM's 300 s step timeout.
    env["VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS"] = os.environ.get(
        "VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "3600")
    env["VLLM_PLUGINS"] = None if plugin else ""
    env.update(vllm_packs.environment(pack_paths or {}) if pack_paths else
               {vllm_packs.ENV: None})
    env.update(environ or {})
    with _environ(env):
        llm = LLM(model=model, dtype=dtype, enforce_eager=enforce_eager, seed=0,
                  max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                  max_num_batched_tokens=max(max_model_len, 1024), **kwargs)
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def cpu_binding(ranks: int) -> str:
    """`VLLM_CPU_OMP_THREADS_BIND` for `ranks` CPU workers: this process's CPUs split into
    `ranks` contiguous groups ("0|1" on two CPUs). vLLM's automatic binding wants one NUMA node
    per rank; a small VM has one node."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < ranks:
        raise RuntimeError(f"{ranks} CPU workers need {ranks} CPUs; this process may use "
                           f"{len(cpus)}")
    size = len(cpus) // ranks
    groups = [cpus[i * size:(i + 1) * size] for i in range(ranks)]
    return "|".join(",".join(str(c) for c in g) for g in groups)


def greedy(llm: Any, prompts: Sequence[Sequence[int]],
           rows: Sequence[Steering | None] | None = None, max_tokens: int = 32,
           ignore_eos: bool = False, logprobs: int | None = None, **sampling: Any) -> list[Any]:
    """Greedy completions of token-id prompts, prompt i steered by rows[i]; vLLM's outputs
    (`sampling`: more `SamplingParams` fields, e.g. `logprob_token_ids`)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    rows = list(rows) if rows is not None else [None] * len(prompts)
    inputs, params = [], []
    for ids, row in zip(prompts, rows):
        prompt = TokensPrompt(prompt_token_ids=list(ids))
        salt = wire.cache_salt(row)
        if salt is not None:
            prompt["cache_salt"] = salt
        inputs.append(prompt)
        params.append(SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                     ignore_eos=ignore_eos, logprobs=logprobs,
                                     extra_args=wire.extra_args(row) or None, **sampling))
    outs = llm.generate(inputs, params, use_tqdm=False)
    return [o.outputs[0] for o in outs]


def tokens(llm: Any, prompts: Sequence[Sequence[int]],
           rows: Sequence[Steering | None] | None = None, max_tokens: int = 32) -> list[list[int]]:
    return [list(o.token_ids) for o in greedy(llm, prompts, rows, max_tokens)]


def tokens_and_scores(llm: Any, prompts: Sequence[Sequence[int]],
                      rows: Sequence[Steering | None] | None, max_tokens: int,
                      token_ids: Sequence[int]) -> tuple[list[list[int]], list[float]]:
    """Greedy completions and, from the same requests, the refusal score (log-odds of the
    refusal tokens, `steering.evaluation.refusal`) at the first answer position: vLLM's
    log-probabilities of exactly those tokens (`logprob_token_ids`: the raw log-softmax of the
    logits, no top-k cut) at the first generated step."""
    from steering.evaluation.refusal import refusal_score_from_logprobs

    outs = greedy(llm, prompts, rows, max_tokens, logprob_token_ids=list(token_ids))
    scores = [refusal_score_from_logprobs({t: o.logprobs[0][t].logprob for t in token_ids},
                                          list(token_ids))[0] for o in outs]
    return [list(o.token_ids) for o in outs], scores


def chat_ids(tokenizer: Any, prompt: str) -> list[int]:
    """The prompt's token ids under the model's chat template (as the native engine sends it)."""
    from steering.models.chat import format_chat

    return tokenizer(format_chat(tokenizer, prompt), add_special_tokens=False)["input_ids"]


def until_eos(ids: Sequence[int], eos: set[int]) -> list[int]:
    """ids up to and including the first end-of-sequence token."""
    out = []
    for t in ids:
        out.append(int(t))
        if t in eos:
            break
    return out


def native_tokens_and_scores(lm: Any, prompts: Sequence[Sequence[int]],
                             rows: Sequence[Steering | None] | None, max_tokens: int,
                             token_ids: Sequence[int], batch_size: int = 20
                             ) -> tuple[list[list[int]], list[float]]:
    """The same greedy completions from the library's own path (transformers' `generate` with
    `SteeringHooks`, as `steering.interventions.generate` runs it), ended at the first EOS, and
    the refusal score of the first answer position (`refusal_score` on the
    logits of the first generated step, which are the prompt's last position's)."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    from steering.evaluation.refusal import refusal_score

    class FirstStepScore(LogitsProcessor):
        def __init__(self) -> None:
            self.scores: list[float] | None = None

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            if self.scores is None:
                self.scores = refusal_score(scores, list(token_ids)).tolist()
            return scores

    rows = list(rows) if rows is not None else [None] * len(prompts)
    eos = eos_ids(lm.model.generation_config)
    pad = lm.tokenizer.pad_token_id
    out: list[list[int]] = []
    scores: list[float] = []
    for s in range(0, len(prompts), batch_size):
        chunk = [list(p) for p in prompts[s:s + batch_size]]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        batch_rows = rows[s:s + len(chunk)]
        steered = any(r is not None for r in batch_rows)
        first = FirstStepScore()
        hooks_of(lm).set_rows([r if r is not None else compose([]) for r in batch_rows]
                              if steered else None, [len(p) for p in chunk])
        try:
            with torch.inference_mode():
                gen = lm.model.generate(
                    input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device),
                    max_new_tokens=max_tokens, do_sample=False, pad_token_id=pad,
                    logits_processor=LogitsProcessorList([first]))
        finally:
            hooks_of(lm).set_rows(None)
        out.extend(until_eos(g[width:].tolist(), eos) for g in gen)
        scores.extend(first.scores or [])
    return out, scores


def eos_ids(generation_config: Any) -> set[int]:
    eos = generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos])
