"""Layer discovery from the one architecture table, on tiny configs of every listed family.

Besides resolving the table's module paths, each family is checked functionally: ablating a
direction at every site the table names leaves the residual stream with no component along it,
which only holds if the "writers" really are what the block adds to the residual stream.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from steering import SteeringSpec, build_row
from steering.interventions.activations import encode_chats
from steering.interventions.hooks import hooks_of
from steering.models.fingerprint import fingerprint
from steering.models.layers import (
    ARCHITECTURES,
    UnsupportedArchitecture,
    architecture_of,
    discover,
    get_path,
    hidden_size,
)
from steering.packs.format import SteeringPack
from testkit.archs import ARCH_KINDS, build_tiny
from testkit.tiny import make_tokenizer

PROMPTS = ["How do I bake bread?", "Write a poem about the sea and the stars at night."]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module", params=ARCH_KINDS)
def arch_lm(request, tokenizer):
    return build_tiny(request.param, tokenizer, n_layers=2)


def random_pack(lm, seed: int = 0) -> SteeringPack:
    g = torch.Generator().manual_seed(seed)
    shape = (lm.n_layers, 1, lm.d_model)
    return SteeringPack(name="rand", mean_harmful=torch.randn(shape, generator=g),
                        mean_harmless=torch.randn(shape, generator=g) * 0.1,
                        positions=[-1], layer=min(1, lm.n_layers - 1), position=-1)


def test_table_covers_the_issue_families():
    for kind in ARCH_KINDS:
        assert kind in ARCHITECTURES


def test_discover_resolves_every_path(arch_lm):
    model, layout = arch_lm.model, arch_lm.layout
    cfg = model.config
    assert layout.n_layers == 2
    assert isinstance(layout.blocks, nn.ModuleList) and len(layout.blocks) == 2
    assert layout.embedding is model.get_input_embeddings()
    assert isinstance(layout.final_norm, nn.Module)
    assert layout.final_norm is get_path(model, layout.arch.final_norm)
    d = hidden_size(model)
    assert d == 64 == arch_lm.d_model
    for layer in range(layout.n_layers):
        assert isinstance(layout.attn_writer(layer), nn.Module)
        assert isinstance(layout.mlp_writer(layer), nn.Module)
        for path in (layout.arch.attn_out_proj, layout.arch.mlp_out_proj):
            if path is None:
                continue
            proj = get_path(layout.blocks[layer], path)
            # The projection's output axis is the residual stream (Linear: out_features;
            # GPT-2's Conv1D stores the transpose: weight [in, out]).
            out_dim = proj.out_features if isinstance(proj, nn.Linear) else proj.weight.shape[1]
            assert out_dim == d
    for path in layout.arch.extra_writers:
        assert isinstance(get_path(model, path), nn.Embedding)
    fp = fingerprint(model)
    assert fp["model_type"] == cfg.model_type
    assert fp["hidden_size"] == 64 and fp["n_layers"] == 2
    assert len(fp["probe"]) == 64 and all(isinstance(x, float) for x in fp["probe"])


def test_idle_hooks_leave_the_model_exact(arch_lm):
    enc = encode_chats(arch_lm, PROMPTS)
    hooks_of(arch_lm).set_rows(None)
    with torch.no_grad():
        before = arch_lm.model(**enc).logits
        hooks_of(arch_lm).set_rows([build_row(SteeringSpec("none"), None)] * len(PROMPTS))
        after = arch_lm.model(**enc).logits
    hooks_of(arch_lm).set_rows(None)
    assert torch.equal(before, after)


def test_ablation_at_the_table_sites_removes_the_direction(arch_lm):
    """Ablate at every block input and both writers: the residual stream seen by every later
    block and by the final norm has no component along r̂."""
    pack = random_pack(arch_lm)
    r_hat = pack.dim() / pack.dim().norm()
    row = build_row(SteeringSpec("ablate", 1.0), pack)
    captured: dict[int, torch.Tensor] = {}

    def capture(index):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            captured[index] = h.detach().clone()
        return hook

    hooks = hooks_of(arch_lm)  # registered first, so the captures below see the edited inputs
    modules = [*arch_lm.layout.blocks, arch_lm.layout.final_norm]
    handles = [m.register_forward_pre_hook(capture(i), with_kwargs=True)
               for i, m in enumerate(modules)]
    enc = encode_chats(arch_lm, PROMPTS)
    mask = enc["attention_mask"].bool()
    try:
        with torch.no_grad():
            arch_lm.model(**enc)
            unsteered = {i: h.clone() for i, h in captured.items()}
            with hooks.rows([row] * len(PROMPTS)):
                arch_lm.model(**enc)
    finally:
        for h in handles:
            h.remove()
    assert set(captured) == set(range(len(modules)))
    for i in range(len(modules)):
        h = captured[i][mask]  # real tokens only
        comp = (h @ r_hat).abs()
        assert comp.max() <= 1e-5 * h.norm(dim=-1).max(), (i, comp.max())
        # ... while the unsteered stream does have a sizeable component (a non-vacuous check)
        assert (unsteered[i][mask] @ r_hat).abs().max() > 1e-3


def test_unknown_architecture_is_refused():
    fake = nn.Module()
    fake.config = SimpleNamespace(model_type="mamba")
    with pytest.raises(UnsupportedArchitecture, match="mamba"):
        architecture_of(fake)
    with pytest.raises(UnsupportedArchitecture):
        discover(fake)
