"""Two custom ops that apply the current step's edits where the residual stream is written.

torch.compile (vLLM's default) traces the model once, before any request arrives: a Python hook
added to a layer afterwards is silently left out of the compiled graph, and a data-dependent
branch or shape inside the graph would be baked in or force a recompile. So the layers call these
ops at every site, always, with fixed arguments (the tensors and the site's number); the ops are
registered with torch and have a fake (meta) implementation, so Dynamo and Inductor keep each one
as an opaque call in place and its body runs at every forward, reading the step's plan
(`steering.vllm.plan`) that the runner hook set from the scheduled requests. Which requests are
steered never changes a shape or the graph.

    steer_write_(hidden, site)             a site whose tensor is the stream's value or a write
                                           into it (block 0's input, attention and MLP outputs)
    steer_stream_(hidden, residual, site)  a block input carried as two tensors (vLLM's fused
                                           add-norm): the stream is hidden + residual

For the second, the edited stream goes to `residual` and `hidden` becomes 0 on the edited tokens,
so the layer's own add-norm computes 0 + h' = h' exactly. Tokens no request steers are never
touched, so an unsteered request computes exactly what it computes without the plugin.
"""

from __future__ import annotations

import torch
from torch.library import Library

from steering.vllm.plan import SitePlan, StepPlan

NAMESPACE = "steering_vllm"
_lib: Library | None = None  # keeps the ops registered for the life of the process


class _Current:
    plan: StepPlan | None = None


CURRENT = _Current()


def _site(site: int) -> tuple[StepPlan, SitePlan, torch.Tensor | slice] | None:
    """This step's plan for `site` and its tokens' flat indices (None: nothing to edit here)."""
    plan = CURRENT.plan
    sp = None if plan is None else plan.sites.get(site)
    return None if sp is None else (plan, sp, sp.tokens)


def steer_write_(hidden: torch.Tensor, site: int) -> None:
    if (found := _site(site)) is None:
        return
    plan, sp, sel = found
    hidden[sel] = sp.apply(hidden[sel], plan.masks).to(hidden.dtype)


def steer_stream_(hidden: torch.Tensor, residual: torch.Tensor, site: int) -> None:
    if (found := _site(site)) is None:
        return
    plan, sp, sel = found
    stream = hidden[sel] + residual[sel]
    residual[sel] = sp.apply(stream, plan.masks).to(residual.dtype)
    hidden[sel] = 0


def _fake_write(hidden: torch.Tensor, site: int) -> None:
    return None


def _fake_stream(hidden: torch.Tensor, residual: torch.Tensor, site: int) -> None:
    return None


def register(dispatch_key: str | None = None) -> None:
    """Register both ops once per process (`torch.ops.steering_vllm.*`)."""
    global _lib
    if _lib is not None:
        return
    from vllm.utils.torch_utils import direct_register_custom_op

    lib = Library(NAMESPACE, "FRAGMENT")  # noqa: TOR901 (kept alive in _lib)
    direct_register_custom_op("steer_write_", steer_write_, mutates_args=["hidden"],
                              fake_impl=_fake_write, target_lib=lib, dispatch_key=dispatch_key)
    direct_register_custom_op("steer_stream_", steer_stream_,
                              mutates_args=["hidden", "residual"], fake_impl=_fake_stream,
                              target_lib=lib, dispatch_key=dispatch_key)
    _lib = lib
