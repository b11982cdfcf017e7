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
vector.) A vector's size is checked first, from the length of its base64 text, before anything
is decoded (`check_shape`: a whole number of float32 values, d or k·d of them, d the model's
hidden size); then the decoded values: every value finite, the
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


def encoded_values(data: str) -> int | None:
    """How many float32 values base64 text `data` holds, read off its length without decoding
    it (None: not whole base64 quads, or not a whole number of float32 values)."""
    if len(data) % 4:
        return None
    size = len(data) // 4 * 3 - (len(data) - len(data.rstrip("=")))
    return size // 4 if size > 0 and size % 4 == 0 else None


def check_shape(data: str, shape: list[int] | None, d_model: int, method: str,
                param: str = "steering.vector") -> list[int]:
    """The vector's shape, checked against the model's hidden size `d_model` from the length of
    its text alone: nothing is decoded and no tensor made before the size is known to fit (a
    vector is [d], a basis [k, d] with k ≤ `MAX_BASIS`). Errors name the field: `.data` when
    the data's own length is wrong, `.shape` when the given shape is."""
    kind = "vector" if method == "monitor" else METHODS.get(method)
    if kind is None:
        raise SteeringError(f"method {method!r} takes no raw vector (raw vectors serve "
                            f"{', '.join(METHODS)})", param)
    n = encoded_values(data)
    if n is None:
        raise SteeringError("vector.data must be base64 text of little-endian float32 values "
                            "(a whole number of them)", f"{param}.data")
    want = (f"[{d_model}] (the model's hidden size)" if kind != "basis"
            else f"[k, {d_model}] with 1 ≤ k ≤ {MAX_BASIS} (d: the model's hidden size)")
    if shape is None:
        if n % d_model or (kind != "basis" and n != d_model) or n // d_model > MAX_BASIS:
            raise SteeringError(f"{method} takes a {kind} of shape {want}; vector.data holds "
                                f"{n} float32 values", f"{param}.data")
        return [n] if kind != "basis" else [n // d_model, d_model]
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise SteeringError(f"vector.shape must be positive integers, got {shape}",
                            f"{param}.shape")
    if kind == "basis":
        ok = len(shape) == 2 and shape[1] == d_model and 1 <= shape[0] <= MAX_BASIS
    else:
        ok = shape in ([d_model], [1, d_model])
    if not ok:
        raise SteeringError(f"{method} takes a {kind} of shape {want}, got {shape}",
                            f"{param}.shape")
    if math.prod(shape) != n:
        raise SteeringError(f"vector.shape {shape} needs {math.prod(shape)} values; the data "
                            f"holds {n}", f"{param}.data")
    return shape


def decode_vector(data: str, shape: list[int] | None, d_model: int, method: str,
                  max_norm: float = DEFAULT_MAX_NORM, param: str = "steering.vector"
                  ) -> tuple[torch.Tensor, str]:
    """The checked tensor ([d] or [k, d] float32) and the SHA-256 of its bytes (module
    docstring for the checks; the size first, by `check_shape`, before anything is decoded).
    `method` "monitor": a monitor's probe weights, one [d] vector."""
    shape = check_shape(data, shape, d_model, method, param)
    kind = "vector" if method == "monitor" else METHODS[method]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise SteeringError("vector.data must be base64 (little-endian float32 values)",
                            f"{param}.data") from None
    array = np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(
        shape if kind == "basis" else [d_model])
    if not np.isfinite(array).all():
        raise SteeringError("vector.data has non-finite values (NaN or infinity)",
                            f"{param}.data")
    values = torch.from_numpy(array)
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


def check_layer(method: str, layer: int | None, n_layers: int,
                param: str = "steering.vector") -> None:
    """`vector.layer` within the model's layers, and given for an INLP basis."""
    if layer is not None and not 0 <= layer < n_layers:
        raise SteeringError(f"vector.layer must be between 0 and {n_layers - 1}, got {layer}",
                            f"{param}.layer")
    if METHODS.get(method) == "basis" and layer is None:
        raise SteeringError("an INLP basis needs vector.layer (the layer it edits)",
                            f"{param}.layer")


def vector_pack(values: torch.Tensor, method: str, n_layers: int, layer: int | None = None,
                name: str | None = None, param: str = "steering.vector") -> SteeringPack:
    """A pack whose vectors are `values` (module docstring): DiM = values at every layer for a
    vector or direction; INLP directions = values at `layer` for a basis."""
    d = int(values.shape[-1])
    check_layer(method, layer, n_layers, param)
    basis = METHODS.get(method) == "basis"
    zeros = torch.zeros(1, 1, d).expand(n_layers, 1, d)  # views: O(d) memory, not O(layers·d)
    if basis:
        mean_harmful = zeros
        inlp = {layer: InlpDirections(values.float(), torch.ones(values.shape[0]),
                                      torch.zeros(values.shape[0]))}
    else:
        mean_harmful = values.float().reshape(1, 1, d).expand(n_layers, 1, d)
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
    check_shape(data, shape, d_model, spec.method, param)  # the size, before decoding
    check_layer(spec.method, layer, n_layers, param)
    values, digest = decode_vector(data, shape, d_model, spec.method, max_norm, param)
    name = f"vector:{digest[:12]}"
    pack = vector_pack(values, spec.method, n_layers, layer, name, param)
    norm = float(values.double().norm()) if values.ndim == 1 else \
        float(values.double().norm(dim=-1).max())
    ref = VectorRef(sha256=digest, norm=norm, shape=tuple(values.shape), layer=layer)
    return replace(spec, pack=name, vector=ref), pack
