"""The OpenAI-compatible API on the tiny random model: shapes, streaming, usage, presets,
discovery, metrics, background loading, and every bad input of issue 3 item 7 (4xx, never 5xx)."""

from __future__ import annotations

import json
import logging
import threading

import pytest
from fastapi.testclient import TestClient

from server import app as app_module
from server.app import create_app
from server.engine import QueueFull
from server.settings import Settings
from steering.interventions.methods import METHODS
from steering.models.chat import format_chat
from testkit.live import post_greedy
from testkit.tiny import HELLO, MODEL

LIMITS = dict(max_tokens_limit=64, strength_min=-4.0, strength_max=4.0, max_n=4, max_stop=4,
              max_top_logprobs=5, retry_after_s=3)


def chat(client, **body):
    return post_greedy(client, "/v1/chat/completions", body, max_tokens=6)


def sse_events(response) -> list:
    """Every `data:` payload of a server-sent-event stream, parsed; "[DONE]" kept as is."""
    assert response.headers["content-type"].startswith("text/event-stream")
    out = []
    for block in response.text.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def prompt_len(lm, messages) -> int:
    text = format_chat(lm.tokenizer, messages)
    return len(lm.tokenizer(text, add_special_tokens=False)["input_ids"])


# ---- completions ---------------------------------------------------------------------------------


def test_chat_completion_shape_and_usage(client, tiny_lm):
    r = chat(client, max_tokens=5)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == MODEL
    [choice] = body["choices"]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in {"stop", "length"}
    usage = body["usage"]
    assert usage["prompt_tokens"] == prompt_len(tiny_lm, HELLO)
    if choice["finish_reason"] == "length":
        assert usage["completion_tokens"] == 5
    assert 1 <= usage["completion_tokens"] <= 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert body["steering"] == {"method": "none", "strength": 0.0, "k": None, "layers": None,
                                "pack": None, "preset": None}
    assert r.headers["x-request-id"]


def test_streamed_chat_chunk_by_chunk(client):
    plain = chat(client, max_tokens=8).json()
    r = chat(client, max_tokens=8, stream=True, stream_options={"include_usage": True})
    assert r.status_code == 200
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    first, usage_chunk, body = chunks[0], chunks[-1], chunks[1:-1]
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert first["steering"]["method"] == "none"
    assert first["usage"] is None
    text, finish = "", None
    for c in body:
        assert c["usage"] is None  # include_usage: null on every chunk but the last
        [choice] = c["choices"]
        assert choice["index"] == 0
        assert finish is None, "nothing may follow the finish chunk but usage"
        text += choice["delta"].get("content") or ""
        finish = choice["finish_reason"]
    assert finish == plain["choices"][0]["finish_reason"]
    assert text == plain["choices"][0]["message"]["content"]  # greedy: same as non-streamed
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == plain["usage"]


def test_stream_without_usage_has_no_usage_chunk(client):
    events = sse_events(chat(client, max_tokens=3, stream=True))
    assert events[-1] == "[DONE]"
    assert all("usage" not in c and c["choices"] for c in events[:-1])


def test_text_completion_and_stream(client, tiny_lm):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 6, "temperature": 0}
    plain = client.post("/v1/completions", json=body)
    assert plain.status_code == 200, plain.text
    p = plain.json()
    assert p["object"] == "text_completion" and p["id"].startswith("cmpl-")
    assert p["usage"]["prompt_tokens"] == len(tiny_lm.tokenizer("Once upon a time")["input_ids"])
    events = sse_events(client.post("/v1/completions", json={
        **body, "stream": True, "stream_options": {"include_usage": True}}))
    assert events[-1] == "[DONE]"
    text = "".join(c["choices"][0]["text"] for c in events[:-2])
    assert text == p["choices"][0]["text"]
    assert events[-2]["usage"] == p["usage"]
    assert events[0]["steering"]["method"] == "none"


