"""Steering packs: save/load round trip and every refusal (with a message naming the problem)."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from steering import PackError, SteeringSpec, build_row, load_pack
from steering.packs.format import FORMAT_VERSION, pack_paths
from testkit.archs import build_tiny
from testkit.tiny import make_tiny


@pytest.fixture()
def saved(tiny_pack, tmp_path):
    """The tiny pack saved to a fresh folder: (tensors path, sidecar path)."""
    tiny_pack.save(tmp_path / "refusal")
    return pack_paths(tmp_path / "refusal")


def rewrite(tensors_path, **changes):
    """Rewrite the pack's safetensors with some tensors replaced (None: removed)."""
    tensors = load_file(str(tensors_path))
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value is None:
            tensors.pop(key)
        else:
            tensors[key] = value
    save_file(tensors, str(tensors_path))


def edit_sidecar(sidecar_path, **changes):
    meta = json.loads(sidecar_path.read_text())
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    sidecar_path.write_text(json.dumps(meta))


# ---- round trip -----------------------------------------------------------------------------


def test_round_trip(tiny_lm, tiny_pack, saved):
    tensors_path, sidecar_path = saved
    assert tensors_path.name == "refusal.safetensors" and sidecar_path.name == "refusal.json"
    for path in (tensors_path, sidecar_path, tensors_path.with_suffix("")):
        loaded = load_pack(path, model=tiny_lm.model)
        assert loaded.name == "refusal"
        assert torch.equal(loaded.mean_harmful, tiny_pack.mean_harmful.float())
        assert torch.equal(loaded.mean_harmless, tiny_pack.mean_harmless.float())
        assert loaded.positions == tiny_pack.positions
        assert (loaded.layer, loaded.position) == (tiny_pack.layer, tiny_pack.position)
        assert loaded.inlp_layers == tiny_pack.inlp_layers
        for layer, inl in tiny_pack.inlp.items():
            got = loaded.inlp[layer]
            assert torch.equal(got.directions, inl.directions.float())
            assert torch.equal(got.accuracy, inl.accuracy.float())
            assert torch.equal(got.boundary, inl.boundary.float())
        assert loaded.max_k() == tiny_pack.max_k()
    # The sidecar carries the metadata unchanged, plus the format version.
    meta = json.loads(sidecar_path.read_text())
    assert meta["format_version"] == FORMAT_VERSION
    for key in ("fingerprint", "chat_template_hash", "selection", "data", "tool_version",
                "created", "refusal_token_ids"):
        assert meta[key] == json.loads(json.dumps(tiny_pack.meta[key])), key
    json.dumps(loaded.describe())  # describable as JSON
    # Steering rows built from the loaded pack are the same as from the original.
    for method in ("actadd", "ablate", "ace", "inlp_null", "inlp_flip"):
        a = build_row(SteeringSpec(method, 1.0), tiny_pack)
        b = build_row(SteeringSpec(method, 1.0), loaded)
        assert a.edits.keys() == b.edits.keys()
        for site in a.edits:
            torch.testing.assert_close(a.edits[site].q, b.edits[site].q)
            torch.testing.assert_close(a.edits[site].c, b.edits[site].c)
            torch.testing.assert_close(a.edits[site].v, b.edits[site].v)
            assert a.edits[site].alpha == b.edits[site].alpha


def test_the_same_model_in_another_dtype_is_accepted(tiny_lm, saved):
    bf16 = copy.deepcopy(tiny_lm.model).to(torch.bfloat16)
    load_pack(saved[0], model=bf16)


def test_name_override(saved):
    assert load_pack(saved[0], name="other").name == "other"


# ---- a pack made for another model ----------------------------------------------------------


def test_refuses_another_hidden_size(tiny_lm, saved):
    other = build_tiny("qwen2", tiny_lm.tokenizer, n_layers=4, hidden=32)
    with pytest.raises(PackError, match="hidden size 64, model has 32"):
        load_pack(saved[0], model=other.model)


def test_refuses_another_depth(saved):
    other = make_tiny("qwen2", n_layers=2)
    with pytest.raises(PackError, match="4 layers, model has 2"):
        load_pack(saved[0], model=other.model)


