"""Loading a chat model: hub id or folder, local GGUF file, or the embedded default."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
)

from steering.models import embedded, int8_cache
from steering.models.file_hash import file_sha256
from steering.models.fused_layers import use_fused_layers
from steering.models.gguf import convert_gguf_to_folder
from steering.models.layers import ResidualLayout, discover, hidden_size
from steering.models.precision import apply_precision, load_dtype, resolve_precision

log = logging.getLogger(__name__)

DEFAULT_MODEL = "embedded"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: object
    model_id: str  # what the user asked for, e.g. "embedded" or a hub id
    name: str  # a short served name, e.g. "qwen2.5-coder-0.5b-instruct"
    precision: str = "fp32"  # fp32, bf16, fp16, int8, int4 (steering.models.precision)
    layout: ResidualLayout = field(init=False)

    def __post_init__(self) -> None:
        self.layout = discover(self.model)
        if self.precision == "int8":  # the same arithmetic in fewer operations (fused_layers.py)
            use_fused_layers(self.model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The residual stream's dtype (fp32 for int8 weights, whose embedding table is fp16)."""
        if self.precision == "int8":
            return torch.float32
        return self.model.get_input_embeddings().weight.dtype

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


def eos_ids(lm: LoadedModel) -> set[int]:
    """The ids that end an answer: the generation config's EOS ids and the tokenizer's."""
    ids: set[int] = set()
    for source in (getattr(lm.model, "generation_config", None), lm.tokenizer):
        eos = getattr(source, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif eos:
            ids.update(int(x) for x in eos)
    return ids


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


def _prepare_tokenizer(tokenizer) -> None:
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def choose_precision(precision: str | None, dtype: str | None, device: torch.device) -> str:
    """`precision` wins, except that `auto` gives way to an explicit `dtype` (the older spelling);
    with neither, the library's full-precision default (fp32 on CPU, bf16 on CUDA)."""
    explicit_dtype = dtype not in (None, "", "auto")
    if precision not in (None, "") and not (precision == "auto" and explicit_dtype):
        return resolve_precision(precision, device)
    dt = resolve_dtype(dtype, device)
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dt]


def load_model(spec: str = DEFAULT_MODEL, device: str | None = None, dtype: str | None = None,
               gguf_cache: bool = True, precision: str | None = None,
               cache_int8: bool = True) -> LoadedModel:
    """Load `spec`: "embedded", a folder, a `.gguf` file, or a hub id (from the local hub cache).

    `precision` (steering.models.precision): auto, fp32, bf16, fp16, int8, int4. None keeps the
    library's full-precision default (fp32 on CPU, bf16 on CUDA, or `dtype` when given); the
    `steer` command line and the server pass `auto` (int8 on CPU). `cache_int8`: keep the
    converted int8 model on disk and load it from there next time (steering.models.int8_cache).
    """
    dev = resolve_device(device)
    prec = choose_precision(precision, dtype, dev)
    dt = load_dtype(prec)
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
    log.info("loading model %s on %s in %s", folder, dev, prec)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    _prepare_tokenizer(tokenizer)
    cached = _int8_cache_file(folder, prec, dev) if cache_int8 else None
    model = _load_cached_int8(cached, folder) if cached is not None else None
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dt)
        model.to(dev)
        model.eval()
        model.requires_grad_(False)
        apply_precision(model, prec, tokenizer)
        if cached is not None:
            _save_cached_int8(model, cached)
    return LoadedModel(model=model, tokenizer=tokenizer, model_id=spec, name=name.lower(),
                       precision=prec)


def model_cached(spec: str = DEFAULT_MODEL, device: str | None = None,
                 dtype: str | None = None, precision: str | None = None) -> bool:
    """Whether `load_model` would load `spec` from what is already on disk, without converting
    anything (the embedded GGUF dequantized, a GGUF file converted, the int8 model cached).
    Cheap: a few `stat`s and, once per file version, a hash (`steering.models.file_hash`)."""
    dev = resolve_device(device)
    prec = choose_precision(precision, dtype, dev)
    if spec == DEFAULT_MODEL:
        folder = embedded.embedded_model_cached()
        if folder is None:
            return False
    elif spec.endswith(".gguf"):
        if not Path(spec).is_file():
            return True  # load_model will say what is wrong
        folder = _gguf_cache_folder(Path(spec))
        if not (folder / "config.json").is_file():
            return False
    else:
        folder = Path(spec)
    cached = _int8_cache_file(folder, prec, dev)
    return cached is None or cached.is_file()


def _int8_cache_file(folder: str | Path, precision: str, device: torch.device) -> Path | None:
    """Where the int8 conversion of a local checkpoint folder is cached (None: not cached)."""
    folder = Path(folder)
    if precision != "int8" or device.type != "cpu" or not (folder / "config.json").is_file():
        return None
    try:
        return int8_cache.cache_path(folder, embedded.cache_root())
    except OSError as exc:
        log.warning("int8 cache unavailable: %s", exc)
        return None


def _load_cached_int8(path: Path, folder: str | Path) -> PreTrainedModel | None:
    if not path.is_file():
        return None
    try:
        model = int8_cache.load(path, AutoConfig.from_pretrained(folder), AutoModelForCausalLM)
    except Exception as exc:  # a torn or foreign file: convert again (and overwrite it)
        log.warning("int8 cache %s unusable (%s: %s); converting again", path,
                    type(exc).__name__, exc)
        return None
    if (Path(folder) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    model.eval()
    model.requires_grad_(False)
    log.info("int8 model loaded from its cache %s", path)
    return model


def _save_cached_int8(model: PreTrainedModel, path: Path) -> None:
    try:
        int8_cache.save(model, path)
        log.info("int8 model cached at %s", path)
    except OSError as exc:  # a read-only cache only costs the next start its conversion
        log.warning("could not write the int8 cache %s: %s", path, exc)


def _gguf_cache_folder(path: Path) -> Path:
    digest = file_sha256(path)  # hashed once per file version (steering.models.file_hash)
    return embedded.cache_root() / "models" / f"{path.stem}-{digest[:16]}"


def wrap_model(model: PreTrainedModel, tokenizer, name: str = "model",
               precision: str | None = None) -> LoadedModel:
    """A LoadedModel around objects built in memory (tests, notebooks); `precision` int8/int4
    quantizes it in place (float precisions: cast it before wrapping)."""
    model.eval()
    model.requires_grad_(False)
    first = next(model.parameters())
    prec = resolve_precision(precision, first.device) if precision else \
        {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(first.dtype, "fp32")
    _prepare_tokenizer(tokenizer)
    apply_precision(model, prec, tokenizer)
    return LoadedModel(model=model, tokenizer=tokenizer, model_id=name, name=name,
                       precision=prec)
