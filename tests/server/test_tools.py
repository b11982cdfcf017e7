"""Tool calls parsed out of the model's text (server/api/tools.py), whole and streamed in pieces,
and the request checks on tools / tool_choice / response_format (OpenAI-shaped 400s)."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from server.api.tools import ToolCallParser, parse_all, plan, template_messages

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "the weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
ANSWER = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
          '\n</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}'
          '\n</tool_call>')


def test_whole_answer_gives_content_and_calls():
    content, calls, reason = parse_all(plan([WEATHER], "auto", None), ANSWER, "stop")
    assert content.strip() == "Let me check."
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Paris"},
                                                                       {"city": "Rome"}]
    assert [c["index"] for c in calls] == [0, 1] and reason == "tool_calls"
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_streamed_in_any_pieces_gives_the_same(size):
    p = ToolCallParser()
    content, calls = "", []
    for i in range(0, len(ANSWER), size):
        text, done = p.feed(ANSWER[i:i + size])
        content += text
        calls += done
        assert "<" not in text or "<tool_call>" not in content  # a tag is never leaked
    rest, last = p.finish()
    content, calls = content + rest, calls + last
    assert content.strip() == "Let me check." and len(calls) == 2


def test_cut_or_broken_blocks_stay_content():
    tools = plan([WEATHER], "auto", None)
    cut = ANSWER[:60]
    content, calls, reason = parse_all(tools, cut, "length")
    assert calls == [] and content == cut and reason == "length"
    broken = "<tool_call>\nnot json\n</tool_call>"
    content, calls, _ = parse_all(tools, broken, "stop")
    assert calls == [] and content == broken


def test_a_last_block_the_model_ended_unclosed_is_a_call():
    # the embedded model, tool_choice "required": it ends its turn right after the call's "}"
    tools = plan([WEATHER], "required", None)
    text = 'get_weather", "arguments": {"city": "Paris"}}'
    content, calls, reason = parse_all(tools, text, "stop")
    assert content is None and reason == "tool_calls"
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
    # the same text cut by max_tokens, or an unclosed block that is not a call, stays content
    content, calls, reason = parse_all(tools, text, "length")
    assert calls == [] and reason == "length" and content.endswith(text)
    content, calls, _ = parse_all(plan([WEATHER], "auto", None), "<tool_call>\n{\"a\": 1}",
                                  "stop")
    assert calls == [] and content == '<tool_call>\n{"a": 1}'


def test_text_that_only_looks_like_a_tag_is_content():
    p = ToolCallParser()
    text, _ = p.feed("a < b and <tool")
    assert text == "a < b and "
    more, _ = p.feed("s> are fine")
    assert text + more == "a < b and <tools> are fine"


def test_parallel_false_keeps_the_first_call():
    _, calls, _ = parse_all(plan([WEATHER], "auto", False), ANSWER, "stop")
    assert len(calls) == 1 and json.loads(calls[0]["function"]["arguments"])["city"] == "Paris"


def test_named_choice_forces_the_call_and_stops_after_it():
    named = {"type": "function", "function": {"name": "get_weather"}}
    tools = plan([WEATHER], named, None)
    assert tools.forced_prefix.endswith('{"name": "get_weather", "arguments": ')
    assert tools.stop == ("</tool_call>",)
    # the model's text continues the forced start; the stop string is not in it
    content, calls, reason = parse_all(tools, '{"city": "Oslo"}}\n', "stop")
    assert content is None and reason == "tool_calls"
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo"}
    assert plan([WEATHER], "none", None) is None


def test_assistant_tool_calls_reach_the_template_as_objects():
    msgs = template_messages([{"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}])
    assert msgs[0]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}


# ---- request checks (in-process app, tiny model) ----------------------------------------------


@pytest.fixture(scope="module")
def client(tiny_lm, tiny_pack):
    from server.app import create_app
    from server.settings import Settings

    with TestClient(create_app(Settings(), lm=tiny_lm, packs=[tiny_pack]),
                    raise_server_exceptions=False) as c:
        yield c


HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("extra, param", [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
     "tools[0].function.name"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
    ({"response_format": {"type": "json_object"}}, "response_format"),  # no 'json' word
    ({"response_format": {"type": "json_schema"}}, "response_format.type"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"audio": {"voice": "alloy"}}, "audio"),
    ({"modalities": ["text", "audio"]}, "modalities[1]"),
])
def test_bad_tool_fields_get_an_openai_400(client, extra, param):
    r = client.post("/v1/chat/completions", json={"model": "tiny-qwen2", "messages": HI,
                                                  "max_tokens": 2, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param, err


def test_tool_turns_are_accepted(client):
    messages = [*HI, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    r = client.post("/v1/chat/completions", json={"model": "tiny-qwen2", "messages": messages,
                                                  "tools": [WEATHER], "max_tokens": 3})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls")
