"""lm-evaluation-harness end to end against the real server (issue 31, item 2): its
`local-chat-completions` model runs the repository's task `steer_refusal_harmful_val`
(tasks/lm_eval) on a few prompts, steering chosen by the model name alone (`<id>`, `<id>+ablate`).

Each of the harness's responses must be exactly what the server answers to the same prompt sent
directly (greedy, 16 tokens), its per-sample metric must be the project's substring matcher on
that answer, and the task's refusal rate their mean — so the harness, the task and the steering
by name are each checked, not only that lm_eval exits 0. lm-eval gets its own virtual environment
(installed on first use from the package index; testkit/venvs.py)."""

from __future__ import annotations

import httpx
import pytest

from steering.evaluation.refusal import is_refusal

pytestmark = [pytest.mark.real, pytest.mark.clients]

N_ITEMS = 3


@pytest.fixture(scope="module")
def lm_eval_bin(outside_clients):
    from bench.lm_eval_refusal import lm_eval_venv

    bin_dir, _ = lm_eval_venv()
    return bin_dir


def _direct(url: str, model: str, prompt: str) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 16, "temperature": 0}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_lm_eval_runs_the_refusal_task_through_model_names(real_server, lm_eval_bin, tmp_path):
    from bench.lm_eval_refusal import run_lm_eval

    base = real_server.served_model()
    runs = {}
    for name in (base, f"{base}+ablate"):
        out = run_lm_eval(lm_eval_bin, real_server.url, name, tmp_path / name.replace("+", "_"),
                          limit=N_ITEMS, concurrent=1)
        assert out["n"] == N_ITEMS
        for s in out["samples"]:
            assert s["response"] == _direct(real_server.url, name, s["prompt"])
            assert s["refused"] == is_refusal(s["response"])
        assert out["rate"] == pytest.approx(sum(s["refused"] for s in out["samples"]) / N_ITEMS)
        runs[name] = out
    # The preset in the model name took effect: the ablated answers are not the base answers.
    plain = [s["response"] for s in runs[base]["samples"]]
    ablated = [s["response"] for s in runs[f"{base}+ablate"]["samples"]]
    assert plain != ablated
