"""Issue 28 item 10 on tiny checkpoints: weights updated in place (same size, bytes changed in the
middle) give a new int8 cache key and a new pack fingerprint, while each file is hashed only once
per version (remembered by device, inode, size and mtime)."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from steering import load_model
from steering.models import file_hash, int8_cache
from steering.models.fingerprint import fingerprint
from steering.packs.format import PackError, check_compatible
from testkit.tiny import make_tiny


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STEERING_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(file_hash, "_memo", {})
    return tmp_path / "cache"


def flip_middle_byte(path) -> None:
    """An in-place update: same size, same first and last MiB, one byte in the middle changed
    (and the old modification time put back, as a copy tool preserving times would)."""
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(st.st_size // 2)
        b = f.read(1)
        f.seek(st.st_size // 2)
        f.write(bytes([b[0] ^ 0x01]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))


def test_whole_file_is_hashed_once_per_version(cache, tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    path.write_bytes(os.urandom(3 << 20))
    calls = []
    real_hash = file_hash._hash
    monkeypatch.setattr(file_hash, "_hash", lambda p: calls.append(p) or real_hash(p))
    first = file_hash.file_sha256(path)
    assert file_hash.file_sha256(path) == first and len(calls) == 1  # remembered in-process
    monkeypatch.setattr(file_hash, "_memo", {})  # a new process: the store on disk answers
    assert file_hash.file_sha256(path) == first and len(calls) == 1
    assert (cache / "file-hashes.json").is_file()
    flip_middle_byte(path)
    second = file_hash.file_sha256(path)
    assert second != first and len(calls) == 2


def test_int8_cache_key_sees_a_change_in_the_middle(cache, tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(os.urandom(5 << 20))  # > 2 × the old 1 MiB edges
    before = int8_cache.cache_key(folder)
    assert int8_cache.cache_key(folder) == before
    flip_middle_byte(folder / "model.safetensors")
    assert int8_cache.cache_key(folder) != before


def test_pack_fingerprint_sees_updated_weights(cache, tmp_path, tiny_pack):
    tiny = make_tiny("qwen2")
    folder = tmp_path / "tiny"
    tiny.model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    lm = load_model(str(folder), device="cpu", dtype="float32")
    fp = fingerprint(lm.model)
    assert fp["weights"] is not None and fp["probe"] == fingerprint(tiny.model)["probe"]
    assert fingerprint(tiny.model)["weights"] is None  # built in memory: no files to hash
    pack = replace(tiny_pack, meta={**tiny_pack.meta, "fingerprint": fp})
    check_compatible(pack, lm.model)
    # update one weight far from the embedding rows the probe reads, in place
    weights = folder / "model.safetensors"
    tensors = load_file(str(weights))
    name = next(k for k in tensors if "mlp.down_proj" in k)
    tensors[name] = tensors[name] + 0.5
    save_file(tensors, str(weights), metadata={"format": "pt"})
    updated = load_model(str(folder), device="cpu", dtype="float32")
    assert fingerprint(updated.model)["probe"] == fp["probe"]  # the old check saw nothing
    with pytest.raises(PackError, match="other weights"):
        check_compatible(pack, updated.model)
    assert not torch.equal(dict(updated.model.named_parameters())[name],
                           dict(lm.model.named_parameters())[name])
