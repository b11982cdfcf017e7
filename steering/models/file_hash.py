"""SHA-256 of whole files, computed once per file version and remembered.

A weight file can be updated in place with its size unchanged; a key built from its size and a
few sampled bytes then keeps naming the old weights (a stale int8 conversion, a pack accepted for
weights it was not made for). So every byte is hashed — once: the digest is remembered by the
file's identity (device, inode, size, modification time in ns), in this process and in
`<cache root>/file-hashes.json`, so later starts cost one `stat` per file. A rewrite changes
the modification time (or the inode, when the file is replaced by a rename), and the file is
hashed again.

    file_sha256(path)              # hex digest of the whole file
    files_sha256(paths)            # one digest over several files' names and digests
    weight_files(folder)           # a checkpoint folder's weight files
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterable
from pathlib import Path

from steering.models.embedded import cache_root

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
_CHUNK = 1 << 24
_lock = threading.Lock()
_memo: dict[str, tuple[tuple[int, int, int, int], str]] = {}


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _store_path() -> Path:
    return cache_root() / "file-hashes.json"


def _read_store(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_store(path: Path, key: str, ident: tuple, digest: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read_store(path)
        data[key] = {"identity": list(ident), "sha256": digest}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError as exc:  # a read-only cache only costs the next start a re-hash
        log.debug("could not remember the hash of %s: %s", key, exc)


def _hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of the whole file at `path`, hashed only when its identity is new."""
    real = Path(path).resolve()
    key = str(real)
    ident = _identity(real.stat())
    with _lock:
        hit = _memo.get(key)
        if hit is not None and hit[0] == ident:
            return hit[1]
        store = _store_path()
        entry = _read_store(store).get(key)
        if isinstance(entry, dict) and tuple(entry.get("identity", ())) == ident \
                and isinstance(entry.get("sha256"), str):
            _memo[key] = (ident, entry["sha256"])
            return entry["sha256"]
    digest = _hash(real)
    if _identity(real.stat()) != ident:  # written while we read: do not remember a torn read
        return digest
    with _lock:
        _memo[key] = (ident, digest)
        _write_store(store, key, ident, digest)
    return digest


def weight_files(folder: str | Path) -> list[Path]:
    """A checkpoint folder's weight files (safetensors, bin, pt, gguf), in name order."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix in WEIGHT_SUFFIXES)


def files_sha256(paths: Iterable[str | Path]) -> str:
    """One digest over several files: each file's name and whole-file SHA-256, in name order."""
    digest = hashlib.sha256()
    for p in sorted(Path(p) for p in paths):
        digest.update(f"{p.name}:{file_sha256(p)}\n".encode())
    return digest.hexdigest()
