"""clients.steering_client against the tiny-model app served over real HTTP (uvicorn in a thread):
chat, streaming, compare, presets and errors, sync and async."""

from __future__ import annotations

import asyncio

import pytest

from clients import (
    AsyncSteeringClient,
    CompareResult,
    Condition,
    Steering,
    SteeringClient,
    SteeringServerError,
)
from server.app import create_app
from server.settings import Settings
from testkit.live import serve_in_thread

MODEL = "tiny-qwen2"
PROMPT = "Write a short poem about the sea."
GREEDY = dict(max_tokens=6, temperature=0)


@pytest.fixture(scope="module")
def url(tiny_lm, tiny_pack):
    app = create_app(Settings(max_tokens_limit=64, access_log=False, strength_min=-4.0,
                              strength_max=4.0), lm=tiny_lm, packs=[tiny_pack])
    with serve_in_thread(app) as u:
        yield u


@pytest.fixture
def client(url):
    with SteeringClient(url) as c:
        yield c


def test_steering_to_dict():
    assert Steering().to_dict() == {"method": "none"}
    assert Steering("inlp_flip", strength=1.5, k=2, layers=[1]).to_dict() == {
        "method": "inlp_flip", "strength": 1.5, "k": 2, "layers": [1]}


def test_steering_controls_to_dict():
    s = Steering("actadd", strength=2, generation_window=(0, None), when=Condition(above=0.5))
    assert s.to_dict() == {"method": "actadd", "strength": 2, "generation_window": [0, None],
                           "when": {"above": 0.5}}
    assert Steering("ablate", apply_to="prompt").to_dict() == {"method": "ablate",
                                                               "apply_to": "prompt"}


def test_lists_conditions_and_the_streamed_compare(client):
    both = [Steering("ablate"), Steering("actadd", strength=2.0, when=Condition(above=-50))]
    res = client.chat(PROMPT, steering=both, **GREEDY)
    assert [s["method"] for s in res.steering] == ["ablate", "actadd"]
    assert res.steering[1]["condition"]["applied"] is True
    events = list(client.stream_compare(PROMPT, [Steering(), both], **GREEDY))
    assert events[0].type == "start" and events[-1].type == "done"
    results = {e.index: e.result for e in events if e.type == "variant"}
    texts = {i: "".join(e.text for e in events if e.type == "delta" and e.index == i)
             for i in results}
    assert texts[1] == results[1].completion == res.text
    assert events[-1].compare.variants[1].steering == results[1].steering


def test_models_and_presets(client):
    ids = [m["id"] for m in client.models()]
    assert ids[0] == MODEL
    assert client.model() == MODEL
    assert "no-refusal" in client.presets()


def test_chat_and_stream_agree(client):
    res = client.chat(PROMPT, steering=Steering("actadd", strength=2.0), **GREEDY)
    assert res.steering["method"] == "actadd" and res.steering["strength"] == 2.0
    assert res.usage["completion_tokens"] >= 1 and res.model == MODEL
    deltas = list(client.stream_chat(PROMPT, steering=Steering("actadd", strength=2.0),
                                     **GREEDY))
    assert deltas and "".join(deltas) == res.text


def test_preset_and_override(client):
    res = client.chat([{"role": "user", "content": PROMPT}], preset="no-refusal", **GREEDY)
    assert res.steering["preset"] == "no-refusal" and res.model == f"{MODEL}+no-refusal"
    res = client.chat(PROMPT, preset="no-refusal", steering={"strength": 0.5}, **GREEDY)
    assert res.steering["preset"] == "no-refusal" and res.steering["strength"] == 0.5


def test_compare_matches_chat(client):
    variants = ["no-refusal", Steering("none"), {"method": "ablate"}]
    cmp = client.compare(PROMPT, variants, seed=7, **GREEDY)
    assert isinstance(cmp, CompareResult) and len(cmp) == 3 and cmp.seed == 7
    assert [v.index for v in cmp] == [0, 1, 2]
    assert cmp.variants[0].steering["preset"] == "no-refusal"
    assert cmp.variants[1].completion == client.chat(PROMPT, steering=Steering("none"),
                                                     **GREEDY).text
    for v in cmp:
        assert isinstance(v.is_refusal, bool) and v.completion_tokens >= 1 and v.time_s >= 0


def test_errors_carry_the_servers_fields(client):
    with pytest.raises(SteeringServerError) as e:
        client.compare(PROMPT, [Steering("none"), Steering("bogus")], **GREEDY)
    assert e.value.status == 400 and e.value.param == "variants[1].method"
    with pytest.raises(SteeringServerError) as e:
        client.chat(PROMPT, steering=Steering("actadd", strength=99), **GREEDY)
    assert e.value.status == 400 and e.value.param == "steering.strength"
    with pytest.raises(SteeringServerError) as e:
        list(client.stream_chat(PROMPT, preset="no-such-preset", **GREEDY))
    assert e.value.status == 404


def test_async_client(url):
    async def go():
        async with AsyncSteeringClient(url) as c:
            assert await c.model() == MODEL
            assert "no-refusal" in await c.presets()
            res = await c.chat(PROMPT, steering=Steering("actadd", strength=2.0), **GREEDY)
            deltas = [d async for d in c.stream_chat(
                PROMPT, steering=Steering("actadd", strength=2.0), **GREEDY)]
            assert "".join(deltas) == res.text
            single, cmp = await asyncio.gather(
                c.chat(PROMPT, steering=Steering("ablate"), **GREEDY),
                c.compare(PROMPT, [Steering("ablate"), "no-refusal"], **GREEDY))
            assert cmp.variants[0].completion == single.text
            with pytest.raises(SteeringServerError):
                await c.compare(PROMPT, [], **GREEDY)

    asyncio.run(go())


@pytest.mark.parametrize("script, arg", [("openai_sdk.py", "/v1"),
                                         ("steering_client_demo.py", "")])
def test_examples_run_against_the_server(url, script, arg):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    if script == "openai_sdk.py":
        pytest.importorskip("openai", reason="the openai SDK is not installed")
    out = subprocess.run([sys.executable, str(root / "clients" / "examples" / script), url + arg],
                         cwd=root, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip()


def test_litellm_config_routes_to_presets():
    from pathlib import Path

    import yaml

    from server.presets import DEFAULT_PRESETS

    path = Path(__file__).resolve().parents[2] / "clients" / "examples" / "litellm.yaml"
    config = yaml.safe_load(path.read_text())
    routed = {m["litellm_params"]["model"].split("+", 1)[1]
              for m in config["model_list"] if "+" in m["litellm_params"]["model"]}
    assert routed and routed <= set(DEFAULT_PRESETS)
    assert all(m["litellm_params"]["model"].startswith("openai/") for m in config["model_list"])
