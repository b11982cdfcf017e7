"""Tiny randomly initialised Qwen2/Llama chat models with a tokenizer trained in a blink (no download)."""

from __future__ import annotations

import os

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from steering import wrap_model
from steering.data.prompts import load_instructions

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


# The served name of the default tiny model and a harmless chat, shared by the server tests.
MODEL = "tiny-qwen2"
HELLO = [{"role": "user", "content": "Write a short poem about the sea."}]


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in a blink on the packaged prompts."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    corpus = load_instructions("harmful_train")[:100] + load_instructions("harmless_train")[:100]
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny(kind: str = "qwen2", n_layers: int = 4, seed: int = 0,
              precision: str | None = None):
    """A tiny random chat model; `precision` int8 quantizes its Linears (bf16/fp16: casts)."""
    tokenizer = make_tokenizer()
    torch.manual_seed(seed)
    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                  num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    if kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=False))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    # STEERING_TEST_DEVICE=cuda runs the tiny-model tests on a GPU (CUDA path check).
    model.to(os.environ.get("STEERING_TEST_DEVICE", "cpu"))
    if precision in ("bf16", "fp16"):
        model.to({"bf16": torch.bfloat16, "fp16": torch.float16}[precision])
    return wrap_model(model, tokenizer, name=f"tiny-{kind}", precision=precision)
