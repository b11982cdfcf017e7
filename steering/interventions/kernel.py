"""The one steering kernel.

Every method is the affine edit (Arditi et al. 2024 eq. 4–5, Marshall et al. 2024 eq. 3,
Ravfogel et al. 2020 for the INLP projections)

    z  = Qᵀ (h − c)                        coordinates of h − c in the subspace
    h' = h − α · Q g(z) + v                Q: d×k orthonormal, c: reference point, v = β·direction
    g(z) = z            (two-sided: every activation is moved)
    g(z) = relu(z)      (one-sided: only coordinates on the positive side of c are moved)

applied per row of a batch: each row b has its own Q_b (zero-padded to the batch's widest k — a
zero column contributes an exact zero; see `_subtract_subspace_part` for why a row's result is bit-identical
to its solo run), c_b, α_b, v_b and one-sided flag, so one call serves a batch
that mixes methods. A row with α_b = 0 and v_b = 0 is left exactly unchanged.

The one-sided form is the counterfactual intervention of AlterRep (Ravfogel et al. 2021, §3):
with the directions oriented toward one class (the harmful one here) and c on the class boundary,
α = 2 reflects only the activations on that side of the boundary across it and α = 1 moves them
onto it; activations already on the other side are left alone. (With c = 0 "positive side" means
the side of the raw origin: the project's `inlp_*_positive` variants, `methods.py`.)

| α | g | effect on z |
|---|---|---|
| 1 | identity | z → 0 (projection onto c + null(Qᵀ)) |
| 2 | identity | z → −z (reflection through c) |
| 1 | relu | z → min(z, 0) (one-sided projection) |
| 2 | relu | z → −|z| (one-sided flip: every coordinate ends on the negative side) |

The arithmetic runs in float32 whatever the activations' dtype (a bf16 projection leaves a
visible residue along the direction), and the result is cast back to that dtype.

Token targeting: an edit may carry a window [lo, hi) over token indices, where a position's token
index is its distance from the first answer position (the last prompt position, whose output is
the first generated token, has index 0; generated token i enters at index i; prompt positions are
negative). Positions outside a row's window keep h exactly (the edited value is discarded with a
select, not blended), so they compute what the unsteered model computes there.

| targeting | window [lo, hi) |
|---|---|
| every position | none |
| prompt only | [−∞, 0) |
| generation only | [0, ∞) |
| generated tokens s … e−1 | [s, e) |
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RowEdit:
    """One row's edit at one site. Q: [d, k] orthonormal columns (k may be 0)."""

    q: torch.Tensor
    c: torch.Tensor
    alpha: float
    v: torch.Tensor
    one_sided: bool = False  # g = relu (see the module docstring)
    window: tuple[int, int] | None = None  # token indices [lo, hi) it acts on; None: all

    @staticmethod
    def identity(d: int, dtype: torch.dtype = torch.float32) -> RowEdit:
        return RowEdit(
            q=torch.zeros(d, 0, dtype=dtype),
            c=torch.zeros(d, dtype=dtype),
            alpha=0.0,
            v=torch.zeros(d, dtype=dtype),
        )

    @property
    def is_identity(self) -> bool:
        return (self.alpha == 0.0 or self.q.shape[1] == 0) and not bool(self.v.any())


@dataclass
class BatchEdit:
    """Stacked per-row parameters for one site. q: [B, d, K] (and q_cols, its [B, K, d]
    contiguous copy), c: [B, d], alpha: [B], v: [B, d],
    one_sided: [B] bool (None when no row is one-sided), window: [B, 2] int64 token-index bounds
    [lo, hi) (None when every row acts on every position)."""

    q: torch.Tensor
    c: torch.Tensor
    alpha: torch.Tensor
    v: torch.Tensor
    one_sided: torch.Tensor | None = None
    window: torch.Tensor | None = None
    q_cols: torch.Tensor | None = None  # q as [B, K, d], contiguous: the kernel's layout

    def __post_init__(self) -> None:
        if self.q_cols is None:
            self.q_cols = self.q.transpose(1, 2).contiguous()
        # Broadcast-ready views, made once per batch of rows (a decode loop reuses them). A
        # term that is exact to skip is None: − 0 (c = 0, ablation), × 1 (α = 1), + 0 (v = 0).
        self._c = self.c[:, None, :] if bool(self.c.any()) else None
        self._alpha = self.alpha[:, None, None] if bool((self.alpha != 1).any()) else None
        self._v = self.v[:, None, :] if bool(self.v.any()) else None
        self._cols = self.q_cols[:, None]  # [B, 1, K, d]
        self._columns = self.q_cols[:, None].unbind(2)  # K × [B, 1, d]
        # A plain projection (ablation at strength 1: K = 1, c = 0, α = 1, v = 0, two-sided,
        # every position): the hooks call `project_out` on it directly, three kernels and no
        # bookkeeping (49 sites per token; on a 2-core CPU each small kernel between two
        # matmuls costs ~15–20 µs).
        plain = (self.q.shape[-1] == 1 and self._c is None and self._alpha is None
                 and self._v is None and self.one_sided is None and self.window is None)
        self._projection = self._columns[0] if plain else None

    @staticmethod
    def stack(rows: list[RowEdit], device: torch.device,
              dtype: torch.dtype = torch.float32) -> BatchEdit:
        """`dtype` is the parameters' dtype; float32 (the default) keeps the kernel in fp32."""
        d = rows[0].c.shape[0]
        k_max = max(r.q.shape[1] for r in rows)
        q = torch.zeros(len(rows), d, k_max, dtype=dtype, device=device)
        for i, r in enumerate(rows):
            if r.q.shape[1]:
                q[i, :, : r.q.shape[1]] = r.q.to(device=device, dtype=dtype)
        c = torch.stack([r.c for r in rows]).to(device=device, dtype=dtype)
        v = torch.stack([r.v for r in rows]).to(device=device, dtype=dtype)
        alpha = torch.tensor([r.alpha for r in rows], dtype=dtype, device=device)
        one_sided = None
        if any(r.one_sided for r in rows):
            one_sided = torch.tensor([r.one_sided for r in rows], device=device)
        window = None
        if any(r.window is not None for r in rows):
            window = torch.tensor([r.window or EVERY_TOKEN for r in rows], dtype=torch.long,
                                  device=device)
        return BatchEdit(q=q, c=c, alpha=alpha, v=v, one_sided=one_sided, window=window)

    def select(self, index: torch.Tensor) -> BatchEdit:
        return BatchEdit(self.q[index], self.c[index], self.alpha[index], self.v[index],
                         None if self.one_sided is None else self.one_sided[index],
                         None if self.window is None else self.window[index],
                         self.q_cols[index])


