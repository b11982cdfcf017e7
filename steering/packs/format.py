"""Steering packs: what extraction produces for one model.

`NAME.safetensors` holds the tensors, `NAME.json` the sidecar (`format_version`, the concept,
model identity and fingerprint, chat-template hash, chosen layer and position, the `hook` layout
and the `vectors` with the operation each was made for — see `steering.packs.identity` — the
selection scores, data hashes, tool version, creation time). Packs load only from safetensors —
never pickle — and loading checks the format version, shapes, dtypes (float32 only: an int32
tensor would load and then fail inside a kernel), finiteness, that each INLP layer's directions
are orthonormal rows, the vectors' operations and, given a model, that the pack was made for it and for its hook layout. A sidecar of format
version 1 (before `hook` and `vectors` existed) loads as what it was: an extracted pack at the
block inputs with every operation. The full description is docs/packs.md.

Tensors:
  mean_harmful, mean_harmless   [L, P, d]  class means (positive, negative) at every layer input ×
                                           read position (the refusal pack: harmful, harmless)
  inlp.<layer>.directions       [n, d]     INLP directions, orthonormal rows, leading first
  inlp.<layer>.accuracy         [n]        held-out accuracy of the classifier that found each one
  inlp.<layer>.boundary         [n]        offset along each direction of the class boundary
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from steering.packs.identity import (
    METHOD_OPERATION,
    IdentityError,
    check_hook,
    check_vectors,
    default_vectors,
    hook_layout,
    layout_mismatch,
    methods_for,
    operations,
)

FORMAT_VERSION = 2
ORTHONORMAL_TOL = 1e-3  # INLP directions are orthonormal rows (float32 QR: ~1e-6)
READABLE_VERSIONS = (1, 2)  # 1: before `hook` and `vectors` (read as an extracted pack)


class PackError(ValueError):
    """A pack that cannot be used; the message names the problem."""


@dataclass
class InlpDirections:
    directions: torch.Tensor  # [n, d]
    accuracy: torch.Tensor  # [n]
    boundary: torch.Tensor  # [n]

    @property
    def count(self) -> int:
        return int(self.directions.shape[0])


@dataclass
class SteeringPack:
    name: str
    mean_harmful: torch.Tensor  # [L, P, d]
    mean_harmless: torch.Tensor  # [L, P, d]
    positions: list[int]  # negative offsets from the end of the prompt, e.g. [-5, …, -1]
    layer: int  # the selected DiM layer
    position: int  # the selected offset (one of `positions`)
    inlp: dict[int, InlpDirections] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return int(self.mean_harmful.shape[0])

    @property
    def d_model(self) -> int:
        return int(self.mean_harmful.shape[-1])

    def _pos_index(self, position: int | None) -> int:
        return self.positions.index(self.position if position is None else position)

    def dim(self, layer: int | None = None, position: int | None = None) -> torch.Tensor:
        """Difference-in-means r = μ_harmful − μ_harmless (Arditi et al. 2024, eq. 1)."""
        layer = self.layer if layer is None else layer
        p = self._pos_index(position)
        return self.mean_harmful[layer, p] - self.mean_harmless[layer, p]

    def harmless_mean(self, layer: int | None = None, position: int | None = None) -> torch.Tensor:
        layer = self.layer if layer is None else layer
        return self.mean_harmless[layer, self._pos_index(position)]

    @property
    def inlp_layers(self) -> list[int]:
        return sorted(self.inlp)

    @property
    def inlp_default_layers(self) -> list[int]:
        """Where INLP methods edit unless the request names layers: the selected layer when it
        has directions, else the first INLP layer (one site, as the papers do)."""
        if self.layer in self.inlp:
            return [self.layer]
        return self.inlp_layers[:1]

    def calibrated_strength(self, method: str) -> float | None:
        """The strength extraction measured to reach `method`'s effect on the validation split
        (see `steering.extraction.extract`), or None when the pack records none."""
        entry = (self.meta.get("calibration") or {}).get(method)
        value = entry.get("strength") if isinstance(entry, dict) else None
        return float(value) if isinstance(value, int | float) else None

    def max_k(self) -> int:
        """INLP directions available at the default layers."""
        return min((self.inlp[layer].count for layer in self.inlp_default_layers), default=0)

    # ---- what the pack is for ----------------------------------------------------------------

    @property
    def vectors(self) -> dict:
        return self.meta.get("vectors") or default_vectors(self.inlp_layers)

    @property
    def hook(self) -> dict:
        return self.meta.get("hook") or hook_layout(n_layers=self.n_layers)

    @property
    def operations(self) -> frozenset[str]:
        ops = operations(self.vectors)
        return ops if self.inlp else ops - {"inlp"}

    @property
    def methods(self) -> list[str]:
        """The steering methods this pack's vectors were made for."""
        return methods_for(self.operations)

    @property
    def concept(self) -> str:
        concept = self.meta.get("concept")
        return str(concept.get("name")) if isinstance(concept, dict) else "refusal"

    def unsupported(self, method: str) -> str | None:
        """Why `method` cannot use this pack (None: it can, or `method` needs no pack)."""
        op = METHOD_OPERATION.get(method)
        if op is None or op in self.operations:
            return None
        return (f"pack {self.name!r} holds vectors made for {', '.join(sorted(self.operations))}"
                f" ({', '.join(self.methods)}); method {method!r} needs '{op}'")

    def describe(self) -> dict:
        return {
            "name": self.name,
            "concept": self.concept,
            "methods": self.methods,
            "hook": self.hook,
            "format_version": self.meta.get("format_version", FORMAT_VERSION),
            "created": self.meta.get("created"),
            "layer": self.layer,
            "position": self.position,
            "positions": self.positions,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "inlp_layers": self.inlp_layers,
            "inlp_default_layers": self.inlp_default_layers,
            "calibrated_strengths": {m: self.calibrated_strength(m) for m in
                                     (self.meta.get("calibration") or {}) if m != "unsteered"},
            "k_max": self.max_k(),
            "inlp_accuracy": {str(layer): [round(float(a), 4) for a in d.accuracy]
                              for layer, d in self.inlp.items()},
            "meta": self.meta,
        }

    # ---- files -------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        tensors_path, sidecar_path = pack_paths(path)
        tensors = {
            "mean_harmful": self.mean_harmful.float().contiguous(),
            "mean_harmless": self.mean_harmless.float().contiguous(),
        }
        for layer, d in self.inlp.items():
            tensors[f"inlp.{layer}.directions"] = d.directions.float().contiguous()
            tensors[f"inlp.{layer}.accuracy"] = d.accuracy.float().contiguous()
            tensors[f"inlp.{layer}.boundary"] = d.boundary.float().contiguous()
        tensors_path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tensors_path), metadata={"format": "steering-pack"})
        sidecar = {
            **{k: v for k, v in self.meta.items() if k not in {"name", "positions", "layer",
                                                               "position", "format_version"}},
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "positions": self.positions,
            "layer": self.layer,
            "position": self.position,
            "hook": self.hook,
            "vectors": self.vectors,
        }
        sidecar_path.write_text(json.dumps(sidecar, indent=2, sort_keys=True))
        return tensors_path


