import torch

from steering.interventions.kernel import BatchEdit, RowEdit, apply_edit, project_out


def _orthonormal(d, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))
    return q.float()


def test_full_ablation_leaves_no_component():
    d = 16
    q = _orthonormal(d, 1)
    h = torch.randn(2, 5, d)
    edit = BatchEdit.stack([RowEdit(q, torch.zeros(d), 1.0, torch.zeros(d))] * 2,
                           torch.device("cpu"), torch.float32)
    out = apply_edit(h, edit)
    assert (out @ q).abs().max() < 1e-5


def test_identity_row_is_exact():
    d = 8
    h = torch.randn(1, 3, d)
    edit = BatchEdit.stack([RowEdit.identity(d)], torch.device("cpu"), torch.float32)
    assert torch.equal(apply_edit(h, edit), h)


def test_mixed_rows_equal_solo_rows():
    d = 32
    rows = [
        RowEdit.identity(d),
        RowEdit(_orthonormal(d, 1, 1), torch.zeros(d), 1.0, torch.zeros(d)),
        RowEdit(torch.zeros(d, 0), torch.zeros(d), 0.0, torch.randn(d)),
        RowEdit(_orthonormal(d, 3, 2), torch.randn(d), 2.0, torch.zeros(d)),
    ]
    h = torch.randn(len(rows), 7, d)
    mixed = apply_edit(h, BatchEdit.stack(rows, torch.device("cpu"), torch.float32))
    for i, row in enumerate(rows):
        solo = apply_edit(h[i:i + 1], BatchEdit.stack([row], torch.device("cpu"), torch.float32))
        torch.testing.assert_close(mixed[i:i + 1], solo, rtol=0, atol=1e-6)


def test_a_row_is_bit_identical_to_its_solo_run_at_model_width():
    """Mixed batch = solo to the last bit, at the embedded model's width, with the rows' k
    zero-padded to the widest (16) and for a decode step (T = 1) as for a prefill chunk (T = 7).
    A GEMM over the batch (bmm) fails this: its blocking follows the batch's shape."""
    d = 896
    gen = torch.Generator().manual_seed(11)
    rows = [RowEdit(_orthonormal(d, k, 20 + k), torch.randn(d, generator=gen), alpha,
                    torch.zeros(d), one_sided=one_sided)
            for k, alpha, one_sided in ((1, 1.0, False), (2, 2.0, True), (4, 1.0, False),
                                        (16, 2.0, False), (1, 1.0, True))]
    rows.insert(2, RowEdit.identity(d))
    for t in (1, 7):
        h = torch.randn(len(rows), t, d, generator=gen) * 4
        mixed = apply_edit(h, BatchEdit.stack(rows, torch.device("cpu")))
        for i, row in enumerate(rows):
            solo = apply_edit(h[i:i + 1], BatchEdit.stack([row], torch.device("cpu")))
            assert torch.equal(mixed[i:i + 1], solo), (t, i)


def test_reflection_twice_is_identity():
    d = 12
    q, c = _orthonormal(d, 2, 3), torch.randn(d)
    edit = BatchEdit.stack([RowEdit(q, c, 2.0, torch.zeros(d))], torch.device("cpu"),
                           torch.float32)
    h = torch.randn(1, 4, d)
    torch.testing.assert_close(apply_edit(apply_edit(h, edit), edit), h, atol=1e-5, rtol=1e-5)


def test_one_sided_moves_only_the_positive_side():
    torch.manual_seed(0)  # so that some rows have z <= 0 on every coordinate
    d = 10
    q, c = _orthonormal(d, 2, 4), torch.randn(d)
    h = torch.randn(1, 50, d)
    z = (h[0] - c) @ q
    for alpha, want in ((1.0, z.clamp_max(0)), (2.0, -z.abs())):
        edit = BatchEdit.stack([RowEdit(q, c, alpha, torch.zeros(d), one_sided=True)],
                               torch.device("cpu"))
        out = apply_edit(h, edit)
        torch.testing.assert_close((out[0] - c) @ q, want, atol=1e-5, rtol=0)
        # nothing moves outside span(Q), and rows with z ≤ 0 everywhere are untouched
        moved = out[0] - h[0]
        torch.testing.assert_close(moved, moved @ q @ q.T, atol=1e-5, rtol=0)
        keep = (z <= 0).all(-1)
        assert keep.any() and torch.equal(out[0][keep], h[0][keep])


