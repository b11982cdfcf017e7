"""An orthogonalized model as a GGUF file llama.cpp (and Ollama) load: the model's own GGUF with
the residual writers edited (`steer orthogonalize --gguf OUT [--gguf-base BASE.gguf]`).

Weight orthogonalization (Arditi et al. 2024 §4.1) edits the matrices that write the residual
stream: W ← W − r̂ r̂ᵀ W. In llama.cpp's tensor names (the same residual basis as the HF model;
numpy order of GGUFReader's data equals HF's `weight` layout):

| GGUF tensor | HF module | edit (numpy order) |
|---|---|---|
| `token_embd.weight` [V, d] | embed_tokens | E ← E − (E r̂) r̂ᵀ |
| `blk.N.attn_output.weight` [d, in] | self_attn.o_proj | W ← W − r̂ (r̂ᵀ W) |
| `blk.N.ffn_down.weight` [d, in] | mlp.down_proj | W ← W − r̂ (r̂ᵀ W) |

Every other tensor and every metadata key is copied byte for byte. Edited tensors are written as
F32 (a quantized one is dequantized first: the edit is exact, the file a little larger). A model
whose GGUF has no `output.weight` ties its unembedding to `token_embd`; the unedited embedding is
then added as `output.weight` (llama.cpp uses it when present), as `steer orthogonalize` unties.
Architectures with other writers (GPT-2's position embedding, norm-ended writers) are refused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

EDITED_SUFFIXES = (".attn_output.weight", ".ffn_down.weight")
SUPPORTED = ("llama", "qwen2", "qwen3", "mistral", "gemma", "phi3")


def _float(t, gguf) -> np.ndarray:
    if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return np.asarray(t.data, dtype=np.float64)
    return gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64)


def orthogonalize_gguf(base: str | Path, direction: torch.Tensor, out: str | Path) -> Path:
    """Write `base` with nothing writing along `direction` to `out`."""
    import gguf

    reader = gguf.GGUFReader(str(base))
    arch_field = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    arch = arch_field.contents() if arch_field is not None else None
    if arch not in SUPPORTED:
        raise ValueError(f"{base}: GGUF architecture {arch!r} is not one whose residual writers "
                         f"are token_embd / attn_output / ffn_down ({', '.join(SUPPORTED)})")
    r = direction.double().cpu().numpy()
    r = r / max(np.linalg.norm(r), 1e-12)
    names = {t.name for t in reader.tensors}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out), arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    edited = 0
    for t in reader.tensors:
        if t.name == "token_embd.weight" or t.name.endswith(EDITED_SUFFIXES):
            w = _float(t, gguf)
            if w.shape[-1 if t.name == "token_embd.weight" else 0] != r.shape[0]:
                raise ValueError(f"{base}: {t.name} has shape {w.shape}, the direction has "
                                 f"{r.shape[0]} elements")
            if t.name == "token_embd.weight":
                if "output.weight" not in names:  # tied: keep the unembedding as it was
                    writer.add_tensor("output.weight", t.data, raw_shape=t.data.shape,
                                      raw_dtype=t.tensor_type)
                w = w - np.outer(w @ r, r)
            else:
                w = w - np.outer(r, r @ w)
            writer.add_tensor(t.name, w.astype(np.float32))
            edited += 1
        else:
            writer.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    if not edited:
        raise ValueError(f"{base}: no token_embd / attn_output / ffn_down tensors to edit")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
