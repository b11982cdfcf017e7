"""`response_format: {"type": "json_object"}`: constrained decoding to one JSON object.

Each choice gets a `JsonObjectConstraint`: an llguidance matcher (the Rust grammar engine vLLM
and llama.cpp use) over the model's own tokenizer, compiled from the JSON schema
`{"type": "object"}` with fixed separators (`", "`, `": "`, no free whitespace: a small model
cannot wander into endless newlines). At each decode step the engine asks `allowed(vocab)` for
the tokens that keep the answer a prefix of a JSON object (after the object closes: end of
sequence only) and masks the rest to −inf before sampling, then reports the token it drew with
`advance(token)`. So the answer parses with `json.loads` whenever it ends with `finish_reason:
"stop"`; with `"length"` it is cut, as OpenAI's JSON mode is.

The tokenizer conversion costs about a second; it is done once per tokenizer and cached.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from steering.models.loading import eos_ids

OBJECT = {"type": "object"}  # the schema, as another engine's structured outputs take it (vLLM)
SCHEMA = {**OBJECT, "x-guidance": {"whitespace_flexible": False,
                                           "item_separator": ", ", "key_separator": ": "}}

_lock = threading.Lock()
_tokenizers: dict[int, object] = {}


def _ll_tokenizer(tokenizer, vocab: int, eos: list[int]):
    import llguidance.hf

    key = id(tokenizer)
    with _lock:
        if key not in _tokenizers:
            _tokenizers[key] = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab,
                                                            eos_token=eos)
        return _tokenizers[key]


class JsonObjectConstraint:
    """The engine's per-choice constraint protocol: `allowed(vocab)` → bool mask [vocab] (None:
    no constraint this step), `advance(token)`."""

    schema = OBJECT  # what an engine with its own structured outputs constrains to instead

    def __init__(self, tokenizer, vocab: int, eos: list[int]):
        import llguidance

        grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA)
        self.matcher = llguidance.LLMatcher(_ll_tokenizer(tokenizer, vocab, eos), grammar)
        if self.matcher.is_error():
            raise RuntimeError(f"json_object grammar: {self.matcher.get_error()}")

    def allowed(self, vocab: int) -> torch.Tensor | None:
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8),
                             bitorder="little")[:vocab]
        if len(bits) < vocab:
            bits = np.pad(bits, (0, vocab - len(bits)))
        return torch.from_numpy(bits.astype(bool))

    def advance(self, token: int) -> None:
        self.matcher.consume_token(token)


def json_constraint(state) -> JsonObjectConstraint:
    """A fresh constraint for one choice on the served model."""
    lm = state.lm
    vocab = int(lm.model.config.vocab_size)
    eos = sorted(eos_ids(lm))
    return JsonObjectConstraint(lm.tokenizer, vocab, eos)