def test_completion_batch_prompts_and_n(client):
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": ["a b", "hello there"],
                                             "n": 2, "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    texts = [c["text"] for c in body["choices"]]
    assert texts[0] == texts[1] and texts[2] == texts[3]  # greedy: n copies agree
    usage = body["usage"]
    assert usage["completion_tokens"] <= 16
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_token_id_prompt_and_echo(client, tiny_lm):
    ids = tiny_lm.tokenizer("hello world")["input_ids"]
    r = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 3, "temperature": 0,
                                             "echo": True})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"].startswith(tiny_lm.tokenizer.decode(ids))
    assert r.json()["usage"]["prompt_tokens"] == len(ids)


def test_n_streamed_choices(client):
    events = sse_events(chat(client, n=3, max_tokens=4, stream=True,
                             stream_options={"include_usage": True}))
    texts = {0: "", 1: "", 2: ""}
    finished = set()
    for c in events[:-2]:
        for choice in c["choices"]:
            texts[choice["index"]] += choice["delta"].get("content") or ""
            if choice["finish_reason"]:
                finished.add(choice["index"])
    assert finished == {0, 1, 2}
    assert len(set(texts.values())) == 1  # greedy
    assert events[-2]["usage"]["completion_tokens"] <= 12


def test_seeded_sampling_is_reproducible(client):
    a = chat(client, temperature=1.0, seed=1234, max_tokens=8, n=2).json()
    b = chat(client, temperature=1.0, seed=1234, max_tokens=8, n=2).json()
    assert [c["message"]["content"] for c in a["choices"]] == \
           [c["message"]["content"] for c in b["choices"]]


def test_chat_logprobs(client):
    body = chat(client, max_tokens=4, logprobs=True, top_logprobs=3).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"]
    for entry in content:
        assert entry["logprob"] <= 0
        assert len(entry["top_logprobs"]) == 3
        assert entry["top_logprobs"][0]["logprob"] >= entry["logprob"] - 1e-5
        assert all(0 <= b < 256 for b in entry["bytes"])
    assert chat(client, max_tokens=2).json()["choices"][0]["logprobs"] is None


