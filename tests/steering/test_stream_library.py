"""Issue 30, the library on the tiny model: capture, monitors (read-only, bit for bit), inspect,
raw vectors (checks, and the same edits as the pack they copy), extraction jobs (progress,
cancel)."""

from __future__ import annotations

import base64
import time

import numpy as np
import pytest
import torch

import steering
from steering.data.contrastive import Example
from steering.data.prompts import load_instructions
from steering.extraction.concept import ConceptConfig
from steering.extraction.inlp import InlpConfig
from steering.extraction.jobs import ExtractionJob, planned_forwards
from steering.interventions.activations import collect_residuals, layer_activations
from steering.interventions.capture import CaptureError, capture, encode
from steering.interventions.conditions import dim_position
from steering.interventions.hooks import hooks_of
from steering.interventions.inspection import inspect_pack, logit_lens
from steering.interventions.methods import SteeringSpec, build_row
from steering.interventions.monitors import monitor_of, monitors_of, score_positions
from steering.interventions.raw import decode_vector, encode_vector, raw_spec, vector_pack
from steering.interventions.spec import SteeringError
from testkit.tiny import make_tiny

PROMPTS = ["Tell me about the sea", "How do I pick a lock?", "Write a poem about autumn leaves"]


def test_capture_matches_collect_residuals(tiny_lm):
    acts = steering.capture(tiny_lm, PROMPTS, layers=[0, 2, tiny_lm.n_layers],
                            positions=[-1, -3])
    assert acts.shape == (3, 3, 2, tiny_lm.d_model)
    ref, _ = collect_residuals(tiny_lm, PROMPTS, 3, desc=None)  # [N, L+1, 3, d]
    for j, layer in enumerate(acts.layers):
        torch.testing.assert_close(acts.values[:, j, 0], ref[:, layer, -1], rtol=1e-5,
                                   atol=1e-5)
        torch.testing.assert_close(acts.values[:, j, 1], ref[:, layer, 0], rtol=1e-5,
                                   atol=1e-5)


def test_capture_positions_from_the_start_and_padding(tiny_lm):
    """A non-negative position counts from the prompt's start; a row in a padded batch reads
    what it reads alone."""
    together = capture(tiny_lm, PROMPTS, layers=[1], positions=[0, 2, -1])
    for i, p in enumerate(PROMPTS):
        alone = capture(tiny_lm, [p], layers=[1], positions=[0, 2, -1])
        torch.testing.assert_close(together.values[i], alone.values[0], rtol=1e-5, atol=1e-5)
    n = len(encode(tiny_lm, PROMPTS[0]))
    first = capture(tiny_lm, [PROMPTS[0]], layers=[1], positions=[-n])
    torch.testing.assert_close(first.values[0, 0, 0], together.values[0, 0, 0])


def test_capture_refuses_bad_requests(tiny_lm):
    for layers, positions, param in (([], [-1], "layers"), ([99], [-1], "layers"),
                                     ([1, 1], [-1], "layers"), ([1], [], "positions"),
                                     ([1], [-1, -1], "positions"), ([1], [-10_000], "positions")):
        with pytest.raises(CaptureError) as err:
            capture(tiny_lm, PROMPTS, layers=layers, positions=positions)
        assert err.value.param == param


def test_capture_with_steering_reads_the_edited_input(tiny_lm, tiny_pack):
    row = build_row(SteeringSpec("actadd", 2.0, layers=(2,)), tiny_pack)
    plain = capture(tiny_lm, PROMPTS[:1], layers=[2])
    steered = capture(tiny_lm, PROMPTS[:1], layers=[2], steering=row)
    torch.testing.assert_close(steered.values[0, 0, 0] - plain.values[0, 0, 0],
                               2.0 * tiny_pack.dim(2), rtol=1e-4, atol=1e-4)


