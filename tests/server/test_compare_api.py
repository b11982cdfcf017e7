"""POST /v1/steering/compare on the tiny random model: each variant equals its single request
under greedy decoding, shapes and refusal fields, and bad variants get 4xx naming the variant."""

from __future__ import annotations

import math

import pytest

from steering.evaluation.refusal import is_refusal
from testkit.live import post_greedy
from testkit.tiny import HELLO, MODEL

LIMITS = dict(max_tokens_limit=64, strength_min=-4.0, strength_max=4.0, max_compare_variants=4)


def compare(client, **body):
    return post_greedy(client, "/v1/steering/compare", body, max_tokens=8)


def single(client, model=MODEL, steering=None, **extra):
    body = {"model": model, "messages": HELLO, "max_tokens": 8, "temperature": 0, **extra}
    if steering is not None:
        body["steering"] = steering
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


VARIANTS = [
    {"method": "none"},
    {"method": "actadd", "strength": 2.0},
    {"method": "ablate", "strength": 1.0},
    "no-refusal",
]


def test_variants_equal_single_requests_greedy(client):
    r = compare(client, variants=VARIANTS)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "steering.compare"
    assert [v["index"] for v in body["variants"]] == [0, 1, 2, 3]
    for v, spec in zip(body["variants"], VARIANTS):
        if isinstance(spec, str):
            ref = single(client, model=f"{MODEL}+{spec}")
        else:
            ref = single(client, steering=spec)
        choice = ref["choices"][0]
        assert v["completion"] == choice["message"]["content"], spec
        assert v["completion_tokens"] == ref["usage"]["completion_tokens"]
        assert v["finish_reason"] == choice["finish_reason"]
        assert v["steering"] == ref["steering"]
        assert v["is_refusal"] == is_refusal(v["completion"])
    assert body["variants"][3]["steering"]["preset"] == "no-refusal"
    assert body["variants"][3]["label"] == "no-refusal"
    # The steering really differs: the unsteered and the actadd completions are not all equal.
    assert len({v["completion"] for v in body["variants"]}) > 1


def test_same_seed_sampling_matches_single_requests(client):
    r = compare(client, variants=[{"method": "none"}, {"method": "actadd", "strength": 1.5}],
                temperature=1.0, seed=1234)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["seed"] == 1234
    a = single(client, steering={"method": "none"}, temperature=1.0, seed=1234)
    b = single(client, steering={"method": "actadd", "strength": 1.5}, temperature=1.0,
               seed=1234)
    assert body["variants"][0]["completion"] == a["choices"][0]["message"]["content"]
    assert body["variants"][1]["completion"] == b["choices"][0]["message"]["content"]


def test_seed_chosen_when_absent_and_prompt_shorthand(client):
    r = compare(client, prompt="Write a short poem about the sea.", messages=None,
                variants=[{"method": "none", "label": "base"}])
    body = r.json()
    assert r.status_code == 200, r.text
    assert isinstance(body["seed"], int)
    assert body["variants"][0]["label"] == "base"
    # the prompt is one user message: same as the messages form
    assert body["variants"][0]["completion"] == single(client)["choices"][0]["message"]["content"]


def test_refusal_score_and_timing_fields(client, tiny_lm):
    r = compare(client, variants=[{"method": "none"}, {"method": "actadd", "strength": 3.0}])
    body = r.json()
    assert body["prompt_tokens"] > 0 and body["time_s"] >= 0
    for v in body["variants"]:
        assert isinstance(v["refusal_score"], float) and math.isfinite(v["refusal_score"])
        assert isinstance(v["refusal_score_exact"], bool)
        assert v["time_s"] >= 0 and v["ttft_s"] is not None and v["ttft_s"] <= v["time_s"]
        assert 1 <= v["completion_tokens"] <= 8


def test_refusal_score_matches_forward_when_exact(client, tiny_lm):
    """With the score's tokens in the first position's top list it is the exact log-odds."""
    from steering.evaluation.refusal import refusal_score, refusal_token_ids
    from steering.interventions.activations import last_logits

    r = compare(client, variants=[{"method": "none"}])
    v = r.json()["variants"][0]
    ids = refusal_token_ids(tiny_lm.tokenizer)
    ref = float(refusal_score(last_logits(tiny_lm, [HELLO[0]["content"]]), ids)[0])
    if v["refusal_score_exact"]:
        assert v["refusal_score"] == pytest.approx(ref, abs=1e-3)
    else:  # a lower bound
        assert v["refusal_score"] <= ref + 1e-3


