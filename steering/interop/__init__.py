"""Vectors that travel: llama.cpp control vectors (GGUF) and PEFT LoRA adapters.

Lives here: `llamacpp` (actadd packs ↔ control-vector GGUFs), `peft_lora` (ablation as a rank-1
LoRA adapter), `gguf_model` (an orthogonalized model written back into a GGUF file).
May import: `steering.packs`, `steering.models`, `steering.interventions`.
"""