def test_mixed_one_sided_and_two_sided_rows_equal_solo_rows():
    d = 24
    c = torch.randn(d)
    rows = [
        RowEdit(_orthonormal(d, 3, 5), c, 2.0, torch.zeros(d), one_sided=True),
        RowEdit.identity(d),
        RowEdit(_orthonormal(d, 3, 5), c, 2.0, torch.zeros(d)),  # same Q, two-sided
        RowEdit(_orthonormal(d, 1, 6), torch.randn(d), 1.0, torch.zeros(d), one_sided=True),
        RowEdit(_orthonormal(d, 1, 7), torch.randn(d), 1.0, torch.randn(d)),
    ]
    h = torch.randn(len(rows), 6, d)
    mixed = apply_edit(h, BatchEdit.stack(rows, torch.device("cpu")))
    for i, row in enumerate(rows):
        solo = apply_edit(h[i:i + 1], BatchEdit.stack([row], torch.device("cpu")))
        torch.testing.assert_close(mixed[i:i + 1], solo, rtol=0, atol=1e-6)
    assert not torch.allclose(mixed[0], mixed[2])  # the flag matters
    # select() keeps each row's flag
    sub = BatchEdit.stack(rows, torch.device("cpu")).select(torch.tensor([2, 0]))
    torch.testing.assert_close(apply_edit(h[[2, 0]], sub), mixed[[2, 0]], rtol=0, atol=1e-6)


def test_bf16_activations_are_edited_in_fp32():
    """An outlier feature: the fp32 kernel leaves (almost) nothing along the direction."""
    d = 64
    q = torch.zeros(d, 1)
    q[:4, 0] = 0.5
    h = torch.randn(1, 3, d) * 0.1
    h[..., 0] = 300.0  # large outlier along one axis the direction touches
    edit = BatchEdit.stack([RowEdit(q, torch.zeros(d), 1.0, torch.zeros(d))], torch.device("cpu"))
    out = apply_edit(h.bfloat16(), edit)
    assert out.dtype == torch.bfloat16
    exact = apply_edit(h.bfloat16().float(), edit)
    torch.testing.assert_close(out.float(), exact, atol=2.0, rtol=1e-2)  # one bf16 rounding
    # the bf16 result equals the fp32 result rounded once, not a bf16 chain of roundings
    assert torch.equal(out, exact.bfloat16())


def test_project_out_is_the_general_path_bit_for_bit():
    """The hooks call `project_out` for a plain projection (ablation at strength 1) instead of
    `apply_edit`: a row's result must not depend on which of the two its batch took."""
    torch.manual_seed(0)
    d = 896
    for b, t in ((1, 1), (3, 1), (2, 17), (8, 5)):
        q = torch.randn(d, 1)
        q /= q.norm()
        edit = BatchEdit.stack([RowEdit(q=q, c=torch.zeros(d), alpha=1.0, v=torch.zeros(d))] * b,
                               torch.device("cpu"))
        assert edit._projection is not None
        h = 3 * torch.randn(b, t, d)
        mixed = BatchEdit.stack([RowEdit(q=q, c=torch.zeros(d), alpha=1.0, v=torch.zeros(d))] * b
                                + [RowEdit.identity(d)], torch.device("cpu"))
        assert mixed._projection is None  # the identity row's α = 0: the general path
        general = apply_edit(torch.cat([h, h[:1]]), mixed)[:b]
        assert torch.equal(project_out(h, edit._projection), general)