@pytest.mark.parametrize("variants, index, param", [
    ([{"method": "none"}, {"method": "bogus"}], 1, "variants[1].method"),
    ([{"method": "none"}, {"method": "actadd", "strength": 99}], 1, "variants[1].strength"),
    (["no-such-preset"], 0, "variants[0].preset"),
    ([{"method": "none"}, {"method": "none"}, {"method": "actadd", "k": 2}], 2,
     "variants[2].k"),
    ([{"method": "none"}, {"method": "inlp_flip", "k": 999}], 1, "variants[1].k"),
    ([{"method": "none"}, {"method": "actadd", "layers": [999]}], 1, "variants[1].layers"),
    ([{"method": "none"}, {"method": "actadd", "colour": "red"}], 1, "variants[1]"),
    ([{"method": "none"}, {"method": "actadd", "strength": "high"}], 1, "variants[1]"),
])
def test_bad_variant_names_the_variant(client, variants, index, param):
    r = compare(client, variants=variants)
    assert 400 <= r.status_code < 500, r.text
    err = r.json()["error"]
    assert f"variants[{index}]" in err["message"], err
    assert err["param"].startswith(param), err


def test_request_level_errors(client):
    r = compare(client, variants=[])
    assert r.status_code == 400 and r.json()["error"]["param"] == "variants"
    r = compare(client, variants=[{"method": "none"}] * 5)
    assert r.status_code == 400 and "at most 4 variants" in r.json()["error"]["message"]
    r = compare(client, variants=[{"method": "none"}], messages=None)
    assert r.status_code == 400
    r = compare(client, variants=[{"method": "none"}], prompt="hi", messages=HELLO)
    assert r.status_code == 400 and "either messages or prompt" in r.json()["error"]["message"]
    r = compare(client, variants=[{"method": "none"}], max_tokens=10_000)
    assert r.status_code == 400 and "variants[" not in r.json()["error"]["message"]
    r = compare(client, variants=[{"method": "none"}], model="other-model")
    assert r.status_code == 404
    r = client.post("/v1/steering/compare", json={"messages": HELLO})
    assert r.status_code == 400 and r.json()["error"]["param"] == "variants"


def test_playground_is_served(client):
    r = client.get("/playground")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "/playground/app.js" in r.text and "/playground/style.css" in r.text
    assert "http://" not in r.text and "https://" not in r.text  # no CDN
    for name, kind in (("app.js", "javascript"), ("style.css", "text/css")):
        r = client.get(f"/playground/{name}")
        assert r.status_code == 200 and kind in r.headers["content-type"]
    assert client.get("/playground/../server/app.py").status_code == 404
    assert client.get("/playground/secret.txt").status_code == 404


def test_compare_templates_the_prompt_once(client, tiny_lm, monkeypatch):
    """One chat template render and no tokenization on the event loop, however many variants
    (issue 12 finding 11)."""
    import asyncio

    renders: list[bool] = []
    cls = type(tiny_lm.tokenizer)
    real = cls.apply_chat_template

    def spy(self, *args, **kwargs):
        try:
            asyncio.get_running_loop()
            renders.append(True)
        except RuntimeError:
            renders.append(False)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cls, "apply_chat_template", spy)
    r = compare(client, variants=[{"method": "none"}, {"method": "actadd", "strength": 1.0},
                                  "no-refusal"], max_tokens=2)
    assert r.status_code == 200, r.text
    assert len(renders) == 1, renders  # main before the fix: 1 check + 1 per variant, on the loop
    assert renders == [False]


def test_compare_asks_logprobs_of_the_first_token_only(client, monkeypatch):
    """The refusal score reads the first token's top list: the engine is asked for nothing more
    (issue 12 finding 7)."""
    from server.api.compare import SCORE_TOP

    engine = client.app.state.steer.engine
    real = engine.submit
    asked = []

    def spy(request):
        asked.append(request.sampling)
        return real(request)

    monkeypatch.setattr(engine, "submit", spy)
    r = compare(client, variants=[{"method": "none"}, {"method": "actadd", "strength": 1.0}],
                max_tokens=4)
    assert r.status_code == 200, r.text
    assert len(asked) == 2
    for sp in asked:
        assert sp.logprobs and sp.top_logprobs == SCORE_TOP
        assert sp.logprobs_tokens == 1
