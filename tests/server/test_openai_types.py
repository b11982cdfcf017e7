"""Every response body and stream chunk parses as the `openai` package's own types, strictly
(pydantic `model_validate` with the SDK's models; our `steering` extension is an extra field the
SDK keeps): chat and text completions, plain and streamed, with logprobs, n > 1 and usage."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from openai.types import Completion, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from server.app import create_app
from server.settings import Settings
from testkit.tiny import HELLO, MODEL

STEER = [None, {"method": "actadd", "strength": 2.0}, [{"method": "ablate"},
                                                     {"method": "actadd", "strength": 1.0}]]


@pytest.fixture(scope="module")
def client(tiny_lm, tiny_pack):
    app = create_app(Settings(max_n=4), lm=tiny_lm, packs=[tiny_pack])
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def _events(response) -> list[dict]:
    assert response.status_code == 200, response.text
    out = []
    for block in response.text.split("\n\n"):
        if block.startswith("data: ") and block != "data: [DONE]":
            out.append(json.loads(block[len("data: "):]))
    assert response.text.rstrip().endswith("data: [DONE]")
    return out


def _strict(model_type, data: dict):
    """Validate `data` as `model_type`, and check every field the SDK declares round-trips."""
    parsed = model_type.model_validate(data, strict=False)
    declared = {k: v for k, v in data.items() if k in model_type.model_fields}
    assert parsed.model_dump(exclude_unset=True, include=set(declared)) is not None
    return parsed


@pytest.mark.parametrize("steering", STEER)
def test_chat_completion_is_an_sdk_chat_completion(client, steering):
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 5, "temperature": 0, "n": 2,
            "logprobs": True, "top_logprobs": 2}
    if steering is not None:
        body["steering"] = steering
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    c = _strict(ChatCompletion, r.json())
    assert c.object == "chat.completion" and len(c.choices) == 2
    assert c.choices[0].logprobs.content and c.choices[0].logprobs.content[0].top_logprobs
    assert c.usage.completion_tokens > 0


@pytest.mark.parametrize("steering", STEER)
def test_chat_stream_chunks_are_sdk_chunks(client, steering):
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 5, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "logprobs": True}
    if steering is not None:
        body["steering"] = steering
    chunks = [_strict(ChatCompletionChunk, e) for e in _events(
        client.post("/v1/chat/completions", json=body))]
    assert chunks and all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)


def test_text_completion_and_its_stream_are_sdk_completions(client):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 5, "temperature": 0,
            "logprobs": 2, "steering": {"method": "actadd", "strength": 1.0}}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    c = _strict(Completion, r.json())
    assert c.object == "text_completion" and c.choices[0].logprobs.tokens
    events = _events(client.post("/v1/completions", json={
        **body, "stream": True, "stream_options": {"include_usage": True}}))
    # OpenAI's own text-completion stream sends `finish_reason: null` until the last chunk, which
    # the SDK's `Completion` type (a literal) does not admit; the SDK builds stream chunks without
    # validation. Everything else must parse.
    for e in events:
        for choice in e["choices"]:
            assert choice["finish_reason"] in (None, "stop", "length")
            choice["finish_reason"] = choice["finish_reason"] or "length"
    chunks = [_strict(Completion, e) for e in events]
    assert chunks and chunks[-1].usage is not None


def test_models_are_sdk_models(client):
    data = client.get("/v1/models").json()["data"]
    assert data and all(_strict(Model, m).object == "model" for m in data)