def test_refuses_same_shape_other_weights(saved):
    other = make_tiny("qwen2", seed=1)  # identical architecture, other random weights
    with pytest.raises(PackError, match="other weights"):
        load_pack(saved[0], model=other.model)


def test_refuses_same_shape_other_architecture(saved):
    other = make_tiny("llama")
    with pytest.raises(PackError, match="another model architecture"):
        load_pack(saved[0], model=other.model)


def test_refuses_a_pack_without_fingerprint(tiny_lm, saved):
    edit_sidecar(saved[1], fingerprint=None)
    load_pack(saved[0])  # fine without a model to check against ...
    with pytest.raises(PackError, match="no model fingerprint"):
        load_pack(saved[0], model=tiny_lm.model)  # ... but not for a model


# ---- non-finite values and wrong shapes -----------------------------------------------------


@pytest.mark.parametrize("key, bad", [
    ("mean_harmful", float("nan")),
    ("mean_harmless", float("inf")),
    ("directions", float("-inf")),
    ("boundary", float("nan")),
    ("accuracy", float("nan")),
])
def test_refuses_non_finite_values(tiny_pack, saved, key, bad):
    layer = tiny_pack.layer
    name = key if key.startswith("mean") else f"inlp__{layer}__{key}"
    t = load_file(str(saved[0]))[name.replace("__", ".")].clone()
    t.view(-1)[t.numel() // 2] = bad
    rewrite(saved[0], **{name: t})
    with pytest.raises(PackError, match="non-finite"):
        load_pack(saved[0])


def test_refuses_mismatched_mean_shapes(tiny_pack, saved):
    rewrite(saved[0], mean_harmless=tiny_pack.mean_harmless[:-1].contiguous())
    with pytest.raises(PackError, match="shapes"):
        load_pack(saved[0])


def test_refuses_means_without_positions_axis(tiny_pack, saved):
    rewrite(saved[0], mean_harmful=tiny_pack.mean_harmful[:, -1].contiguous(),
            mean_harmless=tiny_pack.mean_harmless[:, -1].contiguous())
    with pytest.raises(PackError, match="shapes"):
        load_pack(saved[0])


def test_refuses_positions_that_do_not_match(tiny_pack, saved):
    edit_sidecar(saved[1], positions=tiny_pack.positions[1:])
    with pytest.raises(PackError, match="positions"):
        load_pack(saved[0])


def test_refuses_inlp_directions_of_another_width(tiny_pack, saved):
    layer = tiny_pack.layer
    dirs = tiny_pack.inlp[layer].directions
    rewrite(saved[0], **{f"inlp__{layer}__directions": dirs[:, :32].contiguous()})
    with pytest.raises(PackError, match="wrong shapes"):
        load_pack(saved[0])


def test_refuses_inlp_accuracy_of_another_length(tiny_pack, saved):
    layer = tiny_pack.layer
    rewrite(saved[0], **{f"inlp__{layer}__accuracy": torch.zeros(99)})
    with pytest.raises(PackError, match="wrong shapes"):
        load_pack(saved[0])


def test_refuses_inlp_outside_the_layers(tiny_pack, saved):
    inl = tiny_pack.inlp[tiny_pack.layer]
    rewrite(saved[0], **{"inlp__9__directions": inl.directions.contiguous(),
                         "inlp__9__accuracy": inl.accuracy.float().contiguous(),
                         "inlp__9__boundary": inl.boundary.contiguous()})
    with pytest.raises(PackError, match="INLP layer 9"):
        load_pack(saved[0])


def test_refuses_incomplete_inlp(tiny_pack, saved):
    rewrite(saved[0], **{f"inlp__{tiny_pack.layer}__boundary": None})
    with pytest.raises(PackError, match="boundary"):
        load_pack(saved[0])


@pytest.mark.parametrize("key", ["mean_harmful", "mean_harmless"])
def test_refuses_missing_means(saved, key):
    rewrite(saved[0], **{key: None})
    with pytest.raises(PackError, match=key):
        load_pack(saved[0])


# ---- files that are not safetensors ---------------------------------------------------------


class _Trap:
    """Unpickling this creates a marker file: proof that a loader unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["torch_zip", "torch_legacy", "pickle5", "pickle0"])
def test_refuses_a_pickle_without_unpickling(tiny_pack, saved, tmp_path, writer):
    tensors_path = saved[0]
    marker = tmp_path / "unpickled.marker"
    payload = {"mean_harmful": tiny_pack.mean_harmful, "trap": _Trap(marker)}
    if writer == "torch_zip":
        torch.save(payload, tensors_path)
    elif writer == "torch_legacy":
        torch.save(payload, tensors_path, _use_new_zipfile_serialization=False)
    else:
        tensors_path.write_bytes(pickle.dumps(payload, protocol=int(writer[-1])))
    # The trap works: an unpickler would create the marker.
    with open(tensors_path, "rb") as f:
        assert f.read(1)  # non-empty
    with pytest.raises(PackError) as info:
        load_pack(tensors_path)
    assert not marker.exists()
    assert "not" in str(info.value) and str(tensors_path) in str(info.value)
    if writer.startswith("torch"):
        assert "pickle" in str(info.value)


def test_the_trap_would_fire(tmp_path):
    """Sanity check of the test above: unpickling the trap does create the marker."""
    marker = tmp_path / "m"
    pickle.loads(pickle.dumps(_Trap(marker))).close()
    assert marker.exists()


@pytest.mark.parametrize("damage", ["truncate_half", "truncate_header", "empty", "garbage",
                                    "corrupt_header", "huge_header_length"])
def test_refuses_truncated_or_corrupt_files(saved, damage):
    tensors_path = saved[0]
    data = tensors_path.read_bytes()
    if damage == "truncate_half":
        data = data[: len(data) // 2]
    elif damage == "truncate_header":
        data = data[:20]
    elif damage == "empty":
        data = b""
    elif damage == "garbage":
        data = bytes(range(256)) * 64
    elif damage == "corrupt_header":
        data = data[:8] + b"}{" + data[10:]
    else:
        data = (2**62).to_bytes(8, "little") + data[8:]
    tensors_path.write_bytes(data)
    with pytest.raises(PackError, match="not a valid safetensors"):
        load_pack(tensors_path)


def test_refuses_a_missing_file(tmp_path):
    with pytest.raises(PackError, match="does not exist"):
        load_pack(tmp_path / "nothing.safetensors")


# ---- the sidecar ----------------------------------------------------------------------------


def test_refuses_a_missing_sidecar(saved):
    saved[1].unlink()
    with pytest.raises(PackError, match="sidecar .* is missing"):
        load_pack(saved[0])


@pytest.mark.parametrize("text, match", [
    ("{not json", "not valid JSON"),
    ("[1, 2, 3]", "JSON object"),
])
def test_refuses_a_broken_sidecar(saved, text, match):
    saved[1].write_text(text)
    with pytest.raises(PackError, match=match):
        load_pack(saved[0])


@pytest.mark.parametrize("change", [{"layer": None}, {"positions": None}, {"layer": "x"},
                                    {"position": None}])
def test_refuses_a_sidecar_without_selection(saved, change):
    edit_sidecar(saved[1], **change)
    with pytest.raises(PackError, match="lacks a valid"):
        load_pack(saved[0])


@pytest.mark.parametrize("change", [{"layer": 4}, {"layer": -1}, {"position": -99}])
def test_refuses_a_selection_out_of_range(saved, change):
    edit_sidecar(saved[1], **change)
    with pytest.raises(PackError, match="out of range"):
        load_pack(saved[0])


@pytest.mark.parametrize("name", ["inlp.abc.directions", "inlp..boundary", "inlp."])
def test_refuses_inlp_tensors_without_a_layer_index(tiny_pack, saved, name):
    rewrite(saved[0], **{name.replace(".", "__"): torch.zeros(1, tiny_pack.d_model)})
    with pytest.raises(PackError, match="without a layer index"):
        load_pack(saved[0])
