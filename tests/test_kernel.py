import torch

from steering.interventions.kernel import BatchEdit, RowEdit, apply_edit


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


def test_reflection_twice_is_identity():
    d = 12
    q, c = _orthonormal(d, 2, 3), torch.randn(d)
    edit = BatchEdit.stack([RowEdit(q, c, 2.0, torch.zeros(d))], torch.device("cpu"),
                           torch.float32)
    h = torch.randn(1, 4, d)
    torch.testing.assert_close(apply_edit(apply_edit(h, edit), edit), h, atol=1e-5, rtol=1e-5)
