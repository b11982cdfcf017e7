"""Packs: what extraction produces for one model, on disk and in memory (data only).

Lives here: the pack format (safetensors + JSON sidecar, strict loading) and its identity record
(hook layout, the operations each vector was made for).
May import: `steering.models`, `steering.catalog`, `steering.data`.
"""
