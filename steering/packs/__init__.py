"""Packs: what extraction produces for one model, on disk and in memory.

Lives here: the pack format (safetensors + JSON sidecar, strict loading), the cache of default
packs, extraction of DiM/ACE/INLP directions and the selection of layer and position.
May import: `steering.models`, `steering.interventions`, `steering.evaluation.refusal`, `steering.data`.
"""
