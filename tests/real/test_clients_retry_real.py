"""The `openai` SDK's async client and its own retry logic against the real server (issue 31,
item 4): 429 when the engine's queue is full, 503 while the server drains on SIGTERM.

What is checked, from both ends:
- the SDK retries and every logical request succeeds once;
- the server's `Retry-After` is honoured: the SDK's next attempt of a request comes at least that
  many seconds after the refusal (its own backoff would wait 0.4–1 s on a first retry);
- nothing is counted twice: the key's rate limit is charged once per admitted request (a key
  allowed exactly as many requests per minute as the test sends never meets its own limit), the
  Prometheus counters hold one completion per logical request and their token sums equal the
  responses' usage, and the audit log has one successful line per request.

Attempts are told apart by the `X-Request-ID` the test sets per logical request (the SDK sends
the same headers on every retry) and the SDK's own `x-stainless-retry-count` header.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from testkit.server import metric

pytestmark = pytest.mark.real

RETRY_AFTER_S = 2  # the server's Retry-After; the SDK's own first backoff is 0.375-0.5 s
KEY = "retry-test-key"
# The embedded model at the CPU's default precision; no concept packs (not used here).
BASE_ENV = {"STEER_DEVICE": "cpu", "STEER_RETRY_AFTER_S": str(RETRY_AFTER_S),
            "STEER_AUTH": "true", "STEER_CONCEPT_PACKS": ""}


@dataclass
class Attempt:
    logical: str
    retry: int
    sent: float
    status: int | None = None
    answered: float | None = None
    retry_after: str | None = None
    code: str | None = None


@dataclass
class AttemptLog:
    """Every HTTP attempt the SDK makes, recorded by httpx event hooks on its own client."""

    attempts: list[Attempt] = field(default_factory=list)

    async def on_request(self, request) -> None:
        request.extensions["attempt"] = a = Attempt(
            request.headers.get("x-request-id", "?"),
            int(request.headers.get("x-stainless-retry-count", "0")), time.monotonic())
        self.attempts.append(a)

    async def on_response(self, response) -> None:
        a = response.request.extensions["attempt"]
        a.status, a.answered = response.status_code, time.monotonic()
        a.retry_after = response.headers.get("retry-after")
        if response.status_code >= 400:
            await response.aread()
            try:
                a.code = response.json()["error"]["code"]
            except (ValueError, KeyError, TypeError):
                a.code = None

    def of(self, logical: str) -> list[Attempt]:
        return sorted((a for a in self.attempts if a.logical == logical), key=lambda a: a.sent)


def served_model(url: str) -> str:
    r = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    return r.json()["data"][0]["id"]


def sdk_client(base_url: str, log: AttemptLog, max_retries: int):
    import openai

    http = openai.DefaultAsyncHttpxClient(
        event_hooks={"request": [log.on_request], "response": [log.on_response]})
    return openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=KEY, max_retries=max_retries,
                              http_client=http, timeout=600)


def check_retry_after_honoured(attempts: list[Attempt]) -> int:
    """Each refused attempt's successor came at least Retry-After later; returns how many
    refusals there were."""
    refused = 0
    for before, after in zip(attempts, attempts[1:]):
        if before.status in (429, 503):
            refused += 1
            assert before.retry_after is not None, "a refusal without Retry-After"
            wait = after.sent - before.answered
            assert wait >= float(before.retry_after) * 0.98, (
                f"{before.logical}: retried {wait:.2f} s after a {before.status} that asked for "
                f"{before.retry_after} s")
    return refused


def keys_doc(requests_per_minute: int) -> str:
    from server.security.auth import hash_key

    return json.dumps({"keys": [{"id": "retry", "sha256": hash_key(KEY), "methods": "*",
                                 "lower_refusal": True,
                                 "requests_per_minute": requests_per_minute}]})


# ---- 429: the queue is full ---------------------------------------------------------------------

N_REQUESTS = 6


@pytest.fixture(scope="module")
def tiny_queue_server(tmp_path_factory):
    """One batch slot and one queue place: of six requests sent at once four are refused."""
    from testkit.server import ServerProcess
    from tests.conftest import real_model_enabled

    if not real_model_enabled():
        pytest.skip("STEERING_SKIP_REAL set")
    work = tmp_path_factory.mktemp("queue")
    env = {**BASE_ENV, "STEER_MAX_BATCH": "1", "STEER_MAX_QUEUE": "1",
           "STEER_KEYS": keys_doc(N_REQUESTS), "STEER_AUDIT_LOG": str(work / "audit.jsonl")}
    with ServerProcess(env=env, log_path=str(work / "server.log")) as proc:
        proc.wait_ready()
        proc.audit_path = work / "audit.jsonl"
        yield proc


def test_async_sdk_retries_queue_full_once_each(tiny_queue_server):
    server = tiny_queue_server
    model = served_model(server.url)
    log = AttemptLog()

    async def one(client, i: int):
        kwargs = dict(model=model if i % 2 else f"{model}+ablate",
                      messages=[{"role": "user", "content": f"Count from 1 to {i + 3}."}],
                      max_tokens=6, temperature=0, extra_headers={"X-Request-ID": f"q{i}"})
        if i % 3 == 0:  # some streamed, usage in the last chunk
            stream = await client.chat.completions.create(
                stream=True, stream_options={"include_usage": True}, **kwargs)
            text, usage = [], None
            async for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage
                text += [c.delta.content or "" for c in chunk.choices]
            return "".join(text), usage
        reply = await client.chat.completions.create(**kwargs)
        return reply.choices[0].message.content, reply.usage

    async def run_all():
        async with sdk_client(server.url, log, max_retries=30) as client:
            return await asyncio.gather(*[one(client, i) for i in range(N_REQUESTS)])

    results = asyncio.run(run_all())

    refusals = 0
    for i in range(N_REQUESTS):
        attempts = log.of(f"q{i}")
        assert attempts[-1].status == 200
        assert all(a.status in (429, 200) for a in attempts), [a.status for a in attempts]
        assert [a.retry for a in attempts] == list(range(len(attempts)))
        assert all(a.code == "queue_full" for a in attempts[:-1])  # never the key's own limit
        refusals += check_retry_after_honoured(attempts)
    assert refusals >= 1, "no request met a full queue: the test did not test retries"

    usage = [u for _, u in results]
    assert all(u is not None and u.completion_tokens > 0 for u in usage)
    url = server.url
    assert metric(url, "steer_requests_total", endpoint="/v1/chat/completions",
                  status="200") == N_REQUESTS
    assert metric(url, "steer_generation_tokens_total") == sum(u.completion_tokens
                                                               for u in usage)
    assert metric(url, "steer_prompt_tokens_total") == sum(u.prompt_tokens for u in usage)
    assert metric(url, "steer_requests_total", status="429") == refusals

    for _ in range(300):  # a completion line is written once its response has been sent
        lines = [json.loads(x) for x in Path(server.audit_path).read_text().splitlines()]
        done = [x for x in lines if x.get("status") == 200]
        if len(done) >= N_REQUESTS:
            break
        time.sleep(0.1)
    assert sorted(x["client_request_id"] for x in done) == [f"q{i}" for i in range(N_REQUESTS)]
    refused = [x for x in lines if x.get("status") == 429]
    assert len(refused) == refusals
    assert all(x["tokens_charged"] == 0 and x["outcome"] == "queue_full" for x in refused)


# ---- 503: draining on SIGTERM, then a new process on the same port ------------------------------


def test_async_sdk_rides_a_drain_and_restart(tmp_path):
    """SIGTERM while one request runs: it finishes (drain); a new request gets 503 with
    Retry-After, the SDK waits, meets the closed port, backs off, and lands on the process
    started in its place, which counts it once."""
    from testkit.server import ServerProcess
    from tests.conftest import real_model_enabled

    if not real_model_enabled():
        pytest.skip("STEERING_SKIP_REAL set")
    env = {**BASE_ENV, "STEER_KEYS": keys_doc(10)}
    first = ServerProcess(env=env, log_path=str(tmp_path / "first.log"))
    second = None
    try:
        first.wait_ready()
        model = served_model(first.url)
        running: dict = {}

        def long_request() -> None:
            body = {"model": model, "messages": [{"role": "user", "content": "Tell a story."}],
                    "max_tokens": 32, "temperature": 0, "ignore_eos": True}
            running["reply"] = httpx.post(f"{first.url}/v1/chat/completions", json=body,
                                          headers={"Authorization": f"Bearer {KEY}"},
                                          timeout=900)

        t = threading.Thread(target=long_request)
        t.start()
        deadline = time.monotonic() + 300
        while metric(first.url, "steer_requests_running") < 1:  # admitted and decoding
            assert time.monotonic() < deadline and t.is_alive()
            time.sleep(0.2)
        first.proc.send_signal(signal.SIGTERM)
        while httpx.get(f"{first.url}/readyz", timeout=10).status_code != 503:
            assert time.monotonic() < deadline
            time.sleep(0.1)

        log = AttemptLog()
        outcome: dict = {}

        async def ask():
            async with sdk_client(first.url, log, max_retries=40) as client:
                outcome["reply"] = await client.chat.completions.create(
                    model=f"{model}+no-refusal", max_tokens=5, temperature=0,
                    messages=[{"role": "user", "content": "Say hi."}],
                    extra_headers={"X-Request-ID": "drained"})

        asker = threading.Thread(target=lambda: asyncio.run(ask()))
        asker.start()
        t.join(timeout=900)
        assert first.proc.wait(timeout=300) in (0, -signal.SIGTERM)
        reply = running["reply"]
        assert reply.status_code == 200, reply.text  # the running request was drained, not cut
        assert reply.json()["usage"]["completion_tokens"] == 32

        second = ServerProcess(env=env, log_path=str(tmp_path / "second.log"),
                               port=first.port)
        second.wait_ready()
        asker.join(timeout=600)
        assert "reply" in outcome, "the SDK gave up before the new process was ready"
        attempts = log.of("drained")
        assert attempts[0].status == 503 and attempts[0].retry_after == str(RETRY_AFTER_S)
        assert attempts[-1].status == 200
        assert check_retry_after_honoured(attempts) >= 1
        # The new process counted the request once; nothing of the old one carried over.
        usage = outcome["reply"].usage
        assert metric(second.url, "steer_requests_total", status="200") == 1
        assert metric(second.url, "steer_generation_tokens_total") == usage.completion_tokens
    finally:
        first.stop()
        if second is not None:
            second.stop()
