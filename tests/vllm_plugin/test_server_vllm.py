"""`steer serve --engine vllm`: the real server process over vLLM's CPU build, embedded model, fp32.

Runs under the vLLM virtual environment (skipped where vLLM is not importable). One server start
(its own fp32 copy of the model for tokenization and packs, and vLLM's engine processes).

What holds, and is asserted: steering changes answers (plain and streamed alike); concurrent
requests with different steering (methods, a list, token targeting, none) share vLLM's batch and
each equals its solo answer; `generation_window` leaves the first tokens unsteered; conditions
(`when`) decide per prompt as on the native engine; bad steering is a 400 naming the field.
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


def _text(response):
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def _tokens(response):
    assert response.status_code == 200, response.text
    return [t["token"] for t in response.json()["choices"][0]["logprobs"]["content"]]


MIXED = [  # one batch: each request its own steering (prompt, steering)
    (HARMFUL, None),
    (HARMFUL, {"method": "ablate"}),
    (HARMLESS, {"method": "actadd", "strength": 1.5}),
    (HARMLESS, [{"method": "ablate"}, {"method": "actadd", "strength": 1.0,
                                       "generation_window": [2, None]}]),
    (HARMFUL, {"method": "inlp_flip", "k": 2}),
    (HARMLESS, {"method": "actadd", "apply_to": "prompt"}),
    (HARMLESS, None),
]


def test_per_request_steering_in_one_batch_equals_solo(server):
    """Seven concurrent requests, each with its own steering (none, methods, a list, token
    targeting), run in vLLM's batch; each answer equals the same request sent alone."""
    from concurrent.futures import ThreadPoolExecutor

    def ask(job):
        return _text(_chat(server, job[0], job[1], max_tokens=16))

    with ThreadPoolExecutor(len(MIXED)) as pool:
        together = list(pool.map(ask, MIXED))
    alone = [ask(job) for job in MIXED]
    assert together == alone
    assert together[0] != together[1]  # ablation changed the harmful answer
    assert together[2] != together[6]  # actadd changed the harmless answer


def test_list_and_token_targeting_over_vllm(server):
    kw = {"max_tokens": 16, "logprobs": True}
    plain = _tokens(_chat(server, HARMLESS, **kw))
    window = _tokens(_chat(server, HARMLESS, {"method": "actadd", "strength": 1.5,
                                              "generation_window": [3, None]}, **kw))
    assert window[:3] == plain[:3] and window != plain  # steered from generated token 3 on
    # Prompt-only steering edits the prompt's KV: the answer's first log-probability moves
    # (the greedy poem itself may not change).
    first = [_chat(server, HARMLESS, s, **kw).json()["choices"][0]["logprobs"]["content"][0]
             ["logprob"] for s in (None, {"method": "actadd", "strength": 1.5,
                                           "apply_to": "prompt"})]
    assert abs(first[0] - first[1]) > 1e-4, first
    ablate = _tokens(_chat(server, HARMLESS, {"method": "ablate"}, **kw))
    both = _chat(server, HARMLESS, [{"method": "ablate"}, {"method": "actadd", "strength": 1.5}],
                 **kw)
    assert _tokens(both) != ablate  # the list's second part acts on top of the first
    assert [s["method"] for s in both.json()["steering"]] == ["ablate", "actadd"]


def test_conditions_decide_per_prompt_over_vllm(server):
    """`when` over vLLM: decided on each prompt's unsteered residual before vLLM runs it
    (server/engine/vllm_engine.py). The response reports the score; a condition that holds
    answers as the unconditional object, one that does not as the unsteered model — as on the
    native engine (tests/real/test_controls_real.py)."""
    kw = {"max_tokens": 16}
    applied = []
    for prompt in (HARMFUL, HARMLESS):
        r = _chat(server, prompt, {"method": "actadd", "strength": 1.5, "when": {"above": 0.5}},
                  **kw)
        c = r.json()["steering"]["condition"]
        assert c["applied"] == (c["score"] > 0.5)
        want = {"method": "actadd", "strength": 1.5} if c["applied"] else None
        assert _text(r) == _text(_chat(server, prompt, want, **kw)), c
        applied.append(c["applied"])
    assert applied == [True, False], applied  # the refusal axis tells the two prompts apart
    both = _chat(server, HARMLESS, [{"method": "ablate"},
                                    {"method": "actadd", "strength": 1.5, "when": {"below": 0.5}}],
                 **kw)
    assert both.json()["steering"][1]["condition"]["applied"]
    assert _text(both) == _text(_chat(server, HARMLESS, [{"method": "ablate"},
                                                         {"method": "actadd", "strength": 1.5}],
                                      **kw))


def test_invalid_steering_is_a_400_over_vllm(server):
    r = _chat(server, HARMLESS, {"method": "actadd", "layers": [99]})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].startswith("steering")
