"""The real server process on the embedded model: concurrent clients with different methods each
get exactly their solo greedy output; SIGTERM drains a running request, then the process exits."""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytestmark = pytest.mark.real

VARIANTS = [
    ("none", {}),
    ("ablate", {"method": "ablate"}),
    ("inlp_flip", {"method": "inlp_flip", "k": 2}),
    ("actadd", {"method": "actadd", "strength": 1.0}),
    ("ace", {"method": "ace", "strength": 0.0}),
]
PROMPTS = ["Name three prime numbers.", "What is a linked list?", "Say hello in French.",
           "Give me a synonym for quick.", "What colour is the sky?"]


@pytest.fixture(scope="module", params=["fp32", "int8", "int8-untuned"])
def server(request):
    """The real server at fp32 and at the CPU's default precision, int8 (isolation must hold at
    both: at int8 a last-bit difference can flip a rounding step and change the answer). At int8
    the thread tuner is on by default (`STEER_TUNE_THREADS`: the first decode steps run at 1
    thread, the next at 2, then at the faster), so solo and batched steps run at other thread
    counts; `int8-untuned` is the same server without it."""
    if request.param == "fp32":
        yield request.getfixturevalue("real_server")
        return
    from tests.conftest import serve_real

    env = {"STEER_DEVICE": "cpu", "STEER_PRECISION": "int8"}
    if request.param == "int8-untuned":
        env["STEER_TUNE_THREADS"] = "0"
    with serve_real(env) as proc:
        yield proc


_MODEL: dict[str, str] = {}


def _ask(url: str, prompt: str, steering: dict, max_tokens: int = 12) -> dict:
    if url not in _MODEL:
        _MODEL[url] = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
    body = {"model": _MODEL[url], "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "temperature": 0}
    if steering:
        body["steering"] = steering
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=900)
    assert r.status_code == 200, r.text
    return r.json()


def test_concurrent_mixed_methods_equal_solo_runs(server):
    solo = [_ask(server.url, p, s)["choices"][0]["message"]["content"]
            for p, (_, s) in zip(PROMPTS, VARIANTS, strict=True)]
    with ThreadPoolExecutor(len(VARIANTS)) as pool:  # all at once: they share decode steps
        results = list(pool.map(
            lambda i: _ask(server.url, PROMPTS[i], VARIANTS[i][1])["choices"][0]["message"][
                "content"], range(len(VARIANTS))))
    for (name, _), alone, together in zip(VARIANTS, solo, results, strict=True):
        assert together == alone, name


def test_sigterm_drains_the_running_request_then_exits(server):
    outcome: dict = {}

    def long_request() -> None:
        outcome["reply"] = _ask(server.url, PROMPTS[0], {}, max_tokens=24)

    t = threading.Thread(target=long_request)
    t.start()
    time.sleep(2.0)  # let it get admitted
    server.proc.send_signal(signal.SIGTERM)
    # While draining, readiness is 503 and new completions are refused with 503.
    deadline = time.monotonic() + 30
    ready_status = None
    while time.monotonic() < deadline and server.proc.poll() is None:
        try:
            ready_status = httpx.get(f"{server.url}/readyz", timeout=5).status_code
            if ready_status == 503:
                break
        except httpx.HTTPError:
            break
        time.sleep(0.2)
    t.join(timeout=900)
    assert outcome["reply"]["choices"][0]["finish_reason"] in {"length", "stop"}
    assert outcome["reply"]["usage"]["completion_tokens"] > 0
    # uvicorn re-raises the captured SIGTERM once shut down: "terminated by SIGTERM" is the
    # clean exit here, as is 0.
    assert server.proc.wait(timeout=120) in (0, -signal.SIGTERM)
    assert ready_status in (503, None)
