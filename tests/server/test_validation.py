"""Issue 26 item 3: every request limit in one place. One `validate()` that every generating
endpoint goes through, one error-code enum, and the settings declared once (each a `STEER_*`
variable and a `steer serve` flag with one help text)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.api import validation
from server.app import create_app
from server.cli import build_parser
from server.errors import ErrorCode
from server.settings import Settings, cli_overrides
from testkit.tiny import HELLO, MODEL

ROOT = Path(__file__).resolve().parents[2]
RAISERS = {"APIError", "bad_request", "not_found", "api_error", "unsupported"}
# The request limits: read by the validation module only (routes.py shows the strength range in
# /v1/steering/methods).
LIMITS = {"max_tokens_limit", "default_max_tokens", "default_completion_max_tokens",
          "strength_min", "strength_max", "max_n", "max_choices", "max_stop",
          "max_top_logprobs", "max_messages", "max_prompt_tokens", "max_stop_chars",
          "max_compare_variants", "max_prompt_chars"}


def _server_sources():
    for path in sorted((ROOT / "server").rglob("*.py")):
        yield path, ast.parse(path.read_text())


def test_no_raise_site_spells_an_error_code_as_a_string():
    """Every `code` is an `ErrorCode` member (or built from one): no string literal is passed
    as a code to any of the error constructors."""
    loose = []
    for path, tree in _server_sources():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
            if name not in RAISERS:
                continue
            code = [k.value for k in node.keywords if k.arg == "code"]
            if name in {"bad_request", "not_found", "api_error"} and len(node.args) >= 3:
                code.append(node.args[2])
            for value in code:
                if isinstance(value, ast.Constant | ast.JoinedStr):
                    loose.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert loose == []


def test_error_codes_are_unique_strings():
    values = [c.value for c in ErrorCode]
    assert len(values) == len(set(values))
    assert all(v == v.lower() and " " not in v for v in values)


def test_the_request_limits_are_read_by_the_validation_module_only():
    readers = set()
    for path, tree in _server_sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in LIMITS:
                readers.add(str(path.relative_to(ROOT)))
    assert readers <= {"server/api/validation.py", "server/api/routes.py", "server/settings.py"}, \
        readers


def test_every_generating_endpoint_goes_through_validate(tiny_lm, tiny_pack, monkeypatch):
    seen = []
    real = validation.validate

    def spy(state, body):
        seen.append(type(body).__name__)
        return real(state, body)

    from server.api import compare, completions

    monkeypatch.setattr(completions, "validate", spy)
    monkeypatch.setattr(compare, "validate", spy)
    app = create_app(Settings(max_tokens_limit=8), lm=tiny_lm, packs=[tiny_pack])
    with TestClient(app) as c:
        assert c.post("/v1/chat/completions", json={"model": MODEL, "messages": HELLO,
                                                    "max_tokens": 1}).status_code == 200
        assert c.post("/v1/completions", json={"model": MODEL, "prompt": "hi",
                                               "max_tokens": 1}).status_code == 200
        assert c.post("/v1/steering/compare", json={"model": MODEL, "prompt": "hi",
                                                     "max_tokens": 1,
                                                     "variants": [{}]}).status_code == 200
        r = c.post("/v1/chat/completions", json={"model": MODEL, "messages": HELLO,
                                                 "max_tokens": 9})
        assert r.status_code == 400 and r.json()["error"]["code"] == "max_tokens_too_large"
    assert seen == ["ChatCompletionRequest", "CompletionRequest", "CompareRequest",
                    "ChatCompletionRequest"]


# ---- settings declared once -------------------------------------------------------------------------


def _serve_options() -> dict:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return {a.dest: a for a in sub.choices["serve"]._actions if a.dest != "help"}


def test_every_setting_is_a_serve_flag_with_its_help_and_variable():
    options = _serve_options()
    assert set(options) == set(Settings.model_fields)
    for name, field in Settings.model_fields.items():
        action = options[name]
        assert f"--{name.replace('_', '-')}" in action.option_strings
        assert field.description and field.description.replace("%", "%%") in action.help
        assert f"STEER_{name.upper()}" in action.help
        assert action.default is None  # unset flags leave the environment and defaults alone


def test_serve_flags_override_the_environment(monkeypatch):
    monkeypatch.setenv("STEER_MAX_N", "3")
    monkeypatch.setenv("STEER_MAX_QUEUE", "7")
    args = build_parser().parse_args(["serve", "--max-n", "5", "--no-access-log", "--docs",
                                      "off", "--strength-max", "2.5", "--precision", "fp32"])
    s = Settings(**cli_overrides(args))
    assert (s.max_n, s.max_queue, s.access_log, s.docs, s.strength_max, s.precision) == \
        (5, 7, False, "off", 2.5, "fp32")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--docs", "sometimes"])


def test_settings_cannot_exceed_the_schema_ceilings():
    with pytest.raises(ValueError, match="max_messages"):
        Settings(max_messages=10**6)
    with pytest.raises(ValueError, match="max_compare_variants"):
        Settings(max_compare_variants=10**6)


def test_validate_reports_each_limit_with_its_code(tiny_lm, tiny_pack):
    settings = Settings(max_n=2, max_choices=3, max_stop=1, max_stop_chars=4,
                        max_top_logprobs=2, max_messages=2, max_compare_variants=2,
                        max_tokens_limit=8, keys=json.dumps({"keys": []}))
    app = create_app(settings, lm=tiny_lm, packs=[tiny_pack])
    state = app.state.steer
    from server.api.protocol import ChatCompletionRequest, CompareRequest, CompletionRequest
    from server.errors import APIError

    cases = [
        (ChatCompletionRequest, {"messages": HELLO, "n": 3}, "n", "n_too_large"),
        (ChatCompletionRequest, {"messages": HELLO, "stop": ["a", "b"]}, "stop",
         "too_many_stop_sequences"),
        (ChatCompletionRequest, {"messages": HELLO, "stop": ["abcde"]}, "stop",
         "stop_too_long"),
        (ChatCompletionRequest, {"messages": HELLO * 3}, "messages", "too_many_messages"),
        (ChatCompletionRequest, {"messages": HELLO, "logprobs": True, "top_logprobs": 3},
         "top_logprobs", "top_logprobs_too_large"),
        (ChatCompletionRequest, {"messages": HELLO, "max_completion_tokens": 9},
         "max_completion_tokens", "max_tokens_too_large"),
        (CompletionRequest, {"prompt": ["a"] * 4}, "prompt", "too_many_prompts"),
        (CompletionRequest, {"prompt": ["a"] * 2, "n": 2}, "n", "too_many_choices"),
        (CompletionRequest, {"prompt": "a", "logprobs": 3}, "logprobs",
         "top_logprobs_too_large"),
        (CompareRequest, {"prompt": "a", "variants": [{}] * 3}, "variants", "too_many_variants"),
        (CompareRequest, {"prompt": "a", "variants": [{}, {"strength": 99, "method": "actadd"}]},
         "variants[1].strength", "strength_out_of_range"),
    ]
    with TestClient(app):
        for cls, body, param, code in cases:
            with pytest.raises(APIError) as info:
                validation.validate(state, cls.model_validate({"model": MODEL, **body}))
            assert (info.value.param, info.value.code) == (param, code), (body, info.value)
        valid = validation.validate(state, ChatCompletionRequest.model_validate(
            {"model": MODEL, "messages": HELLO, "n": 2, "max_tokens": 5}))
        assert valid.choices == 2 and valid.max_tokens == 5
        assert valid.estimate == 2 * 5 + -(-len(HELLO[0]["content"]) // 4)