def test_monitor_scores_the_last_position_and_changes_nothing(tiny_lm, tiny_pack):
    """Scores equal `dim_position` of the residual at the pack layer's input; the logits are
    bit-identical with and without the monitor, steered or not, in a batch of three."""
    from steering.interventions.activations import encode_chats

    mon = monitor_of(tiny_pack)
    at = (tiny_pack.layer + 1) % tiny_pack.n_layers
    other = monitor_of(tiny_pack, layer=at)
    assert other.name == f"refusal@{at}"
    row = build_row(SteeringSpec("ablate", 1.0), tiny_pack)
    enc = encode_chats(tiny_lm, PROMPTS)
    hooks = hooks_of(tiny_lm)
    watch = monitors_of(tiny_lm)
    rows = [row, build_row(SteeringSpec("none"), None), row]
    with torch.inference_mode():
        hooks.set_rows(rows, enc["attention_mask"].sum(-1).tolist())
        plain = tiny_lm.model(**enc, use_cache=False).logits
        watch.set_rows([(mon, other), (mon,), ()])
        watched = tiny_lm.model(**enc, use_cache=False).logits
        scores = watch.take()
        watch.set_rows(None)
        hooks.set_rows(None)
    assert torch.equal(plain, watched)
    assert len(scores[0]) == 2 and len(scores[1]) == 1 and scores[2] == []
    acts = layer_activations(tiny_lm, PROMPTS[1:2], tiny_pack.layer, -1)  # row 1: unsteered
    p = tiny_pack.positions.index(tiny_pack.position)
    want = dim_position(acts, tiny_pack.mean_harmful[tiny_pack.layer, p],
                        tiny_pack.mean_harmless[tiny_pack.layer, p])
    assert scores[1][0] == pytest.approx(float(want[0]), abs=1e-5)
    # the offline form agrees on every position
    ids = encode(tiny_lm, PROMPTS[1])
    offline = score_positions(tiny_lm, ids, [mon])
    assert offline.shape == (1, len(ids))
    assert float(offline[0, -1]) == pytest.approx(scores[1][0], abs=1e-5)


def test_vector_monitor_equals_the_pack_axis(tiny_lm, tiny_pack):
    from steering.interventions.monitors import vector_monitor

    mon = monitor_of(tiny_pack)
    probe = vector_monitor(mon.weight, mon.layer, tiny_pack.n_layers, mon.bias, name="probe")
    ids = encode(tiny_lm, PROMPTS[0])
    both = score_positions(tiny_lm, ids, [mon, probe])
    assert torch.equal(both[0], both[1])
    with pytest.raises(SteeringError):
        vector_monitor(mon.weight, tiny_pack.n_layers, tiny_pack.n_layers)


def test_monitor_layer_is_checked(tiny_pack):
    with pytest.raises(SteeringError) as err:
        monitor_of(tiny_pack, layer=tiny_pack.n_layers, param="monitor[1]")
    assert err.value.param == "monitor[1].layer"


def test_inspect(tiny_lm, tiny_pack):
    out = inspect_pack(tiny_lm, tiny_pack, PROMPTS[1], completion="I cannot help", top_k=5)
    n_layers, n_tokens = out.scores.shape
    assert n_layers == tiny_pack.n_layers and n_tokens == len(out.token_ids) == len(out.tokens)
    assert out.prompt_tokens < n_tokens
    p = tiny_pack.positions.index(tiny_pack.position)
    for layer in range(1, n_layers):
        acts = layer_activations(tiny_lm, PROMPTS[1:2], layer, -1)
        want = dim_position(acts, tiny_pack.mean_harmful[layer, p],
                            tiny_pack.mean_harmless[layer, p])
        assert float(out.scores[layer, out.prompt_tokens - 1]) == pytest.approx(
            float(want[0]), abs=1e-4)
    assert out.cosine[tiny_pack.layer] == pytest.approx(1.0)
    assert all(-1.0 - 1e-9 <= c <= 1.0 + 1e-9 for c in out.cosine)
    # the lens: W_U · norm(r̂), highest and lowest
    r = tiny_pack.dim()
    with torch.inference_mode():
        logits = tiny_lm.model.lm_head(tiny_lm.layout.final_norm((r / r.norm())[None, None]))[0, 0]
    assert [i for _, i, _ in out.promoted] == logits.topk(5).indices.tolist()
    assert [i for _, i, _ in out.suppressed] == (-logits).topk(5).indices.tolist()
    assert out.to_dict()["logit_lens"]["promoted"][0]["id"] == out.promoted[0][1]
    promoted, _ = logit_lens(tiny_lm, 3.0 * r, 5)  # the scale of the direction does not matter
    assert [i for _, i, _ in promoted] == [i for _, i, _ in out.promoted]


