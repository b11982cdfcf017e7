"""GGUF files to ordinary transformers model folders (dequantized once, through the `gguf` package)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel


def _strip_gguf_quantizer(model: PreTrainedModel) -> None:
    # The GGUF loader dequantizes every tensor; what remains is an ordinary model, but it keeps
    # a marker that makes save_pretrained refuse. Drop it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def convert_gguf_to_folder(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF file into an fp32 safetensors model folder (with its tokenizer)."""
    gguf = Path(gguf)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    _strip_gguf_quantizer(model)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
