"""Data: the prompt sets shipped with the library (see SOURCES.md) and their loader (`prompts`).

May import: nothing from steering.
"""
