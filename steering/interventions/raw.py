"""Raw vectors: a steering object that carries its own vector, direction or basis instead of a
pack's.

On the wire (`steering.interventions.schema.VectorObject`) the numbers are little-endian float32,
base64-encoded, with an optional shape; which shape a method takes:

| method | `vector.data` | used as | pack equivalent |
|---|---|---|---|
| actadd | one vector [d] | v, added at the object's layers (default `vector.layer`) | r_l = μ⁺ − μ⁻ |
| ablate | one direction [d] (any non-zero norm) | r̂, projected out where ablation edits | r̂ |
| inlp_* | a basis [k, d], orthonormal rows, k ≤ `MAX_BASIS` | Q, at `vector.layer` (required), around the origin 0 | INLP directions |

(ace needs a pack's class means — its reference point is the harmless mean — and takes no raw
vector.) A decoded vector is checked before it is used: the byte count (a whole number of float32
values, d or k·d of them), the shape against the model's hidden size, every value finite, the
norm at most `max_norm` (each row's, for a basis), a direction not zero, and a basis's rows
orthonormal (‖QQᵀ − I‖_max ≤ `ORTHONORMAL_TOL`). It then becomes a *vector pack*: a
`SteeringPack` whose difference of means is the vector at every layer (harmless mean 0) and whose
INLP directions at `vector.layer` are the basis, so the method table builds its edits as for any
pack (`build_row`) and a raw-vector row shares a batch with pack rows. The pack is named
`vector:<first 12 hex digits of the data's SHA-256>`; `VectorRef` (the hash, the norm, the shape
and the layer) goes into the spec, so the echo and the audit line say which vector ran.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
from dataclasses import replace

import numpy as np
import torch

from steering.catalog import REGISTRY
from steering.interventions.spec import SteeringError, SteeringSpec, VectorRef
from steering.packs.format import InlpDirections, SteeringPack

MAX_BASIS = 16  # rows of an INLP basis
ORTHONORMAL_TOL = 1e-3
DEFAULT_MAX_NORM = 1e4  # a server sets its own bound (`max_norm`)
# what each method takes: actadd a vector, ablate a direction, every INLP method (its record's
# pack operation is "inlp") a basis
METHODS = {"actadd": "vector", "ablate": "direction",
           **{m.name: "basis" for m in REGISTRY.values() if m.operation == "inlp"}}


def encode_vector(values) -> str:
    """float32 little-endian base64 of `values` (a tensor or array; the client's side)."""
    array = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else values
    return base64.b64encode(np.ascontiguousarray(array, dtype="<f4").tobytes()).decode()


def decode_vector(data: str, shape: list[int] | None, d_model: int, method: str,
                  max_norm: float = DEFAULT_MAX_NORM, param: str = "steering.vector"
                  ) -> tuple[torch.Tensor, str]:
    """The checked tensor ([d] or [k, d] float32) and the SHA-256 of its bytes (module
    docstring for the checks). `method` "monitor": a monitor's probe weights, one [d] vector."""
    kind = "vector" if method == "monitor" else METHODS.get(method)
    if kind is None:
        raise SteeringError(f"method {method!r} takes no raw vector (raw vectors serve "
                            f"{', '.join(METHODS)})", f"{param}")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise SteeringError("vector.data must be base64 (little-endian float32 values)",
                            f"{param}.data") from None
    if not raw or len(raw) % 4:
        raise SteeringError(f"vector.data holds {len(raw)} bytes: not a whole number of "
                            "float32 values", f"{param}.data")
    n = len(raw) // 4
    if shape is None:
        shape = [n] if kind != "basis" else [n // d_model, d_model]
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise SteeringError(f"vector.shape must be positive integers, got {shape}",
                            f"{param}.shape")
    if math.prod(shape) != n:
        raise SteeringError(f"vector.shape {shape} needs {math.prod(shape)} values; the data "
                            f"holds {n}", f"{param}.shape")
    want = "[d]" if kind != "basis" else f"[k, d] with 1 ≤ k ≤ {MAX_BASIS}"
    if kind == "basis":
        ok = len(shape) == 2 and shape[1] == d_model and 1 <= shape[0] <= MAX_BASIS
    else:
        ok = shape in ([d_model], [1, d_model])
    if not ok:
        raise SteeringError(f"{method} takes a {kind} of shape {want} (d = {d_model}), got "
                            f"{shape}", f"{param}.shape")
    values = torch.from_numpy(np.frombuffer(raw, dtype="<f4").astype(np.float32).copy())
    values = values.reshape(shape if kind == "basis" else [d_model])
    if not bool(torch.isfinite(values).all()):
        raise SteeringError("vector.data has non-finite values (NaN or infinity)",
                            f"{param}.data")
    norms = values.double().norm(dim=-1)
    if float(norms.max()) > max_norm:
        raise SteeringError(f"vector norm {float(norms.max()):.4g} exceeds the bound "
                            f"{max_norm:g}", f"{param}.data")
    if kind == "direction" and float(norms) < 1e-6:
        raise SteeringError("an ablation direction must not be zero", f"{param}.data")
    if kind == "basis":
        gram = values.double() @ values.double().T
        error = float((gram - torch.eye(shape[0], dtype=torch.float64)).abs().max())
        if error > ORTHONORMAL_TOL:
            raise SteeringError(f"an INLP basis needs orthonormal rows (max |QQᵀ − I| = "
                                f"{error:.3g} > {ORTHONORMAL_TOL:g})", f"{param}.data")
    return values, hashlib.sha256(raw).hexdigest()


def vector_pack(values: torch.Tensor, method: str, n_layers: int, layer: int | None = None,
                name: str | None = None, param: str = "steering.vector") -> SteeringPack:
    """A pack whose vectors are `values` (module docstring): DiM = values at every layer for a
    vector or direction; INLP directions = values at `layer` for a basis."""
    d = int(values.shape[-1])
    if layer is not None and not 0 <= layer < n_layers:
        raise SteeringError(f"vector.layer must be between 0 and {n_layers - 1}, got {layer}",
                            f"{param}.layer")
    basis = METHODS.get(method) == "basis"
    if basis and layer is None:
        raise SteeringError("an INLP basis needs vector.layer (the layer it edits)",
                            f"{param}.layer")
    zeros = torch.zeros(n_layers, 1, d)
    if basis:
        mean_harmful = zeros.clone()
        inlp = {layer: InlpDirections(values.float(), torch.ones(values.shape[0]),
                                      torch.zeros(values.shape[0]))}
    else:
        mean_harmful = values.float().reshape(1, 1, d).expand(n_layers, 1, d).clone()
        inlp = {}
    vectors = ({f"inlp.{layer}": {"operations": ["inlp"]}} if basis
               else {"dim": {"operations": ["add", "ablate"]}})
    return SteeringPack(name or "vector", mean_harmful, zeros, positions=[-1],
                        layer=layer if layer is not None else 0, position=-1, inlp=inlp,
                        meta={"concept": {"name": "vector", "kind": "raw"}, "vectors": vectors})


def raw_spec(spec: SteeringSpec, data: str, shape: list[int] | None, layer: int | None,
             n_layers: int, d_model: int, max_norm: float = DEFAULT_MAX_NORM,
             param: str = "steering.vector") -> tuple[SteeringSpec, SteeringPack]:
    """A steering spec with a raw vector: the checked spec (its `vector` reference set, its pack
    the vector pack's name) and the vector pack to build its row on."""
    if spec.pack is not None:
        raise SteeringError("a steering object takes a pack or a vector, not both", param)
    values, digest = decode_vector(data, shape, d_model, spec.method, max_norm, param)
    name = f"vector:{digest[:12]}"
    pack = vector_pack(values, spec.method, n_layers, layer, name, param)
    norm = float(values.double().norm()) if values.ndim == 1 else \
        float(values.double().norm(dim=-1).max())
    ref = VectorRef(sha256=digest, norm=norm, shape=tuple(values.shape), layer=layer)
    return replace(spec, pack=name, vector=ref), pack
