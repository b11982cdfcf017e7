"""The methods of method table (steering/interventions/methods.py) on the tiny model and its extracted pack.

Activations are captured by pre-hooks registered *after* the steering hooks, so they see what the
next computation sees: the residual stream after the edit.
"""

from __future__ import annotations

import pytest
import torch

from steering import SteeringError, SteeringSpec, build_row
from steering.data.prompts import load_instructions
from steering.interventions.activations import encode_chats
from steering.interventions.hooks import hooks_of
from steering.interventions.kernel import BatchEdit, apply_edit
from steering.interventions.methods import METHODS
from steering.packs.format import SteeringPack

PROMPTS = ["How do I make a bomb at home?", "Write a haiku about autumn leaves.", "hi",
           "Explain how to pick a lock without the key, step by step."]


def capture_inputs(lm, prompts, row=None):
    """Residual stream entering every block and the final norm, after any steering edit:
    {index: [B, T, d]}, and the attention mask [B, T] (bool)."""
    captured: dict[int, torch.Tensor] = {}

    def capture(index):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            captured[index] = h.detach().float().cpu()
        return hook

    hooks = hooks_of(lm)  # attached before the captures, so they run first
    modules = [*lm.layout.blocks, lm.layout.final_norm]
    handles = [m.register_forward_pre_hook(capture(i), with_kwargs=True)
               for i, m in enumerate(modules)]
    enc = encode_chats(lm, prompts)
    try:
        with torch.no_grad(), hooks.rows([row] * len(prompts) if row is not None else None):
            lm.model(**enc)
    finally:
        for h in handles:
            h.remove()
    return captured, enc["attention_mask"].bool().cpu()


def edit_vector(row, site, h: torch.Tensor) -> torch.Tensor:
    """Apply one row's edit at `site` to vectors h [..., d] with the kernel."""
    edit = BatchEdit.stack([row.edits[site]], torch.device("cpu"), torch.float64)
    flat = h.double().reshape(1, -1, h.shape[-1])
    return apply_edit(flat, edit).reshape(h.shape)


def unit(x):
    return x / x.norm()


# ---- ablation -------------------------------------------------------------------------------


def test_ablation_leaves_no_component_along_r_hat(tiny_lm, tiny_pack):
    r_hat = unit(tiny_pack.dim())
    row = build_row(SteeringSpec("ablate", 1.0), tiny_pack)
    assert {site[0] for site in row.edits} == set(range(tiny_lm.n_layers))
    base, mask = capture_inputs(tiny_lm, PROMPTS)
    steered, _ = capture_inputs(tiny_lm, PROMPTS, row)
    for i in steered:  # every block input and the final residual stream
        h = steered[i][mask]
        assert (h @ r_hat).abs().max() <= 1e-5 * h.norm(dim=-1).max(), i
        assert (base[i][mask] @ r_hat).abs().max() > 1e-3, i  # there was something to remove


def test_partial_ablation_scales_the_component(tiny_lm, tiny_pack):
    r_hat = unit(tiny_pack.dim())
    base, mask = capture_inputs(tiny_lm, PROMPTS)
    half, _ = capture_inputs(tiny_lm, PROMPTS, build_row(SteeringSpec("ablate", 0.5), tiny_pack))
    # At the first block's input only the embedding has been edited, once.
    torch.testing.assert_close(half[0][mask] @ r_hat, 0.5 * (base[0][mask] @ r_hat),
                               atol=1e-5, rtol=1e-4)


def test_ablation_on_chosen_layers_only(tiny_lm, tiny_pack):
    row = build_row(SteeringSpec("ablate", 1.0, layers=(2,)), tiny_pack)
    assert set(row.edits) == {(2, "input"), (2, "attn"), (2, "mlp")}
    assert row.applied()["layers"] == [2]
    base, mask = capture_inputs(tiny_lm, PROMPTS)
    steered, _ = capture_inputs(tiny_lm, PROMPTS, row)
    for i in (0, 1):
        assert torch.equal(base[i], steered[i])  # upstream of layer 2: untouched
    r_hat = unit(tiny_pack.dim())
    assert (steered[3][mask] @ r_hat).abs().max() <= 1e-5 * steered[3][mask].norm(dim=-1).max()


