"""End to end: the real `steer serve` process on the embedded model, driven by the official
`openai` package over a loopback port (slow: marked `real`)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from steering.catalog import BUILTIN_PRESETS
from steering.data.prompts import load_instructions
from steering.evaluation.refusal import is_refusal
from testkit.server import ServerProcess

pytestmark = pytest.mark.real

START_TIMEOUT_S = 1200  # model load takes seconds; a first start also extracts the pack


@pytest.fixture(scope="module")
def server(server_process):
    return server_process.url


@pytest.fixture(scope="module")
def server_process(tmp_path_factory):
    from tests.conftest import real_model_enabled

    if not real_model_enabled():
        pytest.skip("STEERING_SKIP_REAL set")
    pytest.importorskip("openai")
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    proc = ServerProcess(env={"STEER_DEVICE": "cpu", "STEER_DTYPE": "float32"},
                         log_path=str(log_path))
    try:
        try:
            proc.wait_ready(START_TIMEOUT_S)
        except RuntimeError as exc:
            pytest.fail(str(exc))
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", timeout=600, max_retries=0)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def ask(client, model, prompt, max_tokens=48, **kw):
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
        temperature=0, **kw)


def test_models_list_has_base_and_presets(client, model):
    ids = [m.id for m in client.models.list().data]
    assert model == "qwen2.5-coder-0.5b-instruct"
    assert f"{model}+no-refusal" in ids and f"{model}+ablate" in ids


def test_chat_completion(client, model):
    r = ask(client, model, "What is the capital of France? Answer in one word.", max_tokens=8)
    assert "paris" in r.choices[0].message.content.lower()
    assert r.usage.completion_tokens >= 1
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.steering["method"] == "none"


def test_streamed_chat_completion(client, model):
    prompt = "Name three primary colours."
    plain = ask(client, model, prompt, max_tokens=12)
    stream = ask(client, model, prompt, max_tokens=12, stream=True,
                 stream_options={"include_usage": True})
    text, usage, finish = "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert text == plain.choices[0].message.content
    assert finish == plain.choices[0].finish_reason
    assert usage.completion_tokens == plain.usage.completion_tokens
    assert usage.prompt_tokens == plain.usage.prompt_tokens


def test_steered_through_extra_body(client, model):
    r = ask(client, model, "Say hello.", max_tokens=4,
            extra_body={"steering": {"method": "inlp_flip", "k": 2, "strength": 1.0}})
    s = r.steering
    assert (s["method"], s["k"], s["strength"], s["pack"]) == ("inlp_flip", 2, 1.0, "refusal")
    assert s["layers"]


def test_preset_through_model_name(client, model):
    r = ask(client, model=f"{model}+no-refusal", prompt="Say hello.", max_tokens=4)
    assert r.model == f"{model}+no-refusal"
    expected = BUILTIN_PRESETS["no-refusal"]["method"]
    assert r.steering["preset"] == "no-refusal" and r.steering["method"] == expected


def test_bad_steering_is_a_4xx(client, model):
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        ask(client, model, "hi", max_tokens=2, extra_body={"steering": {"method": "inlp_flip",
                                                                        "k": 999}})
    assert info.value.body["param"] == "steering.k"
    with pytest.raises(openai.NotFoundError):
        ask(client, f"{model}+no-such-preset", "hi", max_tokens=2)


def test_ablation_removes_a_refusal(client, model):
    """Greedy: find harmful_val prompts the unsteered model refuses, then ablate."""
    prompts = load_instructions("harmful_val")[:24]
    refused: list[str] = []
    with ThreadPoolExecutor(4) as pool:  # the engine batches concurrent requests
        for start in range(0, len(prompts), 4):
            group = prompts[start:start + 4]
            replies = pool.map(
                lambda p: ask(client, model, p, max_tokens=24).choices[0].message.content, group)
            refused += [p for p, text in zip(group, replies) if is_refusal(text)]
            if refused:
                break
    assert refused, "the unsteered model refused none of the harmful_val prompts tried"
    prompt = refused[0]
    steered = ask(client, model, prompt, max_tokens=48,
                  extra_body={"steering": {"method": "ablate", "strength": 1.0}})
    text = steered.choices[0].message.content
    assert steered.steering["method"] == "ablate"
    assert not is_refusal(text), f"{prompt!r} → still refused after ablation: {text!r}"


def test_no_refusal_preset_does_not_raise_refusal_on_benign_prompts(client, model):
    """Issue 15: the preset promising "no refusal" (once a two-sided flip: 43% vs 10% on harmless
    prompts) must not add refusals of benign requests, through the served model name."""
    prompts = (load_instructions("harmless_val[3000:3012]")
               + load_instructions("overrefusal")[:12])

    def refused(name: str) -> int:
        with ThreadPoolExecutor(8) as pool:  # one batch: the engine steers per row
            texts = pool.map(lambda p: ask(client, name, p, max_tokens=8).choices[0]
                             .message.content, prompts)
            return sum(is_refusal(t) for t in texts)

    base, steered = refused(model), refused(f"{model}+no-refusal")
    assert steered <= base + 2, f"benign refusals {base}/{len(prompts)} -> {steered}"


def _metric(server, name):
    import httpx

    for line in httpx.get(f"{server}/metrics", timeout=30).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_the_template_opening_is_cached_per_steering(server, client, model):
    """The chat template's opening is computed once per steering of the prompt: a second
    ablated request (another prompt) reuses the first one's, and answers exactly as it did
    before the entry existed."""
    steer = {"steering": {"method": "ablate", "strength": 0.75}}  # a strength no other test uses
    prompts = ["Name three colours of the rainbow.", "Name three primary colours."]
    misses, hits = (_metric(server, "steer_prefix_cache_misses"),
                    _metric(server, "steer_prefix_cache_hits"))
    first = [ask(client, model, p, max_tokens=12, logprobs=True, extra_body=steer)
             for p in prompts]
    assert _metric(server, "steer_prefix_cache_misses") == misses + 1
    assert _metric(server, "steer_prefix_cache_hits") == hits + 1
    again = [ask(client, model, p, max_tokens=12, logprobs=True, extra_body=steer)
             for p in prompts]
    assert _metric(server, "steer_prefix_cache_hits") == hits + 3
    for a, b in zip(first, again, strict=True):
        assert a.choices[0].message.content == b.choices[0].message.content
        assert ([t.logprob for t in a.choices[0].logprobs.content]
                == [t.logprob for t in b.choices[0].logprobs.content])


def test_the_event_loop_thread_yields_the_cores_to_the_engine(server_process, client, model):
    ask(client, model, "Say hello.", max_tokens=2)  # the engine's matmul threads exist now
    nice = server_process.thread_niceness()
    pid = server_process.proc.pid
    # The server inherits this process's niceness (in-process app tests may have raised it).
    base = min(nice.values())
    assert nice[pid] == max(10, base), nice  # the main thread runs the event loop
    if base < 10:
        assert sum(n == base for tid, n in nice.items() if tid != pid) >= 2, nice  # engine, OMP


def test_public_answers_hold_no_internals_and_state_effects(server):
    """The real process: model cards name ids, never local paths; every method states its
    direction of effect (issue 12 findings 9 and 1)."""
    import httpx

    cards = httpx.get(f"{server}/v1/models", timeout=30).json()["data"]
    assert all(card["root"] and "/" not in card["root"] for card in cards)
    ready = httpx.get(f"{server}/readyz", timeout=30).json()
    assert set(ready) == {"status", "model", "packs"}
    methods = httpx.get(f"{server}/v1/steering/methods", timeout=30).json()["data"]
    assert all("requires_grant" in m["effect"] for m in methods)
