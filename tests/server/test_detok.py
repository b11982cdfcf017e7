"""Incremental detokenization (issue 12 finding 7): the streamed pieces join to exactly what one
decode of all ids gives, stop strings cut as before, and the work per token is bounded (a window
of ids, not the whole output)."""

from __future__ import annotations

import random

import pytest

from server.engine.detok import Detokenizer

TEXTS = ["Hello, world! The sea is wide.", "emoji 🐳🌊 and CJK 海と空, accents é ü ñ",
         "  spaces   and\nnewlines\n\n tabs\t!", "a" * 50 + " 1234567890 " + "🐳" * 5]


class Counting:
    """A tokenizer wrapper that counts the ids it decodes."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.decoded = 0

    def decode(self, ids, **kw):
        self.decoded += len(ids)
        return self.tokenizer.decode(ids, **kw)


def _stream(tokenizer, ids, stop=()):
    d = Detokenizer(tokenizer, list(stop))
    out = []
    for t in ids:
        text, hit = d.add(t)
        out.append(text)
        if hit:
            return "".join(out), True
    out.append(d.finish())
    return "".join(out), False


def _check_tokenizer(tok):
    rng = random.Random(0)
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert _stream(tok, ids)[0] == tok.decode(ids, skip_special_tokens=True)
    vocab = tok.vocab_size
    for _ in range(20):  # arbitrary ids, split characters included
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 60))]
        full = tok.decode(ids, skip_special_tokens=True)
        streamed, _ = _stream(tok, ids)
        assert streamed == full.rstrip("\ufffd") or streamed == full, (ids, streamed, full)


def test_stream_equals_full_decode(tiny_lm):
    _check_tokenizer(tiny_lm.tokenizer)


def test_stop_strings(tiny_lm):
    tok = tiny_lm.tokenizer
    ids = tok("The sea is wide. STOP here and more", add_special_tokens=False)["input_ids"]
    text, hit = _stream(tok, ids, stop=["STOP"])
    assert hit and text == "The sea is wide. "
    text, hit = _stream(tok, ids, stop=["never there"])
    assert not hit and text == tok.decode(ids)


def test_work_per_token_is_bounded(tiny_lm):
    tok = Counting(tiny_lm.tokenizer)
    ids = tiny_lm.tokenizer(" ".join(TEXTS * 40), add_special_tokens=False)["input_ids"]
    assert len(ids) > 1000
    _stream(tok, ids)
    # re-decoding the whole output each step would be ~ n²/2 ids; a window is a few per step
    assert tok.decoded < 16 * len(ids), tok.decoded


@pytest.mark.real
def test_stream_equals_full_decode_real(real_lm):
    _check_tokenizer(real_lm.tokenizer)


# ---- issue 28 item 9: a bounded wait on incomplete UTF-8, linear stop strings -----------------------


def _byte_token(tok, byte: int) -> int:
    """The id of the byte-level BPE token for one raw byte (GPT-2's byte ↔ character table)."""
    from server.api.tracker import _byte_decoder

    char = {b: c for c, b in _byte_decoder().items()}[byte]
    return tok.convert_tokens_to_ids(char)


def test_stray_bytes_cost_linear_work(tiny_lm):
    """4,000 tokens that are each a lone UTF-8 lead byte never form a character: each waits for
    at most MAX_PENDING tokens, then goes out as U+FFFD (the full decode's text)."""
    tok = Counting(tiny_lm.tokenizer)
    ids = [_byte_token(tiny_lm.tokenizer, 0xF0)] * 4000
    text, hit = _stream(tok, ids)
    assert not hit and text == tiny_lm.tokenizer.decode(ids)
    assert set(text) == {"\ufffd"}
    assert tok.decoded < 32 * len(ids), tok.decoded  # was ~ n²/2


def test_split_characters_still_wait(tiny_lm):
    """A 4-byte character split into 4 one-byte tokens is sent whole, not as U+FFFD."""
    tok = tiny_lm.tokenizer
    ids = [_byte_token(tok, b) for b in "🐳".encode()] + tok("ok", add_special_tokens=False)[
        "input_ids"]
    d = Detokenizer(tok, [])
    pieces = [d.add(t)[0] for t in ids] + [d.finish()]
    assert "".join(pieces) == "🐳ok" and "\ufffd" not in "".join(pieces)


def test_long_stop_strings_cost_linear_work(tiny_lm):
    tok = tiny_lm.tokenizer
    x = tok("x", add_special_tokens=False)["input_ids"]
    ids = x * 6000
    stops = ["x" * 3000 + "y", "xy", "x" * 500 + "z"]
    d = Detokenizer(tok, stops)
    out = [d.add(t)[0] for t in ids]
    out.append(d.finish())
    assert "".join(out) == "x" * 6000
    assert d.stop_steps <= 2 * 6000 * len(stops), d.stop_steps  # was ~ len(stop)² per token


@pytest.mark.parametrize("text,stops,expected", [
    ("abcabd and more", ["abd"], "abc"),  # a false start, then the stop string
    ("hello STOP world", ["STOP", "hello"], ""),  # the first to complete wins
    ("aXbXc", ["Xc", "Xb"], "a"),
    ("no stop here", ["zzz"], "no stop here"),
    ("ends with ST", ["STOP"], "ends with ST"),  # held back, then sent at the end
])
def test_stop_strings_cut_where_the_first_completes(tiny_lm, text, stops, expected):
    tok = tiny_lm.tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"]
    got, hit = _stream(tok, ids, stop=stops)
    assert got == expected and hit == (expected != text)
