"""Models: loading a chat model (hub id, folder, GGUF, the embedded default) and knowing its shape.

Lives here: loading and device/dtype choice, the embedded GGUF wheels, GGUF dequantization, the
layer table (where the residual stream is read and written), chat templates, the model fingerprint.
May import: torch, transformers, gguf; from steering only `steering.interventions.hooks` (to attach).
"""
