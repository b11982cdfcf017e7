"""Shared fixtures: tiny random models built from configs (no download), and the real model."""

from __future__ import annotations

import os

import pytest
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
from steering.prompts import load_instructions

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


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


def make_tiny(kind: str = "qwen2", n_layers: int = 4, seed: int = 0):
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
    return wrap_model(model, tokenizer, name=f"tiny-{kind}")


@pytest.fixture(scope="session")
def tiny_lm():
    return make_tiny("qwen2")


@pytest.fixture(scope="session")
def tiny_pack(tiny_lm):
    from steering.extract import ExtractConfig, extract_pack
    from steering.inlp import InlpConfig

    config = ExtractConfig(n_train=24, n_val=6, layer_stride=1, min_layer_fraction=0.0,
                           inlp=InlpConfig(max_directions=4, chance_margin=0.0))
    return extract_pack(tiny_lm, config=config, name="refusal")


def real_model_enabled() -> bool:
    return os.environ.get("STEERING_SKIP_REAL", "") not in {"1", "true", "yes"}


@pytest.fixture(scope="session")
def real_lm():
    if not real_model_enabled():
        pytest.skip("STEERING_SKIP_REAL set")
    from steering import load_model

    return load_model("embedded", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def real_pack(real_lm):
    from steering.store import ensure_pack

    return ensure_pack(real_lm)


@pytest.fixture(scope="module")
def real_server():
    """A real `steer serve` process on the embedded model, on a free loopback port."""
    if not real_model_enabled():
        pytest.skip("STEERING_SKIP_REAL set")
    from bench._server import ServerProcess

    proc = ServerProcess(env={"STEER_DEVICE": "cpu", "STEER_DTYPE": "float32"})
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()
