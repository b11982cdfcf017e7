"""A model's identity for packs: architecture shape plus a few embedding values."""

from __future__ import annotations

import hashlib

import torch
from transformers import PreTrainedModel

from steering.models.layers import discover, hidden_size


def fingerprint(model: PreTrainedModel) -> dict:
    """Model identity that survives a change of dtype or device.

    `arch` hashes the architecture's shape; `probe` holds a few embedding values (fp32) that a
    pack compares with a tolerance, so a pack made on fp32 still loads on bf16 but not on
    another checkpoint of the same shape.
    """
    cfg = model.config
    shape = {
        "model_type": cfg.model_type,
        "hidden_size": hidden_size(model),
        "n_layers": len(discover(model).blocks),
        "vocab_size": int(cfg.vocab_size),
    }
    arch = hashlib.sha256(repr(sorted(shape.items())).encode()).hexdigest()[:16]
    emb = discover(model).embedding.weight
    rows = torch.linspace(0, emb.shape[0] - 1, 8).long()
    probe = emb[rows.to(emb.device), :8].float().cpu().flatten().tolist()
    return {"arch": arch, "probe": [round(x, 6) for x in probe], **shape}
