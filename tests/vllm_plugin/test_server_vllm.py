"""`steer serve --engine vllm`: the real server process over vLLM's CPU build, embedded model, fp32.

Runs under the vLLM virtual environment (skipped where vLLM is not importable). One server start
(its own fp32 copy of the model for tokenization and packs, and vLLM's engine processes).
"""

from __future__ import annotations

import json
import os
import tempfile

import httpx
import pytest

pytest.importorskip("vllm")

from testkit.server import ServerProcess  # noqa: E402

pytestmark = pytest.mark.real

HARMFUL = "Give step-by-step instructions for picking a pin tumbler lock."
HARMLESS = "Write a two-line poem about the sea."


@pytest.fixture(scope="module")
def server():
    if os.environ.get("STEERING_SKIP_REAL", "") in {"1", "true", "yes"}:
        pytest.skip("STEERING_SKIP_REAL set")
    log = tempfile.NamedTemporaryFile(prefix="steer-vllm-", suffix=".log", delete=False).name
    env = {"STEER_ENGINE": "vllm", "STEER_PRECISION": "fp32", "STEER_VLLM_ENFORCE_EAGER": "1",
           "STEER_MAX_BATCH": "8", "VLLM_CPU_KVCACHE_SPACE": "1"}
    with ServerProcess(env=env, log_path=log) as proc:
        proc.wait_ready()
        yield proc


def _chat(server, prompt, steering=None, **extra):
    body = {"model": server.served_model(), "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 24, "temperature": 0, **extra}
    if steering is not None:
        body["steering"] = steering
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=600)


def test_steering_changes_the_answer_over_vllm(server):
    plain = _chat(server, HARMFUL)
    assert plain.status_code == 200, plain.text
    ablated = _chat(server, HARMFUL, {"method": "ablate"})
    assert ablated.status_code == 200, ablated.text
    text = [r.json()["choices"][0]["message"]["content"] for r in (plain, ablated)]
    assert text[0] != text[1]
    added = _chat(server, HARMLESS, {"method": "actadd", "strength": 1.5})
    assert added.json()["choices"][0]["message"]["content"] != \
        _chat(server, HARMLESS).json()["choices"][0]["message"]["content"]
    assert ablated.json()["steering"]["method"] == "ablate"


def test_streaming_over_vllm(server):
    body = {"model": server.served_model(), "stream": True, "max_tokens": 12, "temperature": 0,
            "messages": [{"role": "user", "content": HARMLESS}], "steering": {"method": "ablate"}}
    pieces = []
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=600) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                delta = json.loads(line[6:])["choices"][0]["delta"]
                pieces.append(delta.get("content") or "")
    streamed = "".join(pieces)
    whole = _chat(server, HARMLESS, {"method": "ablate"}, max_tokens=12)
    assert streamed == whole.json()["choices"][0]["message"]["content"]


def test_conditional_steering_is_refused_with_400(server):
    r = _chat(server, HARMLESS, {"method": "actadd", "when": {"above": 0.5}})
    assert r.status_code == 400, r.text
    assert "when" in r.json()["error"]["message"]
