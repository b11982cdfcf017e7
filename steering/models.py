"""Loading a chat model: hub id or folder, local GGUF file, or the embedded default."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from . import embedded
from .hooks import SteeringHooks
from .layers import ResidualLayout, discover, hidden_size

log = logging.getLogger(__name__)

DEFAULT_MODEL = "embedded"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: object
    model_id: str  # what the user asked for, e.g. "embedded" or a hub id
    name: str  # a short served name, e.g. "qwen2.5-coder-0.5b-instruct"
    layout: ResidualLayout = field(init=False)

    def __post_init__(self) -> None:
        self.layout = discover(self.model)

    @cached_property
    def hooks(self) -> SteeringHooks:
        """The model's steering hooks, attached on first use (idle until rows are set)."""
        return SteeringHooks(self.layout, self.device, self.dtype, self.d_model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def n_layers(self) -> int:
        return self.layout.n_layers

    @property
    def d_model(self) -> int:
        return hidden_size(self.model)

    @property
    def context_length(self) -> int:
        cfg = self.model.config
        return int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 2048))


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype in (None, "", "auto"):
        # bf16 on GPUs that have it; fp32 on CPU, where half precision is slow and lossy.
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)} or auto")
    return DTYPES[dtype]


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


def _prepare_tokenizer(tokenizer) -> None:
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def load_model(spec: str = DEFAULT_MODEL, device: str | None = None, dtype: str | None = None,
               gguf_cache: bool = True) -> LoadedModel:
    """Load `spec`: "embedded", a folder, a `.gguf` file, or a hub id (from the local hub cache)."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    name = spec
    if spec == DEFAULT_MODEL:
        folder: str | Path = embedded.embedded_model_dir()
        name = embedded.EMBEDDED_ID
    elif spec.endswith(".gguf"):
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {spec} does not exist")
        folder = _gguf_cache_folder(path) if gguf_cache else None
        if folder is None or not (Path(folder) / "config.json").is_file():
            target = Path(folder) if folder else Path(embedded.cache_root()) / "tmp-gguf"
            convert_gguf_to_folder(path, target)
            folder = target
        name = path.stem
    else:
        folder = spec
        name = Path(spec).name if Path(spec).exists() else spec.split("/")[-1]
    log.info("loading model %s on %s as %s", folder, dev, dt)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dt)
    model.to(dev)
    model.eval()
    model.requires_grad_(False)
    _prepare_tokenizer(tokenizer)
    return LoadedModel(model=model, tokenizer=tokenizer, model_id=spec, name=name.lower())


def _gguf_cache_folder(path: Path) -> Path:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return embedded.cache_root() / "models" / f"{path.stem}-{digest.hexdigest()[:16]}"


def wrap_model(model: PreTrainedModel, tokenizer, name: str = "model") -> LoadedModel:
    """A LoadedModel around objects built in memory (tests, notebooks)."""
    model.eval()
    model.requires_grad_(False)
    _prepare_tokenizer(tokenizer)
    return LoadedModel(model=model, tokenizer=tokenizer, model_id=name, name=name)


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