NO_BOUND = 2**62  # an unbounded side of a token window
EVERY_TOKEN = (-NO_BOUND, NO_BOUND)


def window_mask(window: torch.Tensor, token_index: torch.Tensor) -> torch.Tensor:
    """[B, 2] bounds and [B, T] token indices → [B, T] bool: the positions inside the window."""
    return (token_index >= window[:, :1]) & (token_index < window[:, 1:])


def apply_edit(h: torch.Tensor, edit: BatchEdit, token_index: torch.Tensor | None = None,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """h: [B, T, d] → edited copy, computed in the parameters' dtype (float32 by default) and
    returned in h's dtype. Cost O(B·T·d·K), small next to a layer's O(B·T·d²).
    `token_index` [B, T] (see the module docstring) is needed when the edit has a window, unless
    `mask` = window_mask(edit.window, token_index) is given (computed once for many sites)."""
    work = edit.c.dtype
    x = h if h.dtype == work else h.to(work)
    out = x if edit.q.shape[-1] == 0 else _subtract_subspace_part(x, edit)
    if edit._v is not None:
        out = out + edit._v
    out = out if out.dtype == h.dtype else out.to(h.dtype)
    if edit.window is not None:
        if mask is None:
            if token_index is None:
                raise ValueError("a targeted edit needs the token index of every position")
            mask = window_mask(edit.window, token_index)
        out = torch.where(mask[..., None], out, h)
    return out


def project_out(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """x − ⟨x, q⟩ q per row (x: [B, T, d], q: [B, 1, d], fp32): a `BatchEdit` whose
    `_projection` is q, computed as `apply_edit` computes it, bit for bit (same mul, sum and
    addcmul)."""
    return torch.addcmul(x, (x * q).sum(-1, keepdim=True), q, value=-1.0)


def _subtract_subspace_part(x: torch.Tensor, edit: BatchEdit) -> torch.Tensor:
    """x − α Σ_j g(z_j) q_j with z_j = ⟨x − c, q_j⟩, batch-invariant.

    A row's result must not depend on the other rows of its batch (mixed batch = solo, bit for
    bit). A GEMM (`bmm`) does not give that: its blocking, hence the order in which it adds a
    row's products, follows the shapes of the whole batch (measured: a row's [T, d] × [d, K]
    product differs in the last bits between a batch of one and a batch of eight, and again when
    K is zero-padded to the batch's widest row). Here every z_j is a reduction over the
    contiguous d axis of one row — the same loop whatever B, T or K — and the sum over j is
    accumulated elementwise in column order, so a zero-padded column (z_j = 0, q_j = 0) adds an
    exact zero and a row computes exactly what it computes alone. Cost: two kernels for all the
    z_j, one for α, one fused multiply-add per column subtracting from x (an ablation at
    strength 1: three kernels)."""
    z = _coordinates(x if edit._c is None else x - edit._c, edit._cols)  # [B, T, K]
    if edit.one_sided is not None:  # g = relu on the one-sided rows only
        z = torch.where(edit.one_sided[:, None, None], z.clamp_min(0), z)
    if edit._alpha is not None:  # α_b g(z) (skipped when every α is 1: × 1 is exact)
        z = edit._alpha * z
    columns = edit._columns  # K × [B, 1, d]
    weights = (z,) if len(columns) == 1 else z.split(1, dim=-1)  # K × [B, T, 1]
    out = torch.addcmul(x, weights[0], columns[0], value=-1.0)
    for w, q in zip(weights[1:], columns[1:]):
        out.addcmul_(w, q, value=-1.0)
    return out


_CHUNK = 1 << 20  # elements of the [B, t, K, d] product formed at once (4 MiB in fp32)


def _coordinates(centered: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """z[b, t, j] = Σ_i centered[b, t, i] · cols[b, 0, j, i]: a product and a sum over the last
    axis, in chunks of positions so that a long prefill never forms a large [B, T, K, d]."""
    batch, tokens, _ = centered.shape
    step = max(1, _CHUNK // max(1, batch * cols.shape[2] * cols.shape[3]))
    if tokens <= step:  # a decode step, a short prefill
        return (centered.unsqueeze(2) * cols).sum(-1)
    return torch.cat([(centered[:, s:s + step].unsqueeze(2) * cols).sum(-1)
                      for s in range(0, tokens, step)], dim=1)