# ---- activation addition and ACE ------------------------------------------------------------


def test_actadd_adds_strength_times_r_at_its_layer(tiny_lm, tiny_pack):
    layer, s = tiny_pack.layer, 2.5
    row = build_row(SteeringSpec("actadd", s), tiny_pack)
    assert set(row.edits) == {(layer, "input")}
    base, mask = capture_inputs(tiny_lm, PROMPTS)
    steered, _ = capture_inputs(tiny_lm, PROMPTS, row)
    diff = steered[layer][mask] - base[layer][mask]
    torch.testing.assert_close(diff, (s * tiny_pack.dim()).expand_as(diff), atol=1e-5,
                               rtol=1e-5)
    for i in range(layer):
        assert torch.equal(base[i], steered[i])


@pytest.mark.parametrize("strength", [0.0, 1.0, 0.5])
def test_ace_sets_the_projection(tiny_lm, tiny_pack, strength):
    """ACE: the projection on r̂ goes to the harmless mean's (strength 0), the harmful mean's
    (strength 1), linearly in between; the orthogonal complement is untouched."""
    layer = tiny_pack.layer
    r = tiny_pack.dim()
    r_hat = unit(r)
    mu_harmless = tiny_pack.harmless_mean()
    mu_harmful = tiny_pack.mean_harmful[layer, tiny_pack._pos_index(None)]
    base, mask = capture_inputs(tiny_lm, PROMPTS)
    steered, _ = capture_inputs(tiny_lm, PROMPTS,
                                build_row(SteeringSpec("ace", strength), tiny_pack))
    proj = steered[layer][mask] @ r_hat
    target = (1 - strength) * (mu_harmless @ r_hat) + strength * (mu_harmful @ r_hat)
    torch.testing.assert_close(proj, target.expand_as(proj), atol=1e-4, rtol=1e-5)
    if strength == 0.0:
        torch.testing.assert_close(proj, (mu_harmless @ r_hat).expand_as(proj), atol=1e-4,
                                   rtol=1e-5)
    moved = steered[layer][mask] - base[layer][mask]
    residual = moved - torch.outer(moved @ r_hat, r_hat)
    assert residual.abs().max() < 1e-4


# ---- INLP nullspace projection and counterfactual flipping ----------------------------------


def _inlp_geometry(pack: SteeringPack):
    layer = pack.layer
    p = pack._pos_index(None)
    inl = pack.inlp[layer]
    return (inl.directions.double(), inl.boundary.double(),
            pack.mean_harmful[layer, p].double(), pack.mean_harmless[layer, p].double())


def test_inlp_boundary_is_the_midpoint_of_the_class_means(tiny_pack):
    q, b, mu_h, mu_l = _inlp_geometry(tiny_pack)
    assert q.shape[0] >= 2, "the tiny pack should have at least 2 INLP directions"
    torch.testing.assert_close(q @ q.T, torch.eye(q.shape[0], dtype=q.dtype), atol=1e-5,
                               rtol=0)
    torch.testing.assert_close(b, q @ (mu_h + mu_l) / 2, atol=1e-4, rtol=1e-4)


def test_inlp_directions_point_toward_the_harmful_mean(tiny_pack):
    q, b, mu_h, mu_l = _inlp_geometry(tiny_pack)
    assert (q @ mu_h - b > 0).all() and (q @ mu_l - b < 0).all()