def pack_paths(path: str | Path) -> tuple[Path, Path]:
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in {".safetensors", ".json"} else p
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def _is_safetensors(path: Path) -> bool:
    """A safetensors file by its structure: an 8-byte little-endian header length N with
    8 + N ≤ the file size, then N bytes of a JSON object. (Its first byte is N's low byte, so
    a leading 0x80 — pickle's protocol marker — is common and proves nothing.)"""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return False
        n = int.from_bytes(head, "little")
        if n < 2 or 8 + n > size:
            return False
        header = f.read(n)
    try:
        return isinstance(json.loads(header.rstrip(b" ")), dict)
    except (UnicodeDecodeError, ValueError):
        return False


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise PackError(f"pack file {path} does not exist")
    if not _is_safetensors(path):
        with open(path, "rb") as f:
            head = f.read(2)
        if head[:2] == b"PK" or head[:1] == b"\x80":
            raise PackError(f"{path} is a pickle/zip (torch.save) file, not safetensors; "
                            "packs are never unpickled")
        raise PackError(f"{path} is not a valid safetensors file (no JSON header)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise PackError(f"{path} is not a valid safetensors file ({exc})") from None


def load_pack(path: str | Path, model=None, name: str | None = None) -> SteeringPack:
    """Load and validate a pack; with `model`, refuse one made for another model."""
    tensors_path, sidecar_path = pack_paths(path)
    tensors = _read_tensors(tensors_path)
    if not sidecar_path.is_file():
        raise PackError(f"pack sidecar {sidecar_path} is missing")
    try:
        meta = json.loads(sidecar_path.read_text())
    except json.JSONDecodeError as exc:
        raise PackError(f"pack sidecar {sidecar_path} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise PackError(f"pack sidecar {sidecar_path} must hold a JSON object")
    version = meta.setdefault("format_version", 1)
    if version not in READABLE_VERSIONS:
        raise PackError(f"pack sidecar {sidecar_path} has format_version {version!r}; this "
                        f"library reads versions {', '.join(map(str, READABLE_VERSIONS))} "
                        "(a newer tool wrote it, or it is not a steering pack)")
    for key in ("mean_harmful", "mean_harmless"):
        if key not in tensors:
            raise PackError(f"pack {tensors_path} has no tensor {key!r}")
    try:
        positions = [int(p) for p in meta["positions"]]
        layer, position = int(meta["layer"]), int(meta["position"])
    except (KeyError, TypeError, ValueError) as exc:
        raise PackError(f"pack sidecar {sidecar_path} lacks a valid {exc}") from None
    mh, ml = tensors["mean_harmful"], tensors["mean_harmless"]
    if mh.ndim != 3 or mh.shape != ml.shape:
        raise PackError(f"pack means have shapes {tuple(mh.shape)} and {tuple(ml.shape)}; "
                        "expected two equal [layers, positions, d]")
    n_layers, n_pos, d = mh.shape
    if n_pos != len(positions):
        raise PackError(f"pack means have {n_pos} positions but the sidecar lists {len(positions)}")
    if not 0 <= layer < n_layers or position not in positions:
        raise PackError(f"pack's selected layer {layer} / position {position} is out of range")
    inlp: dict[int, InlpDirections] = {}
    try:
        inlp_layers = {int(k.split(".")[1]) for k in tensors if k.startswith("inlp.")}
    except ValueError:
        bad = sorted(k for k in tensors if k.startswith("inlp."))
        raise PackError(f"pack {tensors_path} has INLP tensors without a layer index: "
                        f"{bad}") from None
    for lay in sorted(inlp_layers):
        try:
            dirs, acc, bnd = (tensors[f"inlp.{lay}.{part}"]
                              for part in ("directions", "accuracy", "boundary"))
        except KeyError as exc:
            raise PackError(f"pack INLP layer {lay} lacks tensor {exc}") from None
        if not 0 <= lay < n_layers or dirs.ndim != 2 or dirs.shape[1] != d \
                or acc.shape != (dirs.shape[0],) or bnd.shape != (dirs.shape[0],):
            raise PackError(f"pack INLP layer {lay} has wrong shapes: directions "
                            f"{tuple(dirs.shape)}, accuracy {tuple(acc.shape)}, "
                            f"boundary {tuple(bnd.shape)} (d = {d})")
        inlp[lay] = InlpDirections(dirs, acc, bnd)
    for key, t in tensors.items():
        if t.dtype != torch.float32:  # what `save` writes; an int or half tensor is no pack's
            raise PackError(f"pack tensor {key!r} is {str(t.dtype).removeprefix('torch.')}; "
                            "pack tensors must be float32")
        if not torch.isfinite(t).all():
            raise PackError(f"pack tensor {key!r} has non-finite values")
    for lay, d in inlp.items():
        gap = orthonormality_gap(d.directions)
        if gap > ORTHONORMAL_TOL:
            raise PackError(f"pack INLP layer {lay}: the directions are not orthonormal rows "
                            f"(largest |DDᵀ − I| entry {gap:.3g} > {ORTHONORMAL_TOL:g})")
    if version >= 2:
        try:
            check_hook(meta.get("hook"), n_layers)
            check_vectors(meta.get("vectors"), set(tensors))
        except IdentityError as exc:
            raise PackError(f"pack sidecar {sidecar_path}: {exc}") from None
    pack = SteeringPack(
        name=name or meta.get("name") or tensors_path.stem,
        mean_harmful=mh, mean_harmless=ml, positions=positions, layer=layer,
        position=position, inlp=inlp, meta=meta,
    )
    if model is not None:
        check_compatible(pack, model)
    return pack


def orthonormality_gap(directions: torch.Tensor) -> float:
    """max |D Dᵀ − I| over the rows of `directions` (0 for orthonormal rows), in float64."""
    if directions.shape[0] == 0:
        return 0.0
    d = directions.double()
    return float((d @ d.T - torch.eye(d.shape[0], dtype=torch.float64)).abs().max())


def check_compatible(pack: SteeringPack, model) -> None:
    """Refuse a pack made for another model: hidden size, depth, architecture, weights (the
    checkpoint files' SHA-256 where both the pack and the model record it — a pack made before
    it was recorded is checked by its embedding probe only)."""
    from steering.models.fingerprint import (
        fingerprint,  # local: keeps pack importable without transformers
    )

    fp = fingerprint(model)
    if pack.d_model != fp["hidden_size"]:
        raise PackError(f"pack {pack.name!r} has hidden size {pack.d_model}, "
                        f"model has {fp['hidden_size']}")
    if pack.n_layers != fp["n_layers"]:
        raise PackError(f"pack {pack.name!r} covers {pack.n_layers} layers, "
                        f"model has {fp['n_layers']}")
    mismatch = layout_mismatch(pack.hook, model)
    if mismatch:
        raise PackError(f"pack {pack.name!r} was made for another hook layout: {mismatch}")
    want = pack.meta.get("fingerprint")
    if not want:
        raise PackError(f"pack {pack.name!r} has no model fingerprint in its sidecar")
    if want.get("arch") != fp["arch"]:
        raise PackError(f"pack {pack.name!r} was made for another model architecture "
                        f"({want.get('model_type')}, fingerprint {want.get('arch')}; "
                        f"this model: {fp['model_type']}, {fp['arch']})")
    if want.get("weights") and fp.get("weights") and want["weights"] != fp["weights"]:
        raise PackError(f"pack {pack.name!r} was made for other weights of the same "
                        "architecture (the checkpoint's weight files differ)")
    probe_a, probe_b = want.get("probe") or [], fp["probe"]
    if len(probe_a) != len(probe_b) or any(
        not math.isclose(a, b, rel_tol=2e-2, abs_tol=2e-3) for a, b in zip(probe_a, probe_b)
    ):
        raise PackError(f"pack {pack.name!r} was made for other weights of the same "
                        "architecture (fingerprint probe differs)")
