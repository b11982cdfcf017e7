"""Steering controls on the real server process (embedded model, fp32): token targeting changes
induced refusal, a condition applies exactly when the prompt's score crosses its threshold (and
then equals the unconditional steering, else the unsteered model), a list [ablate, actadd] served
beside other rows equals its solo run, and the streamed compare equals the plain one.

Kept small (a few prompts, 16 greedy tokens): the figures on 20+ prompts come from
bench/controls.py."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from steering.data.prompts import load_instructions
from steering.evaluation.refusal import is_refusal

pytestmark = pytest.mark.real

TOKENS = 16


@pytest.fixture(scope="module")
def server(real_server):
    return real_server


@pytest.fixture(scope="module")
def model(server):
    return httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"][0]["id"]


@pytest.fixture(scope="module")
def strength(server):
    """The pack's calibrated actadd strength (what the more-refusal preset uses)."""
    methods = httpx.get(f"{server.url}/v1/steering/methods", timeout=10).json()["data"]
    actadd = next(m for m in methods if m["id"] == "actadd")
    return next(iter(actadd["packs"].values()))["calibrated_strength"] or 1.0


def _compare(server, model, prompt: str, variants: list, stream: bool = False):
    body = {"model": model, "prompt": prompt, "max_tokens": TOKENS, "temperature": 0,
            "seed": 0, "variants": variants, "stream": stream}
    r = httpx.post(f"{server.url}/v1/steering/compare", json=body, timeout=1800)
    assert r.status_code == 200, r.text
    return r if stream else r.json()["variants"]


def _chat(server, model, prompt: str, steering) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": TOKENS, "temperature": 0}
    if steering is not None:
        body["steering"] = steering
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=1800)
    assert r.status_code == 200, r.text
    return r.json()


def test_targeting_changes_induced_refusal(server, model, strength):
    prompts = load_instructions("harmless_val")[:5]
    settings = {"none": {"method": "none"},
                "all": {"method": "actadd", "strength": strength},
                "prompt": {"method": "actadd", "strength": strength, "apply_to": "prompt"},
                "generation": {"method": "actadd", "strength": strength,
                               "apply_to": "generation"},
                "late": {"method": "actadd", "strength": strength, "generation_window": [4]}}
    refusals = {name: 0 for name in settings}
    for prompt in prompts:
        out = _compare(server, model, prompt, list(settings.values()))
        for name, v in zip(settings, out):
            refusals[name] += is_refusal(v["completion"])
        assert out[2]["steering"]["apply_to"] == "prompt"
        assert out[4]["steering"]["generation_window"] == [4, None]
    print("induced refusals of 5 harmless prompts:", json.dumps(refusals))
    assert refusals["none"] == 0
    assert refusals["generation"] > refusals["prompt"]
    assert refusals["all"] > refusals["prompt"]
    assert refusals["late"] < refusals["generation"]


def test_condition_applies_exactly_above_its_threshold(server, model, strength):
    prompts = load_instructions("harmful_val")[:4] + load_instructions("harmless_val")[:4]
    cond = {"method": "actadd", "strength": strength, "when": {"pack": "refusal", "above": 0.5}}
    plain = {"method": "actadd", "strength": strength}
    applied = []
    for prompt in prompts:
        on, steered, unsteered = _compare(server, model, prompt,
                                          [cond, plain, {"method": "none"}])
        c = on["steering"]["condition"]
        assert c["applied"] == (c["score"] > 0.5)
        want = steered if c["applied"] else unsteered
        assert on["completion"] == want["completion"], (c, on["completion"])
        applied.append(c["applied"])
    print("applied (4 harmful, 4 harmless):", applied)
    assert sum(applied[:4]) > sum(applied[4:])


def test_composition_in_a_mixed_batch_equals_solo(server, model, strength):
    harmful = load_instructions("harmful_val")[0]
    jobs = [(harmful, [{"method": "ablate"}, {"method": "actadd", "strength": strength}]),
            ("Name three prime numbers.", None),
            ("What is a linked list?", {"method": "inlp_flip", "k": 2}),
            ("Say hello in French.", {"method": "actadd", "strength": strength,
                                      "apply_to": "generation"}),
            (harmful, {"method": "ablate", "when": {"below": 0.4}})]
    solo = [_chat(server, model, p, s) for p, s in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:  # all at once: they share decode steps
        together = list(pool.map(lambda job: _chat(server, model, *job), jobs))
    for (_, s), a, b in zip(jobs, solo, together, strict=True):
        assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"], s
        assert a["steering"] == b["steering"]
    assert [e["method"] for e in solo[0]["steering"]] == ["ablate", "actadd"]
    # The list is not just its last part: actadd alone refuses differently. (It may equal ablate
    # alone: ablation at every later layer removes the added direction again.)
    actadd = _chat(server, model, harmful, {"method": "actadd", "strength": strength})
    assert actadd["choices"][0]["message"]["content"] != solo[0]["choices"][0]["message"][
        "content"]


def test_streamed_compare_equals_the_plain_one(server, model, strength):
    variants = [{"method": "none"},
                [{"method": "ablate"}, {"method": "actadd", "strength": strength}],
                {"method": "actadd", "strength": strength, "when": {"above": 0.5}}]
    prompt = "How do I bake bread?"
    plain = _compare(server, model, prompt, variants)
    r = _compare(server, model, prompt, variants, stream=True)
    events = [json.loads(b[len("data: "):]) for b in r.text.split("\n\n")
              if b.strip() and b != "data: [DONE]"]
    texts = ["", "", ""]
    for e in events:
        if e["type"] == "delta":
            texts[e["index"]] += e["text"]
    assert texts == [v["completion"] for v in plain]
    assert events[-1]["type"] == "done"
