"""Finding 3 of issue 12: packs are recognised as safetensors by their structure, not their first
byte. A safetensors file starts with its header length (little-endian), so about one header in
32 starts with 0x80 — pickle's protocol marker. Saving and reloading packs of many shapes must
always work, and pickles must still be refused."""

from __future__ import annotations

import pickle

import pytest
import torch

from steering.packs.format import InlpDirections, PackError, SteeringPack, load_pack


def _pack(n_layers: int, n_pos: int, d: int, inlp_layers: int) -> SteeringPack:
    g = torch.Generator().manual_seed(n_layers * 1000 + n_pos * 100 + d + inlp_layers)
    mh = torch.randn(n_layers, n_pos, d, generator=g)
    inlp = {}
    for lay in range(min(inlp_layers, n_layers)):
        q, _ = torch.linalg.qr(torch.randn(d, 2, generator=g))
        inlp[lay] = InlpDirections(q.T.contiguous(), torch.rand(2, generator=g),
                                   torch.randn(2, generator=g))
    return SteeringPack("p", mh, torch.randn(n_layers, n_pos, d, generator=g),
                        positions=list(range(-n_pos, 0)), layer=0, position=-1, inlp=inlp,
                        meta={"note": "x" * (n_layers + d)})


def test_packs_of_many_shapes_reload(tmp_path):
    leading = []
    shapes = [(n_layers, n_pos, d, inlp_layers) for n_layers in (1, 2, 3, 5, 8, 13, 24)
              for n_pos in (1, 2, 5) for d in (4, 16, 64, 300)
              for inlp_layers in (0, 1, 3, 11)]
    for n_layers, n_pos, d, inlp_layers in shapes:
        pack = _pack(n_layers, n_pos, d, inlp_layers)
        path = pack.save(tmp_path / "p")
        leading.append(path.read_bytes()[0])
        back = load_pack(path)
        assert torch.equal(back.mean_harmful, pack.mean_harmful)
        assert torch.equal(back.mean_harmless, pack.mean_harmless)
        assert sorted(back.inlp) == sorted(pack.inlp)
    assert 0x80 in leading  # the case that used to be refused as "pickle" was exercised


@pytest.mark.parametrize("payload", [
    pickle.dumps({"mean_harmful": [1.0]}, protocol=2),
    pickle.dumps({"mean_harmful": [1.0]}, protocol=5),
    b"PK\x03\x04" + b"\x00" * 64,
])
def test_pickles_and_zips_are_still_refused(tmp_path, tiny_pack, payload):
    tiny_pack.save(tmp_path / "x")
    (tmp_path / "x.safetensors").write_bytes(payload)
    with pytest.raises(PackError, match="pickle"):
        load_pack(tmp_path / "x")


def test_header_longer_than_the_file_is_refused(tmp_path, tiny_pack):
    tiny_pack.save(tmp_path / "x")
    raw = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "x.safetensors").write_bytes(raw[:8] + raw[8:20])
    with pytest.raises(PackError, match="not a valid safetensors"):
        load_pack(tmp_path / "x")
