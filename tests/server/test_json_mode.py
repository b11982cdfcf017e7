"""response_format json_object: constrained decoding (server/api/structured.py) on a tiny random
model, whose unconstrained text is never JSON: every answer that ends with "stop" is one JSON
object, streamed or not, and a cut one ("length") is still the start of one."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

ASK = [{"role": "user", "content": "Answer in JSON."}]


@pytest.fixture(scope="module")
def client(tiny_lm, tiny_pack):
    from server.app import create_app
    from server.settings import Settings

    with TestClient(create_app(Settings(max_n=8), lm=tiny_lm, packs=[tiny_pack]),
                    raise_server_exceptions=False) as c:
        yield c


def _body(**extra) -> dict:
    return {"model": "tiny-qwen2", "messages": ASK, "max_tokens": 48, "temperature": 1.0,
            "response_format": {"type": "json_object"}, **extra}


def test_answers_are_json_objects(client):
    r = client.post("/v1/chat/completions", json=_body(n=8, seed=3))
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    stopped = [c for c in choices if c["finish_reason"] == "stop"]
    assert stopped, "no answer closed its object within 48 tokens"
    for c in stopped:
        assert isinstance(json.loads(c["message"]["content"]), dict), c
    for c in choices:
        assert c["message"]["content"].startswith("{")


def test_without_json_mode_the_tiny_model_writes_no_json(client):
    body = _body(n=8, seed=3)
    del body["response_format"]
    texts = [c["message"]["content"] for c in
             client.post("/v1/chat/completions", json=body).json()["choices"]]
    parsed = 0
    for t in texts:
        try:
            parsed += isinstance(json.loads(t), dict)
        except ValueError:
            pass
    assert parsed == 0  # so the test above measures the constraint, not the model


def test_streamed_json_mode_and_steering(client):
    r = client.post("/v1/chat/completions", json=_body(
        seed=5, stream=True, steering={"method": "actadd", "strength": 1.0}, max_tokens=64))
    assert r.status_code == 200
    text, finish = "", None
    for block in r.text.split("\n\n"):
        if block.startswith("data: {"):
            ch = json.loads(block[6:])["choices"]
            if ch:
                text += ch[0]["delta"].get("content") or ""
                finish = ch[0]["finish_reason"] or finish
    assert text.startswith("{")
    if finish == "stop":
        assert isinstance(json.loads(text), dict)
