"""The int8 model, converted once and kept on disk, so later starts never hold the fp32 weights.

Converting (steering.models.precision) loads the fp32 checkpoint and calibrates SmoothQuant on it
before quantizing: the start-up's memory high-water mark is about twice what the int8 model then
needs. The first start writes the result to one safetensors file; every later start builds the
model skeleton on the meta device (no storage), fills its int8 Linears from the stored int8
weights and scales and the rest (embedding, norms) from the stored float tensors.

    <cache root>/models/<checkpoint folder name>.int8-<key>.safetensors
    key = sha256(checkpoint identity, code version)[:16]

| part of the key     | what it covers                                                            |
|---------------------|---------------------------------------------------------------------------|
| checkpoint identity | config.json, every weight file's name and whole-file SHA-256 (hashed once per file version: `steering.models.file_hash`) |
| code version        | the source of precision.py and of this module, the torch version           |

Any change to the quantization code or the checkpoint gives a new key. Files of other keys are
removed once unused for `STALE_DAYS` (not at once: two checkouts or versions sharing one cache
would otherwise delete each other's file on every start).
The file is read with plain reads (no memory map), so its pages never count in RSS.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from steering.models import precision as precision_module
from steering.models.file_hash import files_sha256, weight_files
from steering.models.precision import (
    RowInt8Linear,
    half_embedding_table,
    int8_modules,
    quantize_int8,
    release_memory,
)

log = logging.getLogger(__name__)

STALE_DAYS = 7
_FIELDS = ("int8", "scale", "bias", "inv_smooth")


def cache_key(folder: Path) -> str:
    digest = hashlib.sha256()
    digest.update((folder / "config.json").read_bytes())
    digest.update(files_sha256(weight_files(folder)).encode())  # every byte, hashed once
    for module in (precision_module, __import__(__name__, fromlist=["_"])):
        digest.update(Path(module.__file__).read_bytes())
    digest.update(torch.__version__.encode())
    return digest.hexdigest()[:16]


def cache_path(folder: Path, root: Path) -> Path:
    return root / "models" / f"{folder.name}.int8-{cache_key(folder)}.safetensors"


def save(model: nn.Module, path: Path) -> None:
    """Write the int8 model (after `quantize_int8`) to `path`, atomically; long-unused keys go."""
    tensors: dict[str, torch.Tensor] = {}
    linears = int8_modules(model)
    for name, mod in linears.items():
        for field, t in mod.int8_state().items():
            tensors[f"int8/{name}/{field}"] = t.contiguous()
    for name, t in model.state_dict().items():
        tensors[f"float/{name}"] = t.contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata={"linears": json.dumps(sorted(linears))})
    del tensors
    release_memory()
    tmp.replace(path)
    stem = path.name.split(".int8-")[0]
    cutoff = time.time() - STALE_DAYS * 86400
    for stale in path.parent.glob(f"{stem}.int8-*.safetensors"):
        if stale != path and stale.stat().st_atime < cutoff and stale.stat().st_mtime < cutoff:
            stale.unlink(missing_ok=True)


def load(path: Path, config, model_class) -> nn.Module:
    """The int8 model of `config` from the file `save` wrote; nothing float is allocated for the
    Linears. `model_class`: e.g. AutoModelForCausalLM (its `from_config` builds the skeleton)."""
    config.tie_word_embeddings = False  # the int8 lm_head is its own module (quantize_int8)
    with torch.device("meta"):
        model = model_class.from_config(config, dtype=torch.float32)
    with _TensorFile(path) as f, ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        # fbgemm's weight packing is most of the load (3.8 of 6.3 s here) and releases the GIL:
        # read each module's tensors in turn, pack them on every core.
        # At most one module per core in flight, so the unpacked copies never pile up (the
        # start-up's peak RSS).
        names = dict.fromkeys(k.split("/")[1] for k in f.names if k.startswith("int8/"))
        packed: dict[str, Future] = {}
        window = os.cpu_count() or 1
        for i, name in enumerate(names):
            if i >= window:
                packed[list(packed)[i - window]].result()
            parts = {k: f.read(f"int8/{name}/{k}") for k in _FIELDS if f"int8/{name}/{k}" in f}
            packed[name] = pool.submit(RowInt8Linear.from_int8, parts["int8"], parts["scale"],
                                       parts.get("bias"), parts.get("inv_smooth"))
            del parts

        def build(name: str, linears: list[nn.Linear]) -> RowInt8Linear:
            return packed[name].result()

        quantize_int8(model, build=build)
        half_embedding_table(model)
        state = {k.removeprefix("float/"): f.read(k) for k in f.names if k.startswith("float/")}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise RuntimeError(f"int8 cache {path} does not fit the model: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    _rebuild_meta_buffers(model, config)
    release_memory()
    return model


_DTYPES = {"I8": torch.int8, "F32": torch.float32, "F64": torch.float64, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64}


class _TensorFile:
    """Reads a safetensors file's tensors with plain reads into fresh tensors: unlike a memory
    map, the file's pages never count in this process's RSS (the start-up's high-water mark)."""

    def __init__(self, path: Path):
        self._file = open(path, "rb")  # noqa: SIM115 (closed by __exit__)
        (n,) = struct.unpack("<Q", self._file.read(8))
        if n > 100 * 1024 * 1024:
            raise ValueError(f"{path}: not a safetensors file")
        header = json.loads(self._file.read(n))
        header.pop("__metadata__", None)
        self._header, self._base = header, 8 + n

    @property
    def names(self) -> list[str]:
        return list(self._header)

    def __contains__(self, name: str) -> bool:
        return name in self._header

    def read(self, name: str) -> torch.Tensor:
        info = self._header[name]
        start, end = info["data_offsets"]
        out = torch.empty(info["shape"], dtype=_DTYPES[info["dtype"]])
        view = memoryview(out.view(-1).view(torch.uint8).numpy()) if out.numel() else None
        if view is not None:
            self._file.seek(self._base + start)
            if self._file.readinto(view) != end - start:
                raise ValueError(f"{name}: truncated")
        return out

    def __enter__(self) -> _TensorFile:
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()


def _rebuild_meta_buffers(model: nn.Module, config) -> None:
    """Non-persistent buffers computed at construction (rotary inv_freq) are not in any state
    dict: build those modules again for real, from the config."""
    for name, mod in list(model.named_modules()):
        if any(b is not None and b.is_meta for b in mod.buffers(recurse=False)):
            if any(p.is_meta for p in mod.parameters(recurse=False)):
                raise RuntimeError(f"int8 cache: {name} still has meta parameters")
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, type(mod)(config=config))
