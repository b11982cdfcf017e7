"""Models: loading a chat model (hub id, folder, GGUF, the embedded default) and knowing its shape.

Lives here: loading and device/dtype choice, the embedded GGUF wheels, GGUF dequantization, the
layer table (where the residual stream is read and written), chat templates, the model fingerprint.
Also: the precision a model runs in (precision.py: int8 per-row kernels, SmoothQuant calibration).
May import: torch, transformers, gguf; from steering only `steering.data` (calibration prompts).
The model knows nothing of steering: `steering.interventions.hooks.hooks_of(lm)` wraps it.
"""

# The precisions a model can be served in (steering.models.precision), torch-free for the command
# line and the settings. "auto": int8 on CPU, bf16 on CUDA.
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8", "int4")
# The older --dtype spellings, still accepted.
DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
