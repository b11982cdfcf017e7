"""Issue 26 item 4 (the protocol part): one protocol module per endpoint over a shared base that
logs the unknown fields it ignores (as vLLM's protocol does)."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.api.protocol import ChatCompletionRequest, CompareVariant
from server.api.protocol.base import LOGGED_CHARS, LOGGED_NAMES
from server.app import create_app
from server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
MODEL = "tiny-qwen2"
HELLO = [{"role": "user", "content": "Hi there."}]


def test_one_protocol_module_per_endpoint():
    for name, shapes in {"chat": ["ChatCompletionRequest", "ChatCompletionResponse",
                                  "ChatCompletionChunk"],
                         "completions": ["CompletionRequest", "CompletionResponse",
                                         "CompletionChunk"],
                         "compare": ["CompareRequest", "CompareResponse"],
                         "models": ["ModelCard", "ModelList"],
                         "base": ["Lenient", "ErrorResponse", "Usage"]}.items():
        module = importlib.import_module(f"server.api.protocol.{name}")
        for shape in shapes:
            assert getattr(module, shape).__module__ == module.__name__, (name, shape)
        lines = len(Path(module.__file__).read_text().splitlines())
        assert lines < 400, (name, lines)


@pytest.fixture(scope="module")
def client(tiny_lm, tiny_pack):
    app = create_app(Settings(max_tokens_limit=8), lm=tiny_lm, packs=[tiny_pack])
    with TestClient(app) as c:
        yield c


def _ignored(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "server.protocol"]


def test_unknown_fields_are_ignored_and_logged(client, caplog):
    caplog.set_level(logging.WARNING, logger="server.protocol")
    r = client.post("/v1/chat/completions", json={
        "model": MODEL, "max_tokens": 1, "frobnicate": 3,
        "messages": [{"role": "user", "content": "Hi.", "audio_ref": "x"}]})
    assert r.status_code == 200, r.text
    logged = _ignored(caplog)
    assert any("ChatCompletionRequest" in m and "'frobnicate'" in m for m in logged), logged
    assert any("ChatMessage" in m and "'audio_ref'" in m for m in logged), logged


def test_known_fields_log_nothing(client, caplog):
    caplog.set_level(logging.WARNING, logger="server.protocol")
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": HELLO,
                                                  "max_tokens": 1, "temperature": 0,
                                                  "user": "me", "stream": False})
    assert r.status_code == 200, r.text
    assert _ignored(caplog) == []


def test_the_ignored_field_log_is_bounded(caplog):
    caplog.set_level(logging.WARNING, logger="server.protocol")
    extra = {("x" * 1000) + str(i): i for i in range(200)}
    ChatCompletionRequest.model_validate({"messages": HELLO, **extra})
    [message] = _ignored(caplog)
    assert message.count("'x") == LOGGED_NAMES and f"+{200 - LOGGED_NAMES} more" in message
    assert len(message) < LOGGED_NAMES * (LOGGED_CHARS + 8) + 200


def test_a_variant_with_a_null_steering_list_takes_its_own_fields():
    """Found by the schema fuzzer: `steering: null` beside a variant's fields was passed on as
    a steering field (500)."""
    variant = CompareVariant.model_validate({"steering": None, "method": "actadd",
                                             "strength": 0.5})
    own = variant.own_steering()
    assert (own.method, own.strength) == ("actadd", 0.5)
