"""Evaluation: is an answer a refusal, and how do methods compare on a model.

Lives here: refusal judging and scores (the substring matcher, an optional LLM judge over HTTP),
the evaluation grid (refusal, perplexity, KL), the geometry of edited activations.
May import: `steering.interventions`, `steering.packs`, `steering.models`, `steering.data`.
"""
