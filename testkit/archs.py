"""Tiny randomly initialised decoders of every family in the layer table (no download)."""

from __future__ import annotations

import torch
import transformers as tf

from steering import wrap_model

# The families issue 2 names; each built from its own transformers Config with tiny sizes.
ARCH_KINDS = ("llama", "qwen2", "mistral", "gemma", "gemma2", "phi3", "gpt2")


def build_config(kind: str, vocab_size: int, n_layers: int = 2, hidden: int = 64,
                 tie: bool | None = None, **extra) -> tf.PretrainedConfig:
    if kind == "gpt2":
        config = tf.GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=n_layers, n_head=4,
                               n_positions=256, n_inner=2 * hidden, **extra)
        config.bos_token_id = config.eos_token_id
    else:
        common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, **extra)
        if kind in ("gemma", "gemma2", "mistral"):
            common["head_dim"] = hidden // 4
        config = {
            "llama": tf.LlamaConfig,
            "qwen2": tf.Qwen2Config,
            "mistral": tf.MistralConfig,
            "gemma": tf.GemmaConfig,
            "gemma2": tf.Gemma2Config,
            "phi3": tf.Phi3Config,
        }[kind](**common)
    if tie is not None:
        config.tie_word_embeddings = tie
    return config


def build_tiny(kind: str, tokenizer, n_layers: int = 2, hidden: int = 64, seed: int = 0,
               tie: bool | None = None, **extra):
    """A wrapped (LoadedModel) tiny random model of family `kind`, float32, eval mode."""
    config = build_config(kind, len(tokenizer), n_layers, hidden, tie,
                          pad_token_id=tokenizer.pad_token_id,
                          eos_token_id=tokenizer.eos_token_id, **extra)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config)
    return wrap_model(model, tokenizer, name=f"tiny-{kind}")
