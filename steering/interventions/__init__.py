"""Interventions: the one kernel h' = h − α·QQᵀ(h − c) + v, the method table, and running a model under it.

Lives here: the kernel, method → per-site parameters (a builder per catalog record), the
settings and their wire schema, the hooks that wrap a model and apply edits per batch row,
steered forwards (activations, logits, capture), generation, weight orthogonalization.
May import: torch, `steering.packs`, `steering.models`, `steering.catalog`.
"""
