"""llama.cpp control vectors (GGUF) to and from actadd packs.

A control vector file is a GGUF with `general.architecture = "controlvector"`, the keys
`controlvector.model_hint` (the model type) and `controlvector.layer_count`, and one F32 1-D
tensor `direction.N` per steered layer. llama.cpp's loader (`common_control_vector_load_one`)
puts `direction.N` at offset n_embd·(N − 1) of its buffer, and `llama_adapter_cvec::apply`
fills layer il from offset n_embd·(il − 1), so `direction.N` is added to the output of block N
(0-based, after the FFN residual add: `build_cvec(cur, il)`), for every token. There is no
`direction.0` (N ≥ 1). repeng writes the same keys and numbering.

Our packs live at block inputs (`hook.site = block_input`), and the output of block N is the
input of block N + 1:

| ours: input of block l | llama.cpp | note |
|---|---|---|
| l = 0, 1 | – | not expressible (no direction.0; block 0's output is never steered) |
| 2 ≤ l < n_layers | `direction.{l − 1}` | |
| – | `direction.{n_layers − 1}` | the last block's output (the final norm's input): not a block input; dropped on import, with a note |

Export writes s · r_l for each chosen layer (r_l = the pack's DiM at its read position, s the
strength), so `--control-vector FILE` in llama.cpp equals our `actadd` at strength s on those
layers. Import makes an actadd-only pack (its `vectors` say `add`, so ablate/ACE/INLP are refused):
the direction of each layer sits in `mean_harmful`, `mean_harmless` is zero, one read position.
Apply it as llama.cpp does with `steering.layers` = the sidecar's `concept.layers` (all of them)
at strength 1 × the llama.cpp scale.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from steering import __version__
from steering.packs.format import PackError, SteeringPack

ARCH = "controlvector"


def export_control_vector(pack: SteeringPack, out: str | Path, layers: list[int] | None = None,
                          strength: float = 1.0, model_hint: str | None = None) -> Path:
    """Write `pack`'s actadd vectors (default: its selected layer) as a llama.cpp GGUF."""
    import gguf

    if why := pack.unsupported("actadd"):
        raise PackError(why)
    layers = sorted(set(layers if layers is not None else [pack.layer]))
    bad = [lay for lay in layers if not 2 <= lay < pack.n_layers]
    if bad:
        raise PackError(f"layers {bad} cannot be written as llama.cpp control vectors: our layer "
                        f"l (input of block l) is llama.cpp's direction.(l-1), which exists for "
                        f"2 <= l < {pack.n_layers}")
    hint = model_hint or (pack.meta.get("fingerprint") or {}).get("model_type") or "unknown"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out), ARCH)
    writer.add_string(f"{ARCH}.model_hint", hint)
    writer.add_uint32(f"{ARCH}.layer_count", len(layers))
    writer.add_string("steering.pack", pack.name)
    writer.add_string("steering.concept", pack.concept)
    writer.add_float32("steering.strength", float(strength))
    writer.add_string("steering.layers", ",".join(map(str, layers)))
    for lay in layers:
        vec = (float(strength) * pack.dim(lay).double()).float().numpy().astype(np.float32)
        writer.add_tensor(f"direction.{lay - 1}", vec)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _field(reader, key: str):
    field = reader.get_field(key)
    if field is None:
        return None
    value = field.contents()
    return value


def read_control_vector(path: str | Path) -> tuple[dict[int, torch.Tensor], dict]:
    """{llama.cpp layer N: direction} and the file's metadata, checked as llama.cpp checks."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise PackError(f"control vector {path} does not exist")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError, struct.error, … on a bad file
        raise PackError(f"{path} is not a GGUF file ({type(exc).__name__}: {exc})") from None
    arch = _field(reader, "general.architecture")
    if arch != ARCH:
        raise PackError(f"{path} is a GGUF of architecture {arch!r}, not a control vector "
                        f"({ARCH!r})")
    directions: dict[int, torch.Tensor] = {}
    for t in reader.tensors:
        prefix, _, index = t.name.partition(".")
        if prefix != "direction" or not index.isdigit() or int(index) == 0:
            raise PackError(f"{path}: tensor {t.name!r} is not direction.N with N >= 1")
        if t.tensor_type != gguf.GGMLQuantizationType.F32 or len(t.shape) != 1:
            raise PackError(f"{path}: tensor {t.name!r} must be 1-D F32")
        vec = torch.from_numpy(np.array(t.data, dtype=np.float32).reshape(-1))
        n = int(index)
        directions[n] = directions.get(n, torch.zeros_like(vec)) + vec  # summed, as llama.cpp
    if not directions:
        raise PackError(f"{path} holds no direction tensors")
    if len({v.numel() for v in directions.values()}) != 1:
        raise PackError(f"{path}: direction tensors of different sizes")
    meta = {"model_hint": _field(reader, f"{ARCH}.model_hint"),
            "layer_count": _field(reader, f"{ARCH}.layer_count")}
    return directions, meta


def import_control_vector(path: str | Path, model, name: str, scale: float = 1.0
                          ) -> SteeringPack:
    """An actadd-only pack for `model` from a llama.cpp / repeng control-vector GGUF."""
    from steering.models.fingerprint import fingerprint
    from steering.packs.identity import hook_layout

    directions, info = read_control_vector(path)
    fp = fingerprint(model)
    d, n_layers = fp["hidden_size"], fp["n_layers"]
    size = next(iter(directions.values())).numel()
    if size != d:
        raise PackError(f"{path}: directions have {size} elements, the model's hidden size is "
                        f"{d}")
    hint = info["model_hint"]
    if hint and hint != fp["model_type"]:
        raise PackError(f"{path} was made for model type {hint!r}; this model is "
                        f"{fp['model_type']!r}")
    kept = {n + 1: v for n, v in directions.items() if n + 1 < n_layers}
    dropped = sorted(n for n in directions if n + 1 >= n_layers)
    if not kept:
        raise PackError(f"{path}: no direction lands on a block input of this {n_layers}-layer "
                        f"model (files' layers: {sorted(directions)})")
    means = torch.zeros(n_layers, 1, d)
    for layer, v in kept.items():
        means[layer, 0] = float(scale) * v
    layer = max(kept, key=lambda lay: float(kept[lay].norm()))
    pack = SteeringPack(name=name, mean_harmful=means, mean_harmless=torch.zeros_like(means),
                        positions=[-1], layer=layer, position=-1)
    pack.meta = {
        "concept": {"name": name, "kind": "imported", "source": str(path),
                    "format": "llama.cpp control vector", "model_hint": hint,
                    "layers": sorted(kept), "llamacpp_layers": sorted(directions),
                    "dropped_llamacpp_layers": dropped, "scale": float(scale)},
        "fingerprint": fp,
        "hook": hook_layout(model),
        "vectors": {"dim": {"tensors": ["mean_harmful", "mean_harmless"],
                            "value": "the file's direction.(l-1) at layer l (mean_harmless = 0)",
                            "operations": ["add"]}},
        "tool_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    return pack
