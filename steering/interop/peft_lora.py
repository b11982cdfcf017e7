"""Directional ablation as a rank-1 PEFT LoRA adapter (`steer export --format peft-lora`).

Ablating r̂ everywhere (Arditi et al. 2024 §2.4) equals orthogonalizing every matrix that writes
the residual stream (§4.1): W' = W − r̂ r̂ᵀ W. That change has rank 1, so a LoRA adapter of rank 1
with scaling lora_alpha / r = 1 reproduces it exactly (Hu et al. 2021: W' = W + B A · α/r):

| module (Llama/Qwen names) | base weight | lora_A | lora_B | ΔW = B·A |
|---|---|---|---|---|
| `self_attn.o_proj`, `mlp.down_proj` (nn.Linear) | W [d, in] | r̂ᵀW [1, in] | −r̂ [d, 1] | −r̂ r̂ᵀ W |
| `embed_tokens` (nn.Embedding) | E [V, d] | lora_embedding_A = (E r̂)ᵀ [1, V] | lora_embedding_B = −r̂ [d, 1] | rows: −(E r̂) r̂ᵀ |

PEFT's embedding LoRA adds (A[:, token]ᵀ · Bᵀ) · scaling to the looked-up row, which is the row's
−(e·r̂) r̂ᵀ above. Tensor names follow PEFT's saved state dict:
`base_model.model.<module path>.lora_A.weight` / `.lora_B.weight` for linears and
`base_model.model.<path>.lora_embedding_A` / `.lora_embedding_B` for the embedding.

**Tied embeddings** (Qwen2.5-0.5B: `embed_tokens` and `lm_head` share one matrix). The LoRA
delta on `embed_tokens` lives in the adapter's forward of the embedding only, so the unembedding
stays the base matrix — what `steer orthogonalize` does by untying. Merging the adapter
(`merge_and_unload`) into a tied model would write the delta into the shared matrix and change
`lm_head` too (the final RMSNorm's gain does not keep the residual orthogonal to r̂, so logits
would move): untie first (`model.config.tie_word_embeddings = False` and a copy of the weight for
`lm_head`) or serve the adapter unmerged, and leave PEFT's `ensure_weight_tying` off (it would
give `lm_head` the delta too). `steering_export.json` records `tied_embeddings`.

Only exact cases are exported: writers that are nn.Linear without bias and nn.Embedding, no extra
writers (GPT-2's position embedding, Conv1D) and no norm-ended writers (Gemma2/3).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from steering.models.layers import get_path
from steering.models.loading import LoadedModel
from steering.packs.format import PackError, SteeringPack

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PROVENANCE = "steering_export.json"  # ours: PEFT warns on unknown adapter_config keys


def _module_paths(lm: LoadedModel) -> tuple[str, list[str]]:
    arch = lm.layout.arch
    if arch.attn_out_proj is None or arch.mlp_out_proj is None or arch.extra_writers:
        raise PackError(f"{lm.model.config.model_type}: its residual writers are not plain "
                        "linears (norm-ended or extra writers); a LoRA cannot express ablation "
                        "exactly — use the ablate method or `steer orthogonalize`")
    writers = [f"{arch.blocks}.{i}.{sub}" for i in range(lm.n_layers)
               for sub in (arch.attn_out_proj, arch.mlp_out_proj)]
    return arch.embedding, writers


@torch.no_grad()
def ablation_lora(lm: LoadedModel, pack: SteeringPack
                  ) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(adapter tensors, adapter config, provenance) reproducing `ablate` at strength 1."""
    if why := pack.unsupported("ablate"):
        raise PackError(why)
    embedding_path, writers = _module_paths(lm)
    r = pack.dim().double()
    r = r / r.norm().clamp_min(1e-12)
    tensors: dict[str, torch.Tensor] = {}
    prefix = "base_model.model."
    for path in writers:
        module = get_path(lm.model, path)
        if not isinstance(module, nn.Linear) or module.bias is not None:
            raise PackError(f"{path} is not a bias-free nn.Linear; a LoRA cannot express its "
                            "orthogonalization exactly")
        w = module.weight.detach().double().cpu()  # [d, in]
        tensors[f"{prefix}{path}.lora_A.weight"] = (r @ w)[None, :].float().contiguous()
        tensors[f"{prefix}{path}.lora_B.weight"] = (-r)[:, None].float().contiguous()
    emb = get_path(lm.model, embedding_path)
    if not isinstance(emb, nn.Embedding):
        raise PackError(f"{embedding_path} is not an nn.Embedding")
    e = emb.weight.detach().double().cpu()  # [V, d]
    tensors[f"{prefix}{embedding_path}.lora_embedding_A"] = (e @ r)[None, :].float().contiguous()
    tensors[f"{prefix}{embedding_path}.lora_embedding_B"] = (-r)[:, None].float().contiguous()
    out_emb = lm.model.get_output_embeddings()
    tied = out_emb is not None and out_emb.weight is emb.weight
    names = sorted({p.rsplit(".", 1)[-1] for p in writers} | {embedding_path.rsplit(".", 1)[-1]})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 1, "lora_alpha": 1,
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "target_modules": names, "modules_to_save": None, "layers_to_transform": None,
        "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True,
        "base_model_name_or_path": str(lm.model_id),
    }
    provenance = {"method": "ablate", "strength": 1.0, "pack": pack.name,
                  "concept": pack.concept, "layer": pack.layer, "position": pack.position,
                  "tied_embeddings": tied,
                  "note": "with tied embeddings, do not merge without untying lm_head first, "
                          "and leave PEFT's ensure_weight_tying off (docs/packs.md)"}
    return tensors, config, provenance


def export_ablation_lora(lm: LoadedModel, pack: SteeringPack, out: str | Path) -> Path:
    """Write the adapter folder: adapter_config.json + adapter_model.safetensors (PEFT's two
    files) and steering_export.json (which pack, method, layer; tied embeddings)."""
    tensors, config, provenance = ablation_lora(lm, pack)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    (out / PROVENANCE).write_text(json.dumps(provenance, indent=2))
    return out
