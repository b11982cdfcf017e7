"""A model's identity for packs: architecture shape, a few embedding values, and — for a model
loaded from a local checkpoint folder — the SHA-256 of its weight files."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from transformers import PreTrainedModel

from steering.models.file_hash import files_sha256, weight_files
from steering.models.layers import discover, hidden_size


def weights_sha256(model: PreTrainedModel) -> str | None:
    """The digest of the weight files of the folder `model` was loaded from (every byte, hashed
    once per file version); None for a model built in memory or loaded by hub id."""
    source = str(getattr(model.config, "_name_or_path", "") or "")
    if not source or not Path(source).is_dir():
        return None
    files = weight_files(source)
    return files_sha256(files) if files else None


def fingerprint(model: PreTrainedModel) -> dict:
    """Model identity that survives a change of dtype or device.

    `arch` hashes the architecture's shape; `probe` holds a few embedding values (fp32) that a
    pack compares with a tolerance, so a pack made on fp32 still loads on bf16 but not on
    another checkpoint of the same shape; `weights` (`weights_sha256`) is the checkpoint's
    files, whatever dtype they are loaded in, so an update of any weight — not only of the 64
    probed values — is seen.
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
    return {"arch": arch, "probe": [round(x, 6) for x in probe], "weights": weights_sha256(model),
            **shape}