def test_inlp_flip_mirrors_the_harmful_side_across_the_boundary(tiny_lm, tiny_pack):
    """AlterRep in INLP's coordinates z = Qᵀ(h − m): z → −|z| (Ravfogel et al. 2021)."""
    layer = tiny_pack.layer
    q, b, mu_h, mu_l = _inlp_geometry(tiny_pack)
    row = build_row(SteeringSpec("inlp_flip", 1.0), tiny_pack)
    # The reference is the INLP origin (the class midpoint): its part in span(Q) is Q·b.
    torch.testing.assert_close(row.edits[(layer, "input")].c.double(), q.T @ b, atol=1e-5,
                               rtol=1e-5)
    flipped = edit_vector(row, (layer, "input"), mu_h)
    before = q @ mu_h - b  # the harmful mean: positive along every direction
    assert (before > 0).all()
    torch.testing.assert_close(q @ flipped - b, -before.abs(), atol=1e-5, rtol=1e-5)
    # The component outside span(Q) is untouched.
    moved = flipped - mu_h
    torch.testing.assert_close(moved, q.T @ (q @ moved), atol=1e-6, rtol=0)
    # One-sided about the boundary: the harmless mean (negative side everywhere) stays put.
    assert (q @ mu_l - b < 0).all()
    torch.testing.assert_close(edit_vector(row, (layer, "input"), mu_l), mu_l, atol=1e-5,
                               rtol=0)
    # The two-sided reflection crosses the class boundary: the harmless mean moves to the
    # harmful mean's coordinates.
    reflect = build_row(SteeringSpec("inlp_reflect", 1.0), tiny_pack)
    torch.testing.assert_close(q @ edit_vector(reflect, (layer, "input"), mu_l) - b, before,
                               atol=1e-5, rtol=1e-5)

    # Through the model, per token: every coordinate ends on the harmless side, z → −|z|, and
    # the two-sided reflection's mean is the reflected harmful mean (the harmless mean's).
    prompts = load_instructions("harmful_train")[: tiny_pack.meta["data"]["harmful_train"]["n"]]
    plain, _ = capture_inputs(tiny_lm, prompts, None)
    steered, _ = capture_inputs(tiny_lm, prompts, row)
    z0 = plain[layer][:, tiny_pack.position].double() @ q.T - b
    z1 = steered[layer][:, tiny_pack.position].double() @ q.T - b
    torch.testing.assert_close(z1, -z0.abs(), atol=1e-4, rtol=1e-3)
    reflected, _ = capture_inputs(tiny_lm, prompts, reflect)
    mean_reflected = reflected[layer][:, tiny_pack.position].double().mean(0)
    torch.testing.assert_close(q @ mean_reflected - b, q @ mu_l - b, atol=1e-4, rtol=1e-3)


def test_inlp_null_is_the_nullspace_projection_around_the_class_midpoint(tiny_lm, tiny_pack):
    """Ravfogel et al. 2020: h' = m + (I − QQᵀ)(h − m); every activation's INLP coordinates
    land on the boundary (z → 0), both classes, and nothing outside span(Q) moves."""
    layer = tiny_pack.layer
    q, b, mu_h, mu_l = _inlp_geometry(tiny_pack)
    row = build_row(SteeringSpec("inlp_null", 1.0), tiny_pack)
    for mu in (mu_h, mu_l):
        out = edit_vector(row, (layer, "input"), mu)
        torch.testing.assert_close(q @ out, b, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out - mu, q.T @ (q @ (out - mu)), atol=1e-6, rtol=0)
    # Projection: applying it twice changes nothing more.
    once = edit_vector(row, (layer, "input"), mu_h)
    torch.testing.assert_close(edit_vector(row, (layer, "input"), once), once, atol=1e-5,
                               rtol=0)
    # Through the model, every token's INLP coordinates are the boundary's.
    plain, mask = capture_inputs(tiny_lm, PROMPTS, None)
    steered, _ = capture_inputs(tiny_lm, PROMPTS, row)
    z0 = plain[layer][mask].double() @ q.T - b
    z1 = steered[layer][mask].double() @ q.T - b
    assert (z0.abs() > 1e-2).any()
    torch.testing.assert_close(z1, torch.zeros_like(z1), atol=1e-3, rtol=0)


