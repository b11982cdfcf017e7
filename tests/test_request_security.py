"""Issue 28, the request side (items 5–9) on the tiny model: metric labels from a fixed set,
prompts bounded before tokenizing, per-key concurrency and fair queueing, bounded audit lines
written at admission and completion with a salted prompt hash, and summed strengths across a
steering list."""

from __future__ import annotations

import json
import re

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.observability.metrics import HTTP_METHODS, OTHER
from server.security.auth import hash_key
from server.settings import Settings

MODEL = "tiny-qwen2"
HELLO = [{"role": "user", "content": "Write a short poem about the sea."}]
KEYS = {"keys": [{"id": "basic", "sha256": hash_key("k-basic")}]}


def _auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def _app(tiny_lm, tiny_pack, keys=KEYS, **settings):
    return create_app(Settings(keys=json.dumps(keys), **settings), lm=tiny_lm,
                      packs=[tiny_pack])


# ---- 5: metric labels ---------------------------------------------------------------------------


def _label_values(metrics: str, name: str, label: str) -> set[str]:
    return {m.group(1) for line in metrics.splitlines() if line.startswith(name + "{")
            for m in [re.search(label + r'="([^"]*)"', line)] if m}


def test_metric_labels_come_from_a_fixed_set(tiny_lm, tiny_pack):
    """The issue's attack: unauthenticated requests with made-up HTTP methods each made a new
    time series. Now the method label is one of the standard methods or `other`."""
    with TestClient(_app(tiny_lm, tiny_pack), raise_server_exceptions=False) as c:
        for i in range(200):
            r = c.request(f"X{i}" * 30, f"/v1/chat/completions/{'y' * i}")
            assert r.status_code in (401, 404, 405)
        assert c.post("/v1/chat/completions", headers=_auth("k-basic"),
                      json={"model": MODEL, "messages": HELLO, "max_tokens": 1}).status_code \
            == 200
        text = c.get("/metrics").text
    methods = _label_values(text, "steer_http_requests_total", "http_method")
    assert OTHER in methods and methods <= HTTP_METHODS | {OTHER}, methods
    endpoints = _label_values(text, "steer_http_requests_total", "endpoint")
    assert all(not e.startswith("/v1/chat/completions/") for e in endpoints), endpoints
    series = [line for line in text.splitlines()
              if line.startswith("steer_http_requests_total{")]
    assert len(series) < 10, series
    for name in ("steer_requests_total", "steer_prompt_tokens_total"):
        assert _label_values(text, name, "method") <= {"none", "n/a", "composed", OTHER,
                                                       "actadd", "ace", "ablate"}
