"""Issue 12, second security pass on the tiny model: deny-by-default routes under a root path (6),
authentication before the body and a linear JSON walk (2), audit lines for every refused request
and the client's request id (8), capped log fields (10), drain expiry and liveness (12)."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import tracemalloc

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.errors import APIError
from server.security import hardening
from server.security.auth import hash_key
from server.settings import Settings
from testkit.live import asgi_client
from testkit.tiny import HELLO, MODEL

KEYS = {"keys": [{"id": "basic", "sha256": hash_key("k-basic")}]}
AUTH = {"Authorization": "Bearer k-basic"}


def _app(tiny_lm, tiny_pack, **settings):
    return create_app(Settings(keys=json.dumps(KEYS), **settings), lm=tiny_lm,
                      packs=[tiny_pack])


@pytest.fixture(scope="module")
def client(tiny_lm, tiny_pack):
    with TestClient(_app(tiny_lm, tiny_pack), raise_server_exceptions=False) as c:
        yield c


# ---- 6: deny by default, matched on the route -------------------------------------------------


@pytest.mark.parametrize("root", ["/api", "/deep/mount"])
def test_root_path_does_not_bypass_auth(tiny_lm, tiny_pack, root):
    app = _app(tiny_lm, tiny_pack)
    with TestClient(app, root_path=root, raise_server_exceptions=False) as c:
        for method, path in (("GET", "/v1/models"), ("GET", "/v1/steering/packs"),
                             ("POST", "/v1/chat/completions")):
            r = c.request(method, f"{root}{path}", json={"model": MODEL, "messages": HELLO,
                                                         "max_tokens": 1})
            assert r.status_code == 401, (path, r.status_code, r.text)
            r = c.request(method, f"{root}{path}", headers=AUTH,
                          json={"model": MODEL, "messages": HELLO, "max_tokens": 1})
            assert r.status_code == 200, (path, r.text)
        for path in ("/healthz", "/readyz", "/metrics"):
            assert c.get(f"{root}{path}").status_code == 200, path


def test_deny_by_default(client):
    # every route that is not on the open list needs a key, known or not
    for path in ("/v1/models", "/v1/steering/methods", "/nope", "/v2/anything", "//v1/models",
                 "/v1/../v1/models"):
        assert client.get(path).status_code == 401, path
    for path in ("/healthz", "/readyz", "/metrics", "/docs", "/openapi.json", "/playground"):
        assert client.get(path).status_code == 200, path


def test_docs_and_metrics_can_be_closed_or_keyed(tiny_lm, tiny_pack):
    app = _app(tiny_lm, tiny_pack, docs="off", metrics="key", playground="off")
    with TestClient(app, raise_server_exceptions=False) as c:
        for path in ("/docs", "/openapi.json", "/redoc", "/playground"):
            assert c.get(path, headers=AUTH).status_code == 404, path
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers=AUTH).status_code == 200
        assert c.get("/healthz").status_code == 200


# ---- 2: authentication before the body; a linear walk ------------------------------------------


def _nested_body(size: int) -> bytes:
    """About `size` bytes of arrays nested 60 deep, repeated: the costly shape for the old walk."""
    unit = "[" * 60 + "1" + "]" * 60
    return ("[" + ",".join([unit] * (size // (len(unit) + 1))) + "]").encode()


def test_no_key_gets_401_without_reading_the_body(client):
    read = {"n": 0}

    async def main():
        app = client.app

        async def receive():
            read["n"] += 1
            return {"type": "http.request", "body": _nested_body(1 << 20), "more_body": False}

        sent = []

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions",
                 "root_path": "", "headers": [(b"content-type", b"application/json")],
                 "query_string": b"", "client": ("t", 1), "server": ("t", 80),
                 "scheme": "http", "http_version": "1.1", "app": app}
        await app(scope, receive, send)
        return sent

    sent = client.portal.call(main)
    assert sent[0]["status"] == 401
    assert read["n"] == 0


def test_json_walk_is_linear_and_copies_nothing():
    body = _nested_body(1 << 20)
    data = json.loads(body)
    tracemalloc.start()
    try:
        assert hardening._walk(data) is None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # O(depth) extra memory: the old walk copied the path per element (hundreds of MB here)
    assert peak < 256 * 1024, peak


def test_walk_still_names_the_param():
    data = json.loads('{"a": [{"b": 1}, {"c": "x\\u0000"}]}')
    assert hardening._walk(data) == ("strings must not contain NUL (U+0000) characters",
                                     "a[1].c")
    deep = json.loads("[" * 70 + "]" * 70)
    assert "nested deeper" in hardening._walk(deep)[0]
    assert hardening._walk(json.loads('{"k\\u0000": 1}'))[0].startswith("strings must not")


def test_clean_bodies_skip_the_value_walk(monkeypatch):
    """A clean body is parsed once and only its containers are visited; the per-value walk (one
    Python call per value) runs only for a body the parser or the raw-byte regexes flagged."""
    def no_walk(data):
        raise AssertionError("walked a clean body")

    monkeypatch.setattr(hardening, "_walk", no_walk)
    flat = b'{"model": "m", "n": [' + b"1.5e3, " * 100_000 + b'1], "s": "\\u00e9 \\u00e0"}'
    hardening.check_json(flat)
    hardening.check_json(b'{"a": ' + b"[" * 63 + b"]" * 63 + b"}")  # depth 64: the limit


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "MARK-1"}],
                              "max_tokens": 1}),
    ("/v1/completions", {"prompt": "MARK-2", "max_tokens": 1}),
    ("/v1/steering/compare", {"prompt": "MARK-3", "variants": [{"method": "none"}], "max_tokens": 1}),
    ("/v1/chat/completions", {"messages": [], "n": [1] * 1000, "note": "MARK-4"}),  # refused
])
def test_a_body_is_parsed_once(client, monkeypatch, path, body):
    """The body checks parse the JSON and the route validates that value: the bytes are parsed
    once, not a second time by FastAPI (docs/security.md, finding 2's remaining cost)."""
    real = json.loads
    mark = next(v for v in json.dumps(body).split('"') if v.startswith("MARK-"))
    parses = []

    def counting(text, *args, **kwargs):
        if mark in (text.decode() if isinstance(text, bytes | bytearray) else str(text)):
            parses.append(1)
        return real(text, *args, **kwargs)

    monkeypatch.setattr(json, "loads", counting)
    r = client.post(path, json=body, headers={"Authorization": "Bearer k-basic"})
    assert r.status_code in (200, 400), r.text
    assert len(parses) == 1


@pytest.mark.parametrize("body, param", [
    (b'{"a": [1, 2, NaN]}', "a[2]"), (b'{"a": {"b": -Infinity}}', "a.b"),
    (b'{"a": [1e400]}', "a[0]"), (b'{"a": [0, "x\\u0000"]}', "a[1]"),
    (b'{"a": "\\udc00"}', "a"), (b'{"a": ' + b"9" * 400 + b'.0}', "a")])
def test_flagged_bodies_are_walked_and_named(body, param):
    with pytest.raises(APIError) as info:
        hardening.check_json(body)
    assert info.value.param == param


def test_large_bodies_are_checked_off_the_event_loop(client, monkeypatch):
    threads = []
    real = hardening.check_json

    def spy(body):
        threads.append(threading.current_thread().name)
        return real(body)

    monkeypatch.setattr(hardening, "check_json", spy)
    big = {"model": MODEL, "messages": HELLO, "max_tokens": 1, "user": "u" * 100_000}
    client.post("/v1/chat/completions", json=big, headers=AUTH)
    client.post("/v1/chat/completions", json={"model": MODEL, "messages": HELLO,
                                              "max_tokens": 1}, headers=AUTH)
    loop_thread = client.portal.call(lambda: threading.current_thread().name)
    assert threads[0] != loop_thread and threads[1] == loop_thread


# ---- 8: audit every refused request; the client's request id ------------------------------------


def _audit(caplog) -> list[dict]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "steer.audit"]


