"""Issue 28 item 1 on a real `steer serve` process (the embedded model): the reported stall — a
300 KB `layers` list from a key allowed only `none` at one request a minute — is refused by the
schema, a valid-sized one by the policy (and charged), and /healthz answers throughout."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from server.security.auth import hash_key
from tests.conftest import serve_real

pytestmark = pytest.mark.real

HELLO = [{"role": "user", "content": "Say hi."}]
KEYS = {"keys": [{"id": "low", "sha256": hash_key("k-low"), "methods": ["none"],
                  "requests_per_minute": 1}]}
AUTH = {"Authorization": "Bearer k-low"}


class HealthPoller(threading.Thread):
    """Polls /healthz back to back; records (finished at, status) per answer."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.answers, self.stop = url, [], threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=60) as c:
            while not self.stop.is_set():
                status = c.get(self.url + "/healthz").status_code
                self.answers.append((time.monotonic(), status))


def test_the_layers_stall_is_refused_and_healthz_answers(tmp_path):
    audit = tmp_path / "audit.jsonl"
    env = {"STEER_DEVICE": "cpu", "STEER_DTYPE": "float32", "STEER_KEYS": json.dumps(KEYS),
           "STEER_AUDIT_LOG": str(audit)}
    with serve_real(env) as server:
        model = httpx.get(server.url + "/v1/models", headers=AUTH).json()["data"][0]["id"]
        url = server.url + "/v1/chat/completions"
        stall = {"model": model, "messages": HELLO, "max_tokens": 1,
                 "steering": {"method": "ace", "layers": [3] * 100_000}}
        body = json.dumps(stall).encode()
        assert len(body) > 290_000
        poller = HealthPoller(server.url)
        poller.start()
        with httpx.Client(timeout=120) as c:
            while not poller.answers:  # the poller is running
                time.sleep(0.01)
            first = time.monotonic()
            refusals = [c.post(url, content=body, headers={**AUTH, "Content-Type":
                                                           "application/json"})
                        for _ in range(10)]
            last = time.monotonic()
            methods = c.get(server.url + "/v1/steering/methods", headers=AUTH).json()["data"]
            ace = next(m for m in methods if m["id"] == "ace")
            every = ace["packs"]["refusal"]["allowed_layers"]  # each layer of the model once
            denied = c.post(url, headers=AUTH, json={
                **stall, "steering": {"method": "ace", "layers": every}})
            charged = c.post(url, headers=AUTH, json={**stall, "steering": None})
        poller.stop.set()
        poller.join()

    for r in refusals:  # refused by the schema: the list is past its bound
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert (err["param"], err["code"]) == ("steering.layers", "too_many_items")
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "policy_methods"
    # the denied request was charged: the key's one request a minute is spent
    assert charged.status_code == 429
    assert charged.json()["error"]["code"] == "rate_limit_requests"
    # /healthz answered, and answered while the burst of refused requests was in flight
    assert poller.answers and all(status == 200 for _, status in poller.answers)
    assert any(first < at < last for at, _ in poller.answers)
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    denial = [x for x in lines if x.get("denied") == "policy_methods"]
    # written when the policy decided, and again once the 403 was sent
    assert [x["event"] for x in denial] == ["admission", "steered_request"]
    assert all(x["key_id"] == "low" and x["status"] == 403 for x in denial)
