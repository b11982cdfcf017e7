"""Interventions: the one kernel h' = h − α·QQᵀ(h − c) + v, the method table, and running a model under it.

Lives here: the kernel, method → per-site parameters, the hooks that apply them per batch row,
steered forwards (activations, logits), generation, and weight orthogonalization.
May import: torch, `steering.models`, `steering.packs.format` (the tensors a method reads).
"""