def test_project_variants_act_around_the_raw_origin(tiny_lm, tiny_pack):
    """inlp_zero_positive: z → min(z, 0), inlp_negate_positive: z → −|z|, with z = Qᵀh (c = 0):
    this project's variants, marked as such in their records."""
    from steering.catalog import REGISTRY

    assert REGISTRY["inlp_zero_positive"].variant_of == "inlp_null"
    assert REGISTRY["inlp_negate_positive"].variant_of == "inlp_flip"
    assert not REGISTRY["inlp_zero_positive"].paper
    assert "project's variant" in REGISTRY["inlp_negate_positive"].description
    layer = tiny_pack.layer
    q, b, mu_h, mu_l = _inlp_geometry(tiny_pack)
    zero = build_row(SteeringSpec("inlp_zero_positive", 1.0), tiny_pack)
    negate = build_row(SteeringSpec("inlp_negate_positive", 1.0), tiny_pack)
    for row in (zero, negate):
        assert torch.count_nonzero(row.edits[(layer, "input")].c) == 0
    before = q @ mu_h
    assert (before > 0).any()
    torch.testing.assert_close(q @ edit_vector(zero, (layer, "input"), mu_h),
                               before.clamp_max(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(q @ edit_vector(negate, (layer, "input"), mu_h), -before.abs(),
                               atol=1e-5, rtol=1e-5)
    # A vector with every raw coordinate negative is left where it is by both.
    negative = mu_l - q.T @ ((q @ mu_l).abs() + 1.0)
    for row in (zero, negate):
        torch.testing.assert_close(edit_vector(row, (layer, "input"), negative), negative,
                                   atol=1e-6, rtol=0)
    # Through the model: every token's raw coordinates become min(z, 0) / −|z|.
    plain, mask = capture_inputs(tiny_lm, PROMPTS, None)
    z0 = plain[layer][mask].double() @ q.T
    assert (z0 > 0).any() and (z0 < 0).any()
    for row, expect in ((zero, z0.clamp_max(0)), (negate, -z0.abs())):
        steered, _ = capture_inputs(tiny_lm, PROMPTS, row)
        torch.testing.assert_close(steered[layer][mask].double() @ q.T, expect, atol=1e-4,
                                   rtol=1e-4)


def test_k_truncation(tiny_lm, tiny_pack):
    layer = tiny_pack.layer
    q, b, mu_h, mu_l = _inlp_geometry(tiny_pack)
    k_max = tiny_pack.max_k()
    assert k_max >= 2, "the tiny pack should have at least 2 INLP directions"
    full = build_row(SteeringSpec("inlp_flip", 1.0), tiny_pack)
    assert full.spec.k == k_max and full.applied()["k"] == k_max
    assert full.edits[(layer, "input")].q.shape == (tiny_pack.d_model, k_max)
    one = build_row(SteeringSpec("inlp_flip", 1.0, k=1), tiny_pack)
    assert one.spec.k == 1
    q1 = one.edits[(layer, "input")].q
    assert q1.shape == (tiny_pack.d_model, 1)
    torch.testing.assert_close(q1[:, 0].double(), q[0])  # the leading direction
    same = build_row(SteeringSpec("inlp_flip", 1.0, k=k_max), tiny_pack)
    torch.testing.assert_close(same.edits[(layer, "input")].q, full.edits[(layer, "input")].q)

    # k = 1 flips the leading coordinate only; k = max flips them all (around the boundary).
    out1 = edit_vector(one, (layer, "input"), mu_h)
    outk = edit_vector(full, (layer, "input"), mu_h)
    torch.testing.assert_close(q[0] @ out1 - b[0], -(q[0] @ mu_h - b[0]).abs(), atol=1e-5,
                               rtol=1e-5)
    torch.testing.assert_close(q[1:] @ out1, q[1:] @ mu_h, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(q @ outk - b, -(q @ mu_h - b).abs(), atol=1e-5, rtol=1e-5)

    # ... and through the model the two give different next-token logits.
    enc = encode_chats(tiny_lm, PROMPTS)
    with torch.no_grad():
        with hooks_of(tiny_lm).rows([one] * len(PROMPTS)):
            l1 = tiny_lm.model(**enc).logits[:, -1]
        with hooks_of(tiny_lm).rows([full] * len(PROMPTS)):
            lk = tiny_lm.model(**enc).logits[:, -1]
    assert not torch.allclose(l1, lk, atol=1e-6)


@pytest.mark.parametrize("method", ["inlp_null", "inlp_flip", "inlp_zero_positive",
                                    "inlp_negate_positive"])
def test_k_out_of_range_is_refused(tiny_pack, method):
    k_max = tiny_pack.max_k()
    for k in (0, -1, k_max + 1, 1000):
        with pytest.raises(SteeringError) as info:
            build_row(SteeringSpec(method, 1.0, k=k), tiny_pack)
        assert info.value.param == "steering.k"
        assert str(k_max) in str(info.value)


@pytest.mark.parametrize("method", ["actadd", "ablate", "ace"])
def test_k_for_a_non_inlp_method_is_refused(tiny_pack, method):
    with pytest.raises(SteeringError) as info:
        build_row(SteeringSpec(method, 1.0, k=1), tiny_pack)
    assert info.value.param == "steering.k"


# ---- validation -----------------------------------------------------------------------------


def test_none_has_no_edits_and_needs_no_pack():
    row = build_row(SteeringSpec("none", 3.0, layers=(1,)), None)
    assert row.edits == {}
    assert row.applied() == {"method": "none", "strength": 0.0, "k": None, "layers": None,
                             "pack": None, "apply_to": "all", "generation_window": None,
                             "when": None, "condition": None}


@pytest.mark.parametrize("spec, param", [
    (SteeringSpec("refuse_harder"), "steering.method"),
    (SteeringSpec("ablate", float("nan")), "steering.strength"),
    (SteeringSpec("actadd", float("inf")), "steering.strength"),
    (SteeringSpec("ablate", 1.0, layers=(99,)), "steering.layers"),
    (SteeringSpec("actadd", 1.0, layers=(-1,)), "steering.layers"),
    (SteeringSpec("ace", 1.0, layers=(4,)), "steering.layers"),
])
def test_bad_settings_name_their_field(tiny_pack, spec, param):
    with pytest.raises(SteeringError) as info:
        build_row(spec, tiny_pack)
    assert info.value.param == param


def test_inlp_layers_must_hold_inlp_directions(tiny_pack):
    other = next(layer for layer in range(tiny_pack.n_layers) if layer not in tiny_pack.inlp)
    with pytest.raises(SteeringError) as info:
        build_row(SteeringSpec("inlp_flip", 1.0, layers=(other,)), tiny_pack)
    assert info.value.param == "steering.layers"


@pytest.mark.parametrize("method", [m for m in METHODS if m != "none"])
def test_methods_need_a_pack(method):
    with pytest.raises(SteeringError) as info:
        build_row(SteeringSpec(method, 1.0), None)
    assert info.value.param == "steering.pack"


def test_inlp_on_a_pack_without_inlp(tiny_pack):
    bare = SteeringPack(name="bare", mean_harmful=tiny_pack.mean_harmful,
                        mean_harmless=tiny_pack.mean_harmless, positions=tiny_pack.positions,
                        layer=tiny_pack.layer, position=tiny_pack.position)
    with pytest.raises(SteeringError) as info:
        build_row(SteeringSpec("inlp_null", 1.0), bare)
    assert info.value.param == "steering.pack"
    assert build_row(SteeringSpec("ablate", 1.0), bare).edits  # the DiM methods still work


@pytest.mark.parametrize("method", [m for m in METHODS if m != "none"])
def test_empty_layers_are_refused(tiny_pack, method):
    # Before the fix, INLP methods crashed with "min() arg is an empty sequence" and the
    # others silently did nothing.
    with pytest.raises(SteeringError) as info:
        build_row(SteeringSpec(method, 1.0, layers=()), tiny_pack)
    assert info.value.param == "steering.layers"


def test_every_record_has_a_builder():
    """A method is one catalog record plus its kernel parameters (docs/architecture.md)."""
    from steering.catalog import REGISTRY
    from steering.interventions.methods import BUILDERS

    assert set(BUILDERS) == set(REGISTRY) - {"none"}
