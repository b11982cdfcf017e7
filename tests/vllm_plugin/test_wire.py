"""A request's steering as it rides to vLLM's workers (extra_args) and its prefix-cache salt."""

from __future__ import annotations

import json

import pytest
import torch

from steering.interventions.conditions import decide
from steering.interventions.methods import (
    Condition,
    SteeringError,
    SteeringSpec,
    build_row,
    compose,
)
from steering.vllm import check_version, wire
from steering.vllm.packs import PackResolver, pack_paths


def _same_edits(a, b):
    assert len(a.parts) == len(b.parts)
    for p, q in zip(a.parts, b.parts):
        assert p.spec == q.spec and set(p.edits) == set(q.edits)
        for site, e in p.edits.items():
            f = q.edits[site]
            assert torch.equal(e.q, f.q) and torch.equal(e.c, f.c) and torch.equal(e.v, f.v)
            assert (e.alpha, e.one_sided, e.window) == (f.alpha, f.one_sided, f.window)


@pytest.mark.parametrize("specs", [
    [dict(method="ablate")],
    [dict(method="actadd", strength=1.5, layers=(1, 2))],
    [dict(method="inlp_flip", k=2, apply_to="prompt")],
    [dict(method="ace", strength=0.25), dict(method="actadd", generation_window=(2, 5))],
    [dict(method="inlp_reflect", generation_window=(3, None))],
])
def test_round_trip_rebuilds_the_same_edits(tiny_pack, specs):
    row = compose([build_row(SteeringSpec(**s), tiny_pack) for s in specs])
    sent = wire.extra_args(row)
    assert json.loads(json.dumps(sent)) == sent  # plain JSON: msgpack-able in extra_args
    _same_edits(row, wire.decode(sent[wire.KEY], {"refusal": tiny_pack}))


def test_unsteered_sends_nothing_and_shares_the_plain_cache(tiny_pack):
    none = build_row(SteeringSpec(), tiny_pack)
    assert wire.extra_args(none) == {} and wire.cache_salt(none) is None
    assert wire.cache_salt(None) is None


def test_salt_follows_the_settings(tiny_pack):
    a = build_row(SteeringSpec(method="ablate"), tiny_pack)
    b = build_row(SteeringSpec(method="ablate"), tiny_pack)
    c = build_row(SteeringSpec(method="ablate", strength=0.5), tiny_pack)
    assert wire.cache_salt(a) == wire.cache_salt(b) != wire.cache_salt(c)


def test_conditions_travel_decided(tiny_pack):
    """The server decides conditions before vLLM sees the request (vllm_engine.py): an undecided
    one never goes on the wire, a part that held goes as a plain part, one that did not is not
    sent at all."""
    row = compose([build_row(SteeringSpec(method="ablate"), tiny_pack),
                   build_row(SteeringSpec(method="actadd", when=Condition(above=0.5)), tiny_pack)])
    with pytest.raises(ValueError, match="decide the conditions first"):
        wire.encode(row)
    held = decide(row, {1: 0.9})
    assert [p["method"] for p in wire.encode(held)] == ["ablate", "actadd"]
    missed = decide(row, {1: 0.1})
    assert [p["method"] for p in wire.encode(missed)] == ["ablate"]
    assert wire.cache_salt(missed) == wire.cache_salt(compose([row.parts[0]]))


def test_worker_resolver_loads_named_packs_and_caches(tiny_pack, tmp_path):
    path = str(tiny_pack.save(tmp_path / "refusal"))
    assert pack_paths(json.dumps({"refusal": path})) == {"refusal": path}
    resolver = PackResolver({"refusal": path}, d_model=tiny_pack.d_model,
                            n_layers=tiny_pack.n_layers)
    sent = wire.encode(build_row(SteeringSpec(method="ablate"), tiny_pack))
    first = resolver.resolve(sent)
    assert resolver.resolve(json.loads(json.dumps(sent))) is first
    with pytest.raises(SteeringError, match="no steering pack named 'other'"):
        resolver.resolve([{**sent[0], "pack": "other"}])
    wrong = PackResolver({"refusal": path}, d_model=tiny_pack.d_model + 1)
    with pytest.raises(ValueError, match="hidden size"):
        wrong.resolve(sent)


def test_version_check():
    assert check_version("0.32.0") == "0.32.0"
    with pytest.raises(RuntimeError, match="supports vLLM 0.32.x"):
        check_version("0.33.1")


def test_cuda_graph_settings_split_at_the_steering_ops():
    """On CUDA the engine runs piecewise graphs split at the steering ops (graphs.py); the names
    are those the ops are registered under, and vLLM's config accepts the settings."""
    import torch

    CompilationConfig = pytest.importorskip("vllm.config").CompilationConfig

    from steering.vllm import graphs, ops

    ops.register()
    for name in graphs.STEERING_OPS:
        namespace, _, op = name.partition("::")
        assert hasattr(getattr(torch.ops, namespace), op)
    config = CompilationConfig(**graphs.compilation_config())
    assert str(config.cudagraph_mode).endswith("PIECEWISE")
    assert set(graphs.STEERING_OPS) <= set(config.splitting_ops)
    assert "vllm::unified_attention_with_output" in config.splitting_ops