@pytest.mark.parametrize("headers,body,status,code", [
    ({}, {"model": MODEL, "messages": HELLO}, 401, "missing_api_key"),
    ({"Authorization": "Bearer wrong"}, {"model": MODEL, "messages": HELLO}, 401,
     "invalid_api_key"),
    (AUTH, {"model": MODEL, "messages": "not a list"}, 400, "invalid_value"),
    (AUTH, {"model": MODEL, "messages": HELLO, "max_tokens": 10**9}, 400, None),
    (AUTH, {"model": MODEL, "messages": HELLO, "steering": {"method": "ablate"}}, 403,
     "policy_methods"),
])
def test_every_refused_request_is_audited(client, caplog, headers, body, status, code):
    caplog.set_level(logging.INFO, logger="steer.audit")
    r = client.post("/v1/chat/completions", json=body,
                    headers={**headers, "X-Request-ID": "client-chosen-7"})
    assert r.status_code == status, r.text
    mine = [x for x in _audit(caplog) if x["request_id"] == r.headers["x-request-id"]]
    lines = [x for x in mine if x["event"] != "admission"]
    assert len(lines) == 1, lines
    line = lines[0]
    # a request refused by the policy was admitted or not at once: its admission line says so
    admissions = [x for x in mine if x["event"] == "admission"]
    assert [(x["admitted"], x["denied"]) for x in admissions] == \
        ([(False, code)] if code and code.startswith("policy") else [])
    assert line["client_request_id"] == "client-chosen-7"
    assert line["status"] == status and line["outcome"] == "denied"
    assert line["key_id"] == ("basic" if headers is AUTH else "anonymous")
    if code:
        assert line["denied"] == code


