"""Issue 28 item 1 on the tiny model: a request is bounded by its schema, checked, and admitted
(policy, rate limits charged) before any steering tensor is built or any prompt tokenized, and the
steering is built off the event loop."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
from fastapi.testclient import TestClient

from server.api import prepare, resolve
from server.app import create_app
from server.security.auth import hash_key
from server.settings import Settings
from testkit.live import asgi_client
from testkit.spy import Counter
from testkit.tiny import HELLO, MODEL

KEYS = {"keys": [
    {"id": "low", "sha256": hash_key("k-low"), "methods": ["none"], "requests_per_minute": 1},
    {"id": "wide", "sha256": hash_key("k-wide"), "methods": "*", "lower_refusal": True},
]}


def _auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def _app(tiny_lm, tiny_pack, **settings):
    return create_app(Settings(keys=json.dumps(KEYS), **settings), lm=tiny_lm,
                      packs=[tiny_pack])



def count(monkeypatch) -> tuple[Counter, Counter]:
    """From now on, every steering row built and every chat prompt templated, counted (after
    start-up, which builds the presets' rows to check them)."""
    built, rendered = Counter(resolve.build_row), Counter(prepare.render_chat)
    monkeypatch.setattr(resolve, "build_row", built)
    monkeypatch.setattr(prepare, "render_chat", rendered)
    return built, rendered


def _chat(client, key, **body):
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 2, "temperature": 0, **body}
    return client.post("/v1/chat/completions", json=body, headers=_auth(key))


def test_policy_refuses_before_building_and_charges_the_key(tiny_lm, tiny_pack, monkeypatch):
    """The issue's stall: `ace` on every layer from a key allowed only `none` at 1 request a
    minute. It is refused by policy with nothing built or tokenized, and it is charged."""
    layers = list(range(tiny_pack.n_layers))
    with TestClient(_app(tiny_lm, tiny_pack), raise_server_exceptions=False) as c:
        built, rendered = count(monkeypatch)
        r = _chat(c, "k-low", steering={"method": "ace", "layers": layers})
        assert r.status_code == 403 and r.json()["error"]["code"] == "policy_methods", r.text
        assert (built.calls, rendered.calls) == (0, 0)
        r = _chat(c, "k-low")  # the refused request used the key's one request this minute
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_requests"
        assert (built.calls, rendered.calls) == (0, 0)
        r = _chat(c, "k-wide", steering={"method": "ace", "layers": layers})
        assert r.status_code == 200, r.text
        assert (built.calls, rendered.calls) == (1, 1)


@pytest.mark.parametrize("steering,param", [
    ({"method": "ace", "layers": [3] * 60_000}, "steering.layers"),
    ({"method": "ace", "layers": [0, 0]}, "steering.layers"),
    ({"method": "ace", "layers": [10_000]}, "steering.layers"),
    ([{"method": "actadd"}] * 9, "steering"),
])
def test_oversized_steering_is_refused_before_building(tiny_lm, tiny_pack, monkeypatch,
                                                       steering, param):
    with TestClient(_app(tiny_lm, tiny_pack, max_body_bytes=1 << 20),
                    raise_server_exceptions=False) as c:
        built, rendered = count(monkeypatch)
        r = _chat(c, "k-wide", steering=steering)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param
        assert (built.calls, rendered.calls) == (0, 0)


@pytest.mark.parametrize("body,param,code", [
    ({"variants": [{"method": "none"}] * 47_000}, "variants", "too_many_items"),
    ({"variants": [{}], "stop": ["x"] * 5_000}, "stop", "too_many_items"),
    ({"variants": [{}], "stop": ["x" * 5_000]}, "stop[0]", "stop_too_long"),
    ({"variants": [[{"method": "actadd", "layers": [0] * 300}]]}, "variants[0][0].layers",
     "too_many_items"),
])
def test_every_list_of_a_compare_is_bounded(tiny_lm, tiny_pack, monkeypatch, body, param,
                                            code):
    with TestClient(_app(tiny_lm, tiny_pack, max_body_bytes=1 << 20),
                    raise_server_exceptions=False) as c:
        built, rendered = count(monkeypatch)
        r = c.post("/v1/steering/compare", headers=_auth("k-wide"),
                   json={"model": MODEL, "prompt": "hi", "max_tokens": 2, **body})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert (err["param"], err["code"]) == (param, code), err
        assert (built.calls, rendered.calls) == (0, 0)


def test_compare_variants_are_admitted_before_anything_is_built(tiny_lm, tiny_pack,
                                                                monkeypatch):
    with TestClient(_app(tiny_lm, tiny_pack), raise_server_exceptions=False) as c:
        built, rendered = count(monkeypatch)
        r = c.post("/v1/steering/compare", headers=_auth("k-low"),
                   json={"model": MODEL, "prompt": "hi", "max_tokens": 2,
                         "variants": [{"method": "none"}, {"method": "ablate"}]})
        assert r.status_code == 403 and r.json()["error"]["code"] == "policy_methods"
        assert (built.calls, rendered.calls) == (0, 0)


def test_steering_is_built_off_the_event_loop(tiny_lm, tiny_pack, monkeypatch):
    """While one request's steering is being built, the event loop answers /healthz: the build
    runs in a worker thread. (Were it on the loop, /healthz could answer only after the build
    gave up waiting, and the order checked below would be reversed.)"""
    started, release = threading.Event(), threading.Event()
    order: list[str] = []
    real = resolve.build_row

    def blocking(*args, **kwargs):
        started.set()
        release.wait(30)  # a guard against a hang only; the test never waits this long
        order.append("built")
        return real(*args, **kwargs)

    app = _app(tiny_lm, tiny_pack)

    async def main():
        patch = lambda: monkeypatch.setattr(resolve, "build_row", blocking)  # noqa: E731
        async with asgi_client(app, after_start=patch) as c:  # after start-up's presets
            task = asyncio.create_task(c.post(
                "/v1/chat/completions", headers=_auth("k-wide"),
                json={"model": MODEL, "messages": HELLO, "max_tokens": 2,
                      "steering": {"method": "ace"}}))
            while not started.is_set():
                await asyncio.sleep(0.005)
            health = await c.get("/healthz")
            order.append(f"healthz {health.status_code}")
            release.set()
            return await task

    r = asyncio.run(main())
    assert r.status_code == 200, r.text
    assert order == ["healthz 200", "built"]
