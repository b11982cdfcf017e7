"""The vLLM plugin's step plan and ops against the native kernel, without vLLM (tiny pack).

A step's flat batch mixes a prefill chunk, decode tokens and unsteered requests; every steered
token must come out as the native kernel computes it for its request alone (bit for bit), and
every other token must be left untouched.
"""

from __future__ import annotations

import pytest
import torch

from steering.interventions.kernel import BatchEdit, apply_edit
from steering.interventions.methods import SteeringSpec, build_row, compose
from steering.vllm import ops
from steering.vllm.plan import Planner, Scheduled, site_id


def _row(pack, **kw):
    return build_row(SteeringSpec(**kw), pack)


def _native(steering, x: torch.Tensor, site, index: torch.Tensor) -> torch.Tensor:
    """One request alone, as `SteeringHooks._run` edits it: x [T, d] at token indices [T]."""
    y = x.float()[None]
    for part in steering.parts:
        edit = part.edits.get(site) if part.active else None
        if edit is not None:
            y = apply_edit(y, BatchEdit.stack([edit], x.device), token_index=index[None])
    return y[0].to(x.dtype)


def _apply(plan, site, hidden, residual):
    ops.CURRENT.plan = plan
    try:
        if residual is None:
            ops.steer_write_(hidden, site_id(site))
        else:
            ops.steer_stream_(hidden, residual, site_id(site))
    finally:
        ops.CURRENT.plan = None


@pytest.fixture(scope="module")
def requests(tiny_pack):
    p = tiny_pack
    flip = _row(p, method="inlp_flip", k=2)
    return {
        "ablate": _row(p, method="ablate"),
        "actadd": _row(p, method="actadd", strength=2.0),
        "ace": _row(p, method="ace", strength=0.5),
        "inlp_null": _row(p, method="inlp_null"),
        "flip_gen": _row(p, method="inlp_flip", apply_to="generation"),
        "reflect_prompt": _row(p, method="inlp_reflect", apply_to="prompt"),
        "list": compose([_row(p, method="ablate", apply_to="generation"),
                         _row(p, method="actadd", generation_window=(1, 3)), flip]),
    }


def _layout(requests):
    """(name, count, first token index): a prefill chunk, decodes, an unsteered gap."""
    return [("ablate", 6, -5), (None, 2, 0), ("actadd", 1, 3), ("list", 4, -2),
            ("ace", 1, 0), ("inlp_null", 3, -8), (None, 3, -1), ("flip_gen", 2, -1),
            ("reflect_prompt", 3, -1), ("list", 1, 2)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_matches_each_request_alone(tiny_pack, requests, dtype):
    torch.manual_seed(0)
    layout = _layout(requests)
    rows, spans, start = [], [], 0
    for name, count, first in layout:
        if name is not None:
            rows.append(Scheduled(requests[name], start, count, first))
        spans.append((name, start, count, first))
        start += count
    n, d = start, tiny_pack.d_model
    plan = Planner(torch.device("cpu"), d).plan(rows)
    assert plan is not None
    sites = sorted({s for r in requests.values() for p in r.parts for s in p.edits},
                   key=site_id)
    for site in sites:
        for stream in (False, True):
            hidden = torch.randn(n, d).to(dtype)
            residual = torch.randn(n, d).to(dtype) if stream else None
            before = hidden.clone(), None if residual is None else residual.clone()
            _apply(plan, site, hidden, residual)
            for name, s, count, first in spans:
                h0, h1 = before[0][s:s + count], hidden[s:s + count]
                edited = name is not None and any(site in p.edits
                                                  for p in requests[name].parts)
                if not edited:  # unsteered here: untouched
                    assert torch.equal(h1, h0)
                    assert residual is None or torch.equal(residual[s:s + count],
                                                           before[1][s:s + count])
                    continue
                x = h0 if residual is None else h0 + before[1][s:s + count]
                index = torch.arange(first, first + count)
                want = _native(requests[name], x, site, index)
                if residual is None:
                    assert torch.equal(h1, want), (site, name)
                else:  # the edited stream moves into `residual`; hidden + residual = it
                    assert torch.equal(residual[s:s + count], want), (site, name)
                    assert not h1.any()


def test_plan_reuse_and_windows_follow_positions(tiny_pack, requests):
    """A decode loop reuses the plan; a windowed edit switches on and off as tokens advance."""
    planner = Planner(torch.device("cpu"), tiny_pack.d_model)
    steering = _row(tiny_pack, method="actadd", strength=3.0, generation_window=(2, 4))
    site = next(iter(steering.edits))
    on = []
    for step in range(6):
        plan = planner.plan([Scheduled(steering, 0, 1, step)])
        hidden = torch.zeros(1, tiny_pack.d_model)
        _apply(plan, site, hidden, None)
        on.append(bool(hidden.any()))
    assert on == [False, False, True, True, False, False]
    first = planner.plan([Scheduled(steering, 0, 1, 0)])
    assert planner.plan([Scheduled(steering, 0, 1, 1)]) is first  # same layout: reused
    assert planner.plan([]) is None


def test_ablation_shares_one_parameter_set(tiny_pack):
    planner = Planner(torch.device("cpu"), tiny_pack.d_model)
    steering = _row(tiny_pack, method="ablate")
    plan = planner.plan([Scheduled(steering, 0, 4, -3), Scheduled(steering, 4, 1, 0)])
    edits = {id(e) for sp in plan.sites.values() for e, _ in sp.passes}
    assert len(plan.sites) == len(steering.edits) and len(edits) == 1
    assert all(sp.tokens == slice(0, 5) for sp in plan.sites.values())
