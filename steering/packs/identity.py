"""What a pack is: the operation each vector was made for, and the hook layout it assumes.

A sidecar of format version 2 carries two records besides the model fingerprint and the data
hashes (`steering.packs.format`):

`vectors` — one entry per vector the pack holds, with the tensors it is computed from and the
operations it was made for:

| vector      | tensors                         | value                              | operations |
|-------------|---------------------------------|------------------------------------|------------|
| `dim`       | mean_harmful, mean_harmless     | r_l = μ⁺_l − μ⁻_l per layer/position | add, ablate |
| `reference` | mean_harmless                   | c_l = μ⁻_l (the affine reference)  | affine |
| `inlp.<l>`  | inlp.<l>.{directions, accuracy, boundary} | INLP directions at layer l | inlp |

(μ⁺ is the positive class — harmful prompts for refusal, the `--positive` file for a concept.)
Operations map onto methods: add → actadd, ablate → ablate, affine → ace (needs `dim` as well),
inlp → inlp_null / inlp_flip / inlp_reflect. An imported llama.cpp control vector is `dim` with
`add` only: using it for ablation or ACE is refused, never reinterpreted.

`hook` — where the vectors live: the site (`block_input`, the residual stream entering decoder
block l), the layer numbering (`block_index`: l = 0 … n_layers − 1, HF's block order), the
attribute paths of the blocks and of the two residual writers (ablation also edits their
outputs), and the depth. A model whose layout differs gets a clear refusal.
"""

from __future__ import annotations

from steering.catalog import REGISTRY

OPERATIONS = ("add", "ablate", "affine", "inlp")
METHOD_OPERATION = {m.name: m.operation for m in REGISTRY.values() if m.operation}
SITES = ("block_input",)
LAYER_NUMBERING = "block_index"
HOOK_KEYS = ("site", "layer_numbering", "n_layers")


class IdentityError(ValueError):
    """A sidecar whose `hook` or `vectors` record cannot be used (raised as a PackError)."""


def default_vectors(inlp_layers: list[int]) -> dict:
    """The vectors of an extracted pack: every operation its tensors support."""
    vectors = {
        "dim": {"tensors": ["mean_harmful", "mean_harmless"],
                "value": "mean_harmful[l, p] - mean_harmless[l, p]",
                "operations": ["add", "ablate"]},
        "reference": {"tensors": ["mean_harmless"], "value": "mean_harmless[l, p]",
                      "operations": ["affine"]},
    }
    for layer in inlp_layers:
        vectors[f"inlp.{layer}"] = {
            "tensors": [f"inlp.{layer}.{p}" for p in ("directions", "accuracy", "boundary")],
            "value": "orthonormal INLP directions toward the positive class, with the class "
                     "boundary along each", "operations": ["inlp"]}
    return vectors


def hook_layout(model=None, n_layers: int | None = None) -> dict:
    """The hook record for `model` (or a bare one with only the depth)."""
    record: dict = {"site": "block_input", "layer_numbering": LAYER_NUMBERING,
                    "ablate_sites": ["block_input", "attn_output", "mlp_output"]}
    if model is not None:
        from steering.models.layers import discover  # local: keeps packs light to import

        layout = discover(model)
        record.update(blocks=layout.arch.blocks, attn_writer=layout.arch.attn_writer,
                      mlp_writer=layout.arch.mlp_writer, n_layers=layout.n_layers)
    elif n_layers is not None:
        record["n_layers"] = n_layers
    return record


def operations(vectors: dict) -> frozenset[str]:
    """Operations the pack's vectors were made for; `affine` needs `dim` too (ACE adds along r)."""
    ops = {op for v in vectors.values() for op in v.get("operations", [])}
    if "dim" not in vectors:
        ops -= {"add", "ablate", "affine"}
    return frozenset(ops)


def methods_for(ops: frozenset[str]) -> list[str]:
    return [m for m, op in METHOD_OPERATION.items() if op in ops]


def check_vectors(vectors: object, tensor_names: set[str]) -> dict:
    if not isinstance(vectors, dict) or not vectors:
        raise IdentityError("'vectors' must be a non-empty object")
    for name, entry in vectors.items():
        if not isinstance(entry, dict):
            raise IdentityError(f"vectors.{name} must be an object")
        ops = entry.get("operations")
        if not isinstance(ops, list) or not ops or any(op not in OPERATIONS for op in ops):
            raise IdentityError(f"vectors.{name}.operations must list operations from "
                                f"{', '.join(OPERATIONS)}; got {ops!r}")
        missing = [t for t in entry.get("tensors", []) if t not in tensor_names]
        if missing:
            raise IdentityError(f"vectors.{name} names tensors the file lacks: {missing}")
    return vectors


def check_hook(hook: object, n_layers: int) -> dict:
    if not isinstance(hook, dict) or any(k not in hook for k in HOOK_KEYS):
        raise IdentityError(f"'hook' must be an object with {', '.join(HOOK_KEYS)}")
    if hook["site"] not in SITES:
        raise IdentityError(f"hook site {hook['site']!r} is not one this library applies "
                            f"(known: {', '.join(SITES)})")
    if hook["layer_numbering"] != LAYER_NUMBERING:
        raise IdentityError(f"hook layer numbering {hook['layer_numbering']!r} is not "
                            f"{LAYER_NUMBERING!r} (convert the pack, e.g. with `steer import`)")
    if hook["n_layers"] != n_layers:
        raise IdentityError(f"hook says {hook['n_layers']} layers, the tensors hold {n_layers}")
    return hook


def layout_mismatch(hook: dict, model) -> str | None:
    """Why `model`'s residual layout differs from the one the pack was made for (None: same)."""
    ours = hook_layout(model)
    for key in ("blocks", "attn_writer", "mlp_writer", "n_layers"):
        if key in hook and hook[key] != ours[key]:
            return (f"the pack hooks {key} = {hook[key]!r}, this model has {ours[key]!r}")
    return None