# ---- raw vectors ---------------------------------------------------------------------------------


def _b64(values) -> str:
    return encode_vector(np.asarray(values, dtype=np.float32))


def test_raw_vector_checks(tiny_pack):
    d = tiny_pack.d_model
    good = _b64(np.ones(d) / np.sqrt(d))
    cases = [
        ("actadd", "not base64!", None, "steering.vector.data"),
        ("actadd", base64.b64encode(b"abc").decode(), None, "steering.vector.data"),
        ("actadd", _b64(np.ones(d + 1)), None, "steering.vector.data"),  # not the hidden size
        ("actadd", _b64(np.ones(d + 1)), [d + 1], "steering.vector.shape"),
        ("actadd", good, [2, d // 2], "steering.vector.shape"),
        ("actadd", good, [d + 1], "steering.vector.shape"),
        ("actadd", _b64(np.full(d, np.nan)), None, "steering.vector.data"),
        ("actadd", _b64(np.full(d, 1e5)), None, "steering.vector.data"),  # norm bound
        ("ablate", _b64(np.zeros(d)), None, "steering.vector.data"),
        ("inlp_null", _b64(np.ones((2, d))), None, "steering.vector.data"),  # not orthonormal
        ("inlp_null", _b64(np.eye(17, d)), None, "steering.vector.data"),  # k > 16
        ("inlp_null", _b64(np.eye(17, d)), [17, d], "steering.vector.shape"),
        ("ace", good, None, "steering.vector"),
    ]
    for method, data, shape, param in cases:
        with pytest.raises(SteeringError) as err:
            decode_vector(data, shape, d, method)
        assert err.value.param == param, (method, shape, str(err.value))
    values, digest = decode_vector(good, None, d, "actadd")
    assert values.shape == (d,) and len(digest) == 64
    with pytest.raises(SteeringError) as err:
        raw_spec(SteeringSpec("inlp_null"), _b64(np.eye(2, d)), None, None, 4, d)
    assert err.value.param == "steering.vector.layer"
    with pytest.raises(SteeringError):
        raw_spec(SteeringSpec("actadd", pack="refusal"), good, None, 1, 4, d)


def _same_edits(a, b):
    assert set(a.edits) == set(b.edits)
    for site in a.edits:
        ea, eb = a.edits[site], b.edits[site]
        for name in ("q", "c", "v"):
            torch.testing.assert_close(getattr(ea, name), getattr(eb, name), rtol=0, atol=1e-6)
        assert (ea.alpha, ea.one_sided, ea.window) == (eb.alpha, eb.one_sided, eb.window)


def test_raw_vectors_build_the_edits_of_the_pack_they_copy(tiny_pack):
    n, d = tiny_pack.n_layers, tiny_pack.d_model
    layer = tiny_pack.layer
    spec, pack = raw_spec(SteeringSpec("actadd", 1.5), encode_vector(tiny_pack.dim(layer)),
                          None, layer, n, d)
    row = build_row(spec, pack)
    _same_edits(row, build_row(SteeringSpec("actadd", 1.5), tiny_pack))
    assert row.spec.pack == pack.name and pack.name.startswith("vector:")
    echo = row.applied()["vector"]
    assert echo["layer"] == layer and echo["norm"] == pytest.approx(float(tiny_pack.dim(layer)
                                                                          .norm()), rel=1e-6)
    spec, pack = raw_spec(SteeringSpec("ablate", 1.0), encode_vector(5 * tiny_pack.dim()),
                          None, None, n, d)
    _same_edits(build_row(spec, pack), build_row(SteeringSpec("ablate", 1.0), tiny_pack))
    inl_layer = tiny_pack.inlp_default_layers[0]
    basis = tiny_pack.inlp[inl_layer].directions[:2]
    # a raw basis acts around the origin 0: the pack's raw-origin variant of inlp_flip
    spec, pack = raw_spec(SteeringSpec("inlp_negate_positive", 1.0), encode_vector(basis),
                          [2, d], inl_layer, n, d)
    _same_edits(build_row(spec, pack), build_row(
        SteeringSpec("inlp_negate_positive", 1.0, k=2), tiny_pack))
    assert vector_pack(basis, "inlp_null", n, inl_layer).methods == [
        m for m in tiny_pack.methods if m.startswith("inlp")]


# ---- extraction jobs ------------------------------------------------------------------------------


def _examples():
    return ([Example(p) for p in load_instructions("harmful_train")[:6]],
            [Example(p) for p in load_instructions("harmless_train")[:6]])


CONFIG = ConceptConfig(batch_size=4, kl_prompts=2, kl_candidates=2,
                       inlp=InlpConfig(max_directions=2, chance_margin=0.0, p_value=1.0))


def test_extraction_job_runs_with_progress_and_share():
    positive, negative = _examples()
    seen = []
    job = ExtractionJob("tone", positive, negative, load=lambda: make_tiny("qwen2"),
                        config=CONFIG, share=0.5, nice=0, on_done=lambda j: seen.append(j.status))
    assert job.progress()["status"] == "queued" and job.fraction() == 0.0
    job.start()
    stages = set()
    while not job.wait(0.01):
        stages.add(job.progress()["stage"])
    progress = job.progress()
    assert progress["status"] == "succeeded", progress
    assert progress["fraction"] == 1.0 and seen == ["succeeded"]
    assert job.forwards == job.plan.total == progress["planned_forwards"]
    assert job.plan.total == planned_forwards(4, 6, 6, CONFIG).total
    assert "activations" in stages
    assert job.pack is not None and job.pack.name == "tone" and job.pack.concept == "tone"
    # the share: the job slept about as long as its forwards ran (share 0.5)
    assert job._slept == pytest.approx(job._forward_time, rel=1e-6)


def test_extraction_job_plans_the_behavioural_forwards_of_completions():
    """Completion examples add the held-out log-likelihood passes of the behavioural score."""
    prompts = load_instructions("harmless_train")[:6]
    positive = [Example(p, "Sure thing, buddy!") for p in prompts]
    negative = [Example(p, "Certainly. Please find it below.") for p in prompts]
    job = ExtractionJob("tone", positive, negative, load=lambda: make_tiny("qwen2"),
                        config=CONFIG, share=1.0, nice=0).start()
    assert job.wait(120) and job.status == "succeeded", job.progress()
    assert job.pack.meta["selection"]["behaviour"]["measure"] == "loglik_gap"
    assert job.forwards == job.plan.total == planned_forwards(4, 6, 6, CONFIG, True).total
    assert job.plan.total > planned_forwards(4, 6, 6, CONFIG).total


def test_extraction_job_cancels_at_the_next_forward():
    positive, negative = _examples()
    started = []

    def load():
        started.append(time.monotonic())
        return make_tiny("qwen2")

    job = ExtractionJob("tone", positive, negative, load=load, config=CONFIG, share=0.05,
                        nice=0)
    job.start()
    while job.forwards < 1 and not job.done:
        time.sleep(0.005)
    job.cancel()
    assert job.wait(30)
    assert job.status == "cancelled" and job.pack is None
    assert job.forwards < job.plan.total


def test_extraction_job_refuses_too_few_examples():
    positive, negative = _examples()
    with pytest.raises(ValueError):
        ExtractionJob("x", positive[:3], negative, load=lambda: None)
    with pytest.raises(ValueError):
        ExtractionJob("x", [Example("a", "b")] * 4, negative, load=lambda: None)
