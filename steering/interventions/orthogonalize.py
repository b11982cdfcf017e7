"""Weight orthogonalization (Arditi et al. 2024, §4.1): directional ablation baked into weights.

Every matrix that writes into the residual stream — the token (and position) embedding, each
block's attention output projection and MLP down projection — is projected onto the orthogonal
complement of r̂: W ← W − r̂ r̂ᵀ W (and its bias likewise). The result is an ordinary model that
never writes along r̂, equivalent to ablating r̂ at every layer and position.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from steering.models.layers import get_path
from steering.models.loading import LoadedModel
from steering.packs.format import SteeringPack


def _project_out_rows(weight: torch.Tensor, r: torch.Tensor, dim: int) -> None:
    """Remove the r̂ component along axis `dim` (the axis of size d_model), in place."""
    r = r.to(weight.device, weight.dtype)
    if dim == 0:  # weight [d, in]
        weight -= torch.outer(r, r @ weight)
    else:  # weight [*, d]
        weight -= torch.outer(weight @ r, r)


def _orthogonalize_writer(module: nn.Module, r: torch.Tensor, d: int) -> None:
    w = module.weight.data
    if isinstance(module, nn.Embedding):
        _project_out_rows(w, r, dim=1)
    elif isinstance(module, nn.Linear):  # weight [out=d, in]
        _project_out_rows(w, r, dim=0)
    elif w.ndim == 2 and w.shape[1] == d:  # GPT-2 Conv1D: weight [in, out=d]
        _project_out_rows(w, r, dim=1)
    else:
        raise ValueError(f"cannot orthogonalize {type(module).__name__} with weight "
                         f"{tuple(w.shape)}")
    bias = getattr(module, "bias", None)
    if bias is not None:
        b = bias.data
        b -= (b @ r.to(b.device, b.dtype)) * r.to(b.device, b.dtype)


@torch.no_grad()
def orthogonalize(lm: LoadedModel, direction: torch.Tensor) -> None:
    """Edit `lm`'s weights in place so nothing writes along `direction`."""
    arch = lm.layout.arch
    if arch.attn_out_proj is None or arch.mlp_out_proj is None:
        raise ValueError(f"{lm.model.config.model_type}: residual writers end in a norm, so "
                         "weight orthogonalization is not exact; use the ablate method instead")
    r = direction.double()
    r = (r / r.norm()).float()
    d = lm.d_model
    tied = lm.model.get_output_embeddings() is not None and (
        lm.model.get_output_embeddings().weight is lm.layout.embedding.weight)
    if tied:  # keep the unembedding as it was: untie before editing the embedding
        out = lm.model.get_output_embeddings()
        out.weight = nn.Parameter(out.weight.detach().clone(), requires_grad=False)
        lm.model.config.tie_word_embeddings = False
    _orthogonalize_writer(lm.layout.embedding, r, d)
    for path in arch.extra_writers:
        _orthogonalize_writer(get_path(lm.model, path), r, d)
    for block in lm.layout.blocks:
        _orthogonalize_writer(get_path(block, arch.attn_out_proj), r, d)
        _orthogonalize_writer(get_path(block, arch.mlp_out_proj), r, d)


def export_orthogonalized(lm: LoadedModel, pack: SteeringPack, out: str | Path) -> Path:
    """Orthogonalize against the pack's DiM direction and save a plain transformers folder."""
    orthogonalize(lm, pack.dim())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lm.model.save_pretrained(out)
    lm.tokenizer.save_pretrained(out)
    return out
