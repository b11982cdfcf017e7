"""The one steering kernel.

Every method is the affine edit (Arditi et al. 2024 eq. 4–5, Marshall et al. 2024 eq. 3,
Ravfogel et al. 2020 for the INLP projections)

    h' = h − α · Q Qᵀ (h − c) + v          Q: d×k orthonormal, c: reference point, v = β·direction

applied per row of a batch: each row b has its own Q_b (zero-padded to the batch's widest k — a
zero column contributes nothing), c_b, α_b and v_b, so one call serves a batch that mixes methods.
A row with α_b = 0 and v_b = 0 is left exactly unchanged.
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
    """Stacked per-row parameters for one site. q: [B, d, K], c: [B, d], alpha: [B], v: [B, d]."""

    q: torch.Tensor
    c: torch.Tensor
    alpha: torch.Tensor
    v: torch.Tensor

    @staticmethod
    def stack(rows: list[RowEdit], device: torch.device, dtype: torch.dtype) -> BatchEdit:
        d = rows[0].c.shape[0]
        k_max = max(r.q.shape[1] for r in rows)
        q = torch.zeros(len(rows), d, k_max, dtype=dtype, device=device)
        for i, r in enumerate(rows):
            if r.q.shape[1]:
                q[i, :, : r.q.shape[1]] = r.q.to(device=device, dtype=dtype)
        c = torch.stack([r.c for r in rows]).to(device=device, dtype=dtype)
        v = torch.stack([r.v for r in rows]).to(device=device, dtype=dtype)
        alpha = torch.tensor([r.alpha for r in rows], dtype=dtype, device=device)
        return BatchEdit(q=q, c=c, alpha=alpha, v=v)

    def select(self, index: torch.Tensor) -> BatchEdit:
        return BatchEdit(self.q[index], self.c[index], self.alpha[index], self.v[index])


def apply_edit(h: torch.Tensor, edit: BatchEdit) -> torch.Tensor:
    """h: [B, T, d] → edited copy. Cost O(B·T·d·K), small next to a layer's O(B·T·d²)."""
    out = h
    if edit.q.shape[-1] > 0:
        centered = h - edit.c[:, None, :]
        coords = torch.bmm(centered, edit.q)  # [B, T, K]: coordinates in the subspace
        out = out - edit.alpha[:, None, None] * torch.bmm(coords, edit.q.transpose(1, 2))
    return out + edit.v[:, None, :]