def test_server_request_id_is_its_own(client, caplog):
    caplog.set_level(logging.INFO, logger="steer.access")
    r = client.post("/v1/chat/completions", headers={**AUTH, "X-Request-ID": "abc-123"},
                    json={"model": MODEL, "messages": HELLO, "max_tokens": 1})
    rid = r.headers["x-request-id"]
    assert rid != "abc-123" and len(rid) == 32
    line = next(r.__dict__["json"] for r in caplog.records
                if r.name == "steer.access" and r.__dict__["json"]["request_id"] == rid)
    assert line["client_request_id"] == "abc-123"


# ---- 10: capped log fields ------------------------------------------------------------------------


def test_log_fields_are_capped(client, caplog):
    caplog.set_level(logging.INFO, logger="steer.access")
    user = "u" * 50_000
    r = client.post("/v1/chat/completions", headers=AUTH,
                    json={"model": MODEL, "messages": HELLO, "max_tokens": 1, "user": user})
    assert r.status_code == 200
    line = next(rec.__dict__["json"] for rec in caplog.records if rec.name == "steer.access"
                and rec.__dict__["json"]["request_id"] == r.headers["x-request-id"])
    assert line["user"].startswith("uuu") and len(line["user"]) < 300
    assert len(json.dumps(line)) < 4000


# ---- 12: drain expiry and liveness ------------------------------------------------------------------


class _Slow(dict):
    """Row edits whose every lookup sleeps: a request that cannot finish in a short drain."""

    def get(self, *args):
        import time

        time.sleep(0.02)
        return super().get(*args)


@pytest.mark.parametrize("stream", [False, True])
def test_drain_timeout_fails_leftovers_with_503(tiny_lm, tiny_pack, monkeypatch, stream):
    from server.api import resolve
    from server.app import InflightMiddleware, find_middleware
    from server.lifecycle import drain

    real = resolve.Checked.build

    def slow(self):
        resolved = real(self)
        resolved.row.edits = _Slow(resolved.row.edits)
        return resolved

    monkeypatch.setattr(resolve.Checked, "build", slow)
    app = _app(tiny_lm, tiny_pack)

    async def main():
        state = app.state.steer
        async with asgi_client(app) as c:
            body = {"model": MODEL, "messages": HELLO, "max_tokens": 400,
                    "temperature": 0, "stream": stream, "ignore_eos": True,
                    "steering": {"method": "actadd", "strength": 1.0}}
            task = asyncio.create_task(c.post("/v1/chat/completions", json=body,
                                              headers=AUTH))
            while state.engine.stats()["running"] == 0:
                assert not task.done(), task.result().text
                await asyncio.sleep(0.01)
            await drain(state, find_middleware(app, InflightMiddleware), 0.2)
            r = await asyncio.wait_for(task, 30)
            return r

    r = asyncio.run(main())
    if stream:
        assert r.status_code == 200
        assert "drain_timeout" in r.text
    else:
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "drain_timeout"


def test_served_name_shows_no_local_path_while_loading():
    """Before the model has loaded, /v1/models names it by its last path part, never the path."""
    from server.observability.metrics import Metrics
    from server.state import ServerState

    state = ServerState(Settings(model="/srv/private/models/my-model"), Metrics())
    assert state.served_name == "my-model"
    assert ServerState(Settings(model="embedded"), Metrics()).served_name == "embedded"
