"""Issue 14: a pack says what it is (format version 2: hook layout, vectors and their operations),
version-1 packs still load as what they were, and anything else is refused with the reason."""

from __future__ import annotations

import json

import pytest

from steering import PackError, load_pack
from steering.packs.format import FORMAT_VERSION, pack_paths


@pytest.fixture()
def saved(tiny_pack, tmp_path):
    tiny_pack.save(tmp_path / "p")
    return pack_paths(tmp_path / "p")


def edit(sidecar_path, change):
    meta = json.loads(sidecar_path.read_text())
    change(meta)
    sidecar_path.write_text(json.dumps(meta))


def test_sidecar_records_hook_vectors_and_version(saved, tiny_pack):
    meta = json.loads(saved[1].read_text())
    assert meta["format_version"] == FORMAT_VERSION == 2
    assert meta["hook"]["site"] == "block_input" and meta["hook"]["n_layers"] == tiny_pack.n_layers
    assert meta["vectors"]["dim"]["operations"] == ["add", "ablate"]
    assert meta["vectors"]["reference"]["operations"] == ["affine"]
    assert {f"inlp.{lay}" for lay in tiny_pack.inlp} <= set(meta["vectors"])
    assert meta["fingerprint"]["model_type"] == "qwen2" and meta["data"]


def test_version_1_packs_load_with_every_operation(saved, tiny_lm, tiny_pack):
    def legacy(meta):
        for key in ("format_version", "hook", "vectors"):
            meta.pop(key)
        meta["format_version"] = 1

    edit(saved[1], legacy)
    pack = load_pack(saved[0], model=tiny_lm.model)
    assert pack.meta["format_version"] == 1
    assert set(pack.methods) == {"actadd", "ablate", "ace", "inlp_null", "inlp_flip",
                                 "inlp_reflect", "inlp_zero_positive", "inlp_negate_positive"}


@pytest.mark.parametrize("change, match", [
    (lambda m: m.update(format_version=3), "format_version 3"),
    (lambda m: m.update(format_version="2"), "format_version '2'"),
    (lambda m: m.pop("hook"), "'hook' must be an object"),
    (lambda m: m["hook"].update(site="attn_output"), "hook site 'attn_output'"),
    (lambda m: m["hook"].update(layer_numbering="llamacpp"), "layer numbering"),
    (lambda m: m["hook"].update(n_layers=99), "99 layers"),
    (lambda m: m.update(vectors={}), "non-empty"),
    (lambda m: m["vectors"]["dim"].update(operations=["multiply"]), "operations must list"),
    (lambda m: m["vectors"]["dim"].update(tensors=["nope"]), "lacks: \\['nope'\\]"),
])
def test_bad_identity_records_are_refused(saved, change, match):
    edit(saved[1], change)
    with pytest.raises(PackError, match=match):
        load_pack(saved[0])


def test_another_hook_layout_is_refused(saved, tiny_lm):
    edit(saved[1], lambda m: m["hook"].update(blocks="transformer.h"))
    with pytest.raises(PackError, match="another hook layout.*transformer.h"):
        load_pack(saved[0], model=tiny_lm.model)


def test_operations_limit_the_methods(saved, tiny_lm):
    edit(saved[1], lambda m: m.update(vectors={"reference": m["vectors"]["reference"]}))
    pack = load_pack(saved[0], model=tiny_lm.model)
    assert pack.methods == []  # ACE needs the DiM too
    edit(saved[1], lambda m: m.update(vectors={"dim": {"tensors": ["mean_harmful"],
                                                       "operations": ["ablate"]}}))
    pack = load_pack(saved[0], model=tiny_lm.model)
    assert pack.methods == ["ablate"]
    assert "needs 'add'" in pack.unsupported("actadd")
    assert pack.unsupported("none") is None