def test_completion_logprobs(client):
    body = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4,
                                                "temperature": 0, "logprobs": 2}).json()
    lp = body["choices"][0]["logprobs"]
    n = body["usage"]["completion_tokens"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"]) == n
    assert all(1 <= len(t) <= 2 for t in lp["top_logprobs"])


def test_stop_string_cuts_the_text(client):
    base = client.post("/v1/completions", json={"prompt": "The sea", "max_tokens": 24,
                                                "temperature": 0}).json()
    text = base["choices"][0]["text"].replace("\ufffd", "")
    candidates = [text[i:i + 2] for i in range(1, len(text) - 2) if text[i:i + 2].isprintable()
                  and "\ufffd" not in text[i:i + 2]]
    if not candidates:
        pytest.skip("the random model produced no printable text to stop on")
    stop = candidates[0]
    r = client.post("/v1/completions", json={"prompt": "The sea", "max_tokens": 24,
                                             "temperature": 0, "stop": [stop]}).json()
    choice = r["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert stop not in choice["text"]
    assert base["choices"][0]["text"].startswith(choice["text"])


def test_user_field_and_unknown_fields_are_accepted(client):
    r = chat(client, max_tokens=2, user="alice", some_future_field={"x": 1},
             presence_penalty=0, frequency_penalty=0.0)
    assert r.status_code == 200, r.text


def test_max_completion_tokens(client):
    body = chat(client, max_tokens=None, max_completion_tokens=3).json()
    assert body["usage"]["completion_tokens"] <= 3


# ---- steering ------------------------------------------------------------------------------------


def test_steering_applied_fields(client, tiny_pack):
    ablate = chat(client, max_tokens=2, steering={"method": "ablate"}).json()["steering"]
    assert ablate == {"method": "ablate", "strength": 1.0, "k": None,
                      "layers": list(range(tiny_pack.n_layers)), "pack": "refusal",
                      "preset": None}
    actadd = chat(client, max_tokens=2,
                  steering={"method": "actadd", "strength": 2.5}).json()["steering"]
    assert actadd["layers"] == [tiny_pack.layer] and actadd["strength"] == 2.5
    flip = chat(client, max_tokens=2, steering={"method": "inlp_flip"}).json()["steering"]
    assert flip["k"] == tiny_pack.max_k() and flip["layers"] == tiny_pack.inlp_default_layers
    null = chat(client, max_tokens=2, steering={"method": "inlp_null", "k": 1,
                                                "pack": "refusal"}).json()["steering"]
    assert null["k"] == 1
    ace = chat(client, max_tokens=2, steering={"method": "ace", "strength": 0,
                                               "layers": [0, 2]}).json()["steering"]
    assert ace["layers"] == [0, 2] and ace["strength"] == 0.0


def test_strong_steering_changes_the_output(client):
    plain = chat(client, max_tokens=8).json()["choices"][0]["message"]["content"]
    steered = chat(client, max_tokens=8,
                   steering={"method": "actadd", "strength": 4.0, "layers": [0, 1, 2]}
                   ).json()["choices"][0]["message"]["content"]
    assert steered != plain


def test_preset_via_model_name(client, tiny_pack):
    body = chat(client, model=f"{MODEL}+no-refusal", max_tokens=2).json()
    assert body["model"] == f"{MODEL}+no-refusal"
    assert body["steering"] == {"method": "ablate", "strength": 1.0, "k": None,
                                "layers": list(range(tiny_pack.n_layers)), "pack": "refusal",
                                "preset": "no-refusal"}
    assert chat(client, model=f"{MODEL}+more-refusal",
                max_tokens=2).json()["steering"]["method"] == "actadd"


def test_preset_fields_overridden_by_body(client):
    s = chat(client, model=f"{MODEL}+no-refusal", max_tokens=2,
             steering={"strength": 0.5}).json()["steering"]
    assert (s["method"], s["strength"], s["preset"]) == ("ablate", 0.5, "no-refusal")
    s = chat(client, model=f"{MODEL}+no-refusal", max_tokens=2,
             steering={"method": "inlp_flip", "k": 2}).json()["steering"]
    assert (s["method"], s["k"], s["preset"]) == ("inlp_flip", 2, "no-refusal")


def test_presets_file(tmp_path, tiny_lm, tiny_pack):
    path = tmp_path / "presets.yaml"
    path.write_text("presets:\n  gentle:\n    method: ablate\n    strength: 0.25\n"
                    "    description: a little less refusal\n")
    app = create_app(Settings(presets=str(path), default_presets=False), lm=tiny_lm,
                     packs=[tiny_pack])
    with TestClient(app) as c:
        ids = [m["id"] for m in c.get("/v1/models").json()["data"]]
        assert ids == [MODEL, f"{MODEL}+gentle"]
        r = c.post("/v1/chat/completions", json={"model": f"{MODEL}+gentle", "messages": HELLO,
                                                 "max_tokens": 2})
        assert r.json()["steering"]["strength"] == 0.25
        assert c.post("/v1/chat/completions", json={
            "model": f"{MODEL}+no-refusal", "messages": HELLO}).status_code == 404


def test_bad_presets_file_is_refused(tmp_path):
    from server.presets import PresetError

    path = tmp_path / "p.json"
    path.write_text(json.dumps({"x": {"method": "ablate", "strenght": 1}}))
    with pytest.raises(PresetError, match="strenght"):
        create_app(Settings(presets=str(path)))


# ---- discovery and probes ------------------------------------------------------------------------


def test_models_list(client):
    data = client.get("/v1/models").json()["data"]
    ids = [m["id"] for m in data]
    assert ids[0] == MODEL
    for preset in ("no-refusal", "more-refusal", "ablate", "ace-refuse"):
        assert f"{MODEL}+{preset}" in ids
    by_id = {m["id"]: m for m in data}
    assert by_id[f"{MODEL}+no-refusal"]["steering"]["method"] == "ablate"
    assert all(m["object"] == "model" for m in data)
    one = client.get(f"/v1/models/{MODEL}+ablate")
    assert one.status_code == 200 and one.json()["steering"]["method"] == "ablate"
    assert client.get("/v1/models/nope").status_code == 404


def test_packs_and_methods(client, tiny_pack):
    [pack] = client.get("/v1/steering/packs").json()["data"]
    assert pack["id"] == "refusal" and pack["default"] is True
    assert pack["k_max"] == tiny_pack.max_k()
    assert pack["n_layers"] == tiny_pack.n_layers and "meta" in pack
    methods = {m["id"]: m for m in client.get("/v1/steering/methods").json()["data"]}
    assert set(methods) == set(METHODS)
    assert methods["inlp_flip"]["packs"]["refusal"]["k"] == {"min": 1, "max": tiny_pack.max_k()}
    assert methods["ablate"]["strength"] == {"min": -4.0, "max": 4.0, "default": 1.0}
    assert methods["actadd"]["packs"]["refusal"]["default_layers"] == [tiny_pack.layer]
    assert methods["none"]["strength"] is None


def test_probes(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


def test_metrics_exposed(client):
    chat(client, max_tokens=3, steering={"method": "ablate"})
    chat(client, max_tokens=3, stream=True)
    text = client.get("/metrics").text
    assert 'steer_requests_total{endpoint="/v1/chat/completions",method="ablate",status="200"}' \
        in text
    for name in ("steer_queue_wait_seconds_count", "steer_time_to_first_token_seconds_count",
                 "steer_inter_token_latency_seconds_count",
                 "steer_e2e_request_latency_seconds_count", "steer_prompt_tokens_total",
                 "steer_generation_tokens_total", "steer_requests_running",
                 "steer_requests_waiting", "steer_http_requests_total"):
        assert name in text, name
    assert 'status="500"' not in text


def test_access_log_is_json(client, caplog):
    with caplog.at_level(logging.INFO, logger="steer.access"):
        chat(client, max_tokens=2, steering={"method": "ablate"}, user="bob",
             messages=[{"role": "user", "content": "secret prompt text"}])
    records = [r for r in caplog.records if r.name == "steer.access"]
    assert records
    line = records[-1].json
    assert line["status"] == 200 and line["path"] == "/v1/chat/completions"
    assert line["steering"]["method"] == "ablate" and line["user"] == "bob"
    assert line["completion_tokens"] >= 1 and line["request_id"]
    from server.observability.accesslog import JsonFormatter

    formatted = json.loads(JsonFormatter().format(records[-1]))
    assert formatted["status"] == 200 and "secret prompt text" not in json.dumps(formatted)


def test_request_id_is_the_servers_own(client):
    r = client.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 1},
                    headers={"X-Request-Id": "abc-123"})
    assert r.headers["x-request-id"] and r.headers["x-request-id"] != "abc-123"


def test_queue_full_is_429_with_retry_after(client, monkeypatch):
    engine = client.app.state.steer.engine

    def full(request):
        raise QueueFull("full")

    monkeypatch.setattr(engine, "submit", full)
    r = chat(client, max_tokens=2)
    assert r.status_code == 429
    assert r.headers["retry-after"] == "3"
    assert r.json()["error"]["code"] == "queue_full"


# ---- background loading --------------------------------------------------------------------------


def test_readyz_is_503_while_loading(monkeypatch, tiny_lm, tiny_pack):
    release = threading.Event()

    def slow_load(settings):
        release.wait(30)
        return tiny_lm, tiny_pack

    monkeypatch.setattr(app_module, "_load_model_and_pack", slow_load)
    app = create_app(Settings(exit_on_load_error=False))
    with TestClient(app) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        assert c.get("/healthz").status_code == 200
        r = chat(c, max_tokens=1)
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        assert "retry-after" in r.headers
        release.set()
        for _ in range(200):
            if c.get("/readyz").status_code == 200:
                break
            threading.Event().wait(0.05)
        assert c.get("/readyz").status_code == 200
        assert chat(c, max_tokens=1).status_code == 200


def test_load_failure_is_reported(monkeypatch, caplog):
    def broken(settings):
        raise FileNotFoundError("no such model")

    monkeypatch.setattr(app_module, "_load_model_and_pack", broken)
    app = create_app(Settings(exit_on_load_error=False))
    with TestClient(app) as c:
        for _ in range(100):
            body = c.get("/readyz").json()
            if body["status"] != "loading":
                break
            threading.Event().wait(0.05)
        assert body["status"] == "failed" and body["error"]
        r = chat(c, max_tokens=1)
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        # the reason is in the log, never in a public probe or a response (issue 12 finding 9)
        assert "no such model" not in c.get("/readyz").text and "no such model" not in r.text
    [record] = [rec for rec in caplog.records if "loading failed" in rec.getMessage()]
    assert "no such model" in record.getMessage() and record.exc_info is not None


# ---- bad input (issue 3 item 7 and friends): 4xx with an OpenAI error body, never 5xx ------------

LONG = "word " * 2000  # far beyond the tiny model's 512-token context

BAD_CHAT = [
    ("unknown method", {"steering": {"method": "amplify"}}, 400, "steering.method"),
    ("unknown pack", {"steering": {"method": "ablate", "pack": "nope"}}, 404, "steering.pack"),
    ("unknown preset", {"model": f"{MODEL}+nope"}, 404, "model"),
    ("unknown model", {"model": "gpt-4"}, 404, "model"),
    ("k too large", {"steering": {"method": "inlp_flip", "k": 99}}, 400, "steering.k"),
    ("k zero", {"steering": {"method": "inlp_null", "k": 0}}, 400, "steering.k"),
    ("k for a non-INLP method", {"steering": {"method": "ablate", "k": 1}}, 400, "steering.k"),
    ("strength above bound", {"steering": {"method": "ablate", "strength": 100}}, 400,
     "steering.strength"),
    ("strength below bound", {"steering": {"method": "actadd", "strength": -5}}, 400,
     "steering.strength"),
    ("strength not a number", {"steering": {"method": "ablate", "strength": "lots"}}, 400,
     "steering.strength"),
    ("layer out of range", {"steering": {"method": "ablate", "layers": [99]}}, 400,
     "steering.layers"),
    ("negative layer", {"steering": {"method": "actadd", "layers": [-1]}}, 400,
     "steering.layers"),
    ("layer not an INLP layer", {"steering": {"method": "inlp_flip", "layers": [0]}}, 400,
     "steering.layers"),
    ("empty layers", {"steering": {"method": "ablate", "layers": []}}, 400, "steering.layers"),
    ("unknown steering field", {"steering": {"method": "ablate", "strenght": 2}}, 400,
     "steering.strenght"),
    ("empty messages", {"messages": []}, 400, "messages"),
    ("missing messages", {"messages": None}, 400, "messages"),
    ("bad role", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ("image content", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, 400,
     "messages[0].content[0]"),
    ("prompt longer than context", {"messages": [{"role": "user", "content": LONG}]}, 400,
     "messages"),
    ("max_tokens over the limit", {"max_tokens": 65}, 400, "max_tokens"),
    ("max_completion_tokens over the limit", {"max_completion_tokens": 1000}, 400,
     "max_completion_tokens"),
    ("max_tokens zero", {"max_tokens": 0}, 400, "max_tokens"),
    ("temperature too high", {"temperature": 3}, 400, "temperature"),
    ("top_p zero", {"top_p": 0}, 400, "top_p"),
    ("n too large", {"n": 5}, 400, "n"),
    ("n zero", {"n": 0}, 400, "n"),
    ("too many stops", {"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("top_logprobs without logprobs", {"top_logprobs": 2}, 400, "top_logprobs"),
    ("top_logprobs too large", {"logprobs": True, "top_logprobs": 6}, 400, "top_logprobs"),
    ("tool named badly", {"tools": [{"type": "function", "function": {"name": "f g"}}]}, 400,
     "tools[0].function.name"),
    ("logit_bias", {"logit_bias": {"5": 10}}, 400, "logit_bias"),
    ("presence_penalty", {"presence_penalty": 1.0}, 400, "presence_penalty"),
    ("json_schema output", {"response_format": {"type": "json_schema"}}, 400,
     "response_format.type"),
    ("stream_options without stream", {"stream_options": {"include_usage": True}}, 400,
     "stream_options"),
    ("seed not an integer", {"seed": "abc"}, 400, "seed"),
]


@pytest.mark.parametrize("what,patch,status,param", BAD_CHAT, ids=[b[0] for b in BAD_CHAT])
def test_bad_chat_input(client, what, patch, status, param):
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 4, **patch}
    body = {k: v for k, v in body.items() if v is not None}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param
    assert err["type"] == "invalid_request_error"
    assert err["message"]


@pytest.mark.parametrize("raw", ["1e999", "NaN", "Infinity", "-Infinity"])
def test_non_finite_strength(client, raw):
    body = {"model": MODEL, "messages": HELLO, "steering": {"method": "ablate", "strength": 7}}
    text = json.dumps(body).replace('"strength": 7', f'"strength": {raw}')
    r = client.post("/v1/chat/completions", content=text,
                    headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "steering.strength"
    assert "finite" in r.json()["error"]["message"]


@pytest.mark.parametrize("text,code", [
    ('{"model": "x", "messages": [', "invalid_json"),
    ("not json at all", "invalid_json"),
    ("[1, 2, 3]", "invalid_value"),
    ('"a string"', "invalid_value"),
])
def test_malformed_json(client, text, code):
    r = client.post("/v1/chat/completions", content=text,
                    headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["type"] == "invalid_request_error"
    if code == "invalid_json":
        assert "JSON" in err["message"]


def test_empty_body(client):
    r = client.post("/v1/chat/completions")
    assert r.status_code == 400
    assert r.json()["error"]["message"]


BAD_COMPLETION = [
    ("empty prompt", {"prompt": ""}, "prompt"),
    ("empty prompt list", {"prompt": []}, "prompt"),
    ("token id outside vocabulary", {"prompt": [1, 2, 10**6]}, "prompt"),
    ("prompt longer than context", {"prompt": LONG}, "prompt"),
    ("max_tokens over the limit", {"prompt": "hi", "max_tokens": 65}, "max_tokens"),
    ("prompt + max_tokens beyond context", {"prompt": [5] * 500, "max_tokens": 20},
     "max_tokens"),
    ("too many choices", {"prompt": ["a"] * 5, "n": 4}, "n"),
    ("logprobs too large", {"prompt": "hi", "logprobs": 6}, "logprobs"),
    ("suffix", {"prompt": "hi", "suffix": "end"}, "suffix"),
    ("best_of", {"prompt": "hi", "best_of": 3}, "best_of"),
    ("echo with logprobs", {"prompt": "hi", "echo": True, "logprobs": 1}, "echo"),
    ("unknown method", {"prompt": "hi", "steering": {"method": "x"}}, "steering.method"),
]


@pytest.mark.parametrize("what,body,param", BAD_COMPLETION, ids=[b[0] for b in BAD_COMPLETION])
def test_bad_completion_input(client, what, body, param):
    r = client.post("/v1/completions", json={"model": MODEL, "max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_unknown_route_and_method(client):
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    r = client.get("/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_no_server_errors_were_counted(client):
    text = client.get("/metrics").text
    assert 'status="500"' not in text


# ---- engine failures: reported, never a crash ------------------------------------------------------


class FakeHandle:
    def __init__(self, events):
        self.events = events
        self.cancelled = False

    def cancel(self):
        self.cancelled = True

    def __aiter__(self):
        return self._run()

    async def _run(self):
        for ev in self.events:
            yield ev


@pytest.fixture()
def failing(tiny_lm, tiny_pack, monkeypatch):
    from server.engine import TokenEvent

    app = create_app(Settings(**LIMITS), lm=tiny_lm, packs=[tiny_pack])
    with TestClient(app, raise_server_exceptions=False) as c:
        outcome = {"reason": "error"}

        def submit(request):
            return FakeHandle([TokenEvent(5, "a", logprob=-0.1, queue_wait_s=0.0),
                               TokenEvent(None, "", finish_reason=outcome["reason"],
                                          error="boom")])

        monkeypatch.setattr(app.state.steer.engine, "submit", submit)
        yield c, outcome


def test_engine_error_is_500_with_request_id(failing):
    c, _ = failing
    r = c.post("/v1/chat/completions", json={"messages": HELLO}, headers={"X-Request-Id": "r1"})
    assert r.status_code == 500
    err = r.json()["error"]
    assert err["type"] == "server_error" and r.headers["x-request-id"] in err["message"]
    assert "boom" not in r.text  # the engine's detail goes to the log (issue 12 finding 9)


def test_engine_timeout_is_504(failing):
    c, outcome = failing
    outcome["reason"] = "timeout"
    r = c.post("/v1/completions", json={"prompt": "hi"})
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"


def test_engine_error_mid_stream_is_reported_in_band(failing):
    c, _ = failing
    events = sse_events(c.post("/v1/chat/completions", json={"messages": HELLO,
                                                             "stream": True}))
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["type"] == "server_error"
    assert events[1]["choices"][0]["delta"]["content"] == "a"


def test_access_log_names_the_error(client, caplog):
    with caplog.at_level(logging.INFO, logger="steer.access"):
        chat(client, steering={"method": "inlp_flip", "k": 99})
    line = [r for r in caplog.records if r.name == "steer.access"][-1].json
    assert line["status"] == 400
    assert line["error"] == {"code": "invalid_steering", "param": "steering.k"}


# ---- templating and tokenization off the event loop (issue 12 finding 11) ------------------------


def _on_event_loop() -> bool:
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


@pytest.fixture
def tokenizer_calls(tiny_lm, monkeypatch):
    """(what, ran on the event loop) for every chat template and tokenizer call."""
    calls: list[tuple[str, bool]] = []
    cls = type(tiny_lm.tokenizer)
    for name in ("__call__", "apply_chat_template"):
        real = getattr(cls, name)

        def spy(self, *args, _real=real, _name=name, **kwargs):
            calls.append((_name, _on_event_loop()))
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(cls, name, spy)
    return calls


def test_templating_and_tokenization_run_off_the_event_loop(client, tokenizer_calls):
    assert chat(client, max_tokens=2).status_code == 200
    assert client.post("/v1/completions", json={"model": MODEL, "prompt": ["hi", "there"],
                                                "max_tokens": 2}).status_code == 200
    kinds = {name for name, _ in tokenizer_calls}
    assert kinds == {"__call__", "apply_chat_template"}
    assert not any(on_loop for _, on_loop in tokenizer_calls), tokenizer_calls


def test_yield_cores_lowers_only_the_calling_threads_priority():
    import os
    import threading

    from server.app import yield_cores_to_the_engine

    if not hasattr(os, "setpriority"):
        pytest.skip("no per-thread priorities here")
    main_before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen = {}

    def loop_thread():
        yield_cores_to_the_engine(7)
        seen["after"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        yield_cores_to_the_engine(0)  # 0: leave it as it is
        seen["zero"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    t = threading.Thread(target=loop_thread)
    t.start()
    t.join()
    assert seen["after"] == max(7, main_before) and seen["zero"] == seen["after"]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main_before
