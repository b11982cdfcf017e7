"""Incremental detokenization with stop strings, linear in the output.

Each step decodes only a short window of ids, not the whole output (which made a 4,096-token
answer quadratic: seconds of engine time). The window starts at `prefix`, the first id of the
last piece already turned into text, so decoders that depend on a token's left neighbour (byte-
level BPE, SentencePiece's leading space) see the same context both times (the method of
Hugging Face's TextStreamer and vLLM's detokenizer):

    prefix_text = decode(ids[prefix:read])      # what those ids gave last time
    new_text    = decode(ids[prefix:])          # with the new id(s)
    delta       = new_text[len(prefix_text):]   # sent unless it ends in an incomplete character

| state    | meaning                                                                     |
|----------|-----------------------------------------------------------------------------|
| `prefix` | where the decode window starts                                               |
| `read`   | ids before it are in `text`; a delta ending in U+FFFD (half a UTF-8 char) waits |
| `text`   | everything decoded so far; `emitted` characters of it were sent               |

A delta ending in U+FFFD waits for at most `MAX_PENDING` tokens (a UTF-8 character has at most
four bytes, and every token carries at least one): past that the bytes can never form a
character, so the U+FFFD is sent and the window moves on. (Waiting without a bound made a run of
stray bytes re-decode an ever longer window: 4,000 such tokens cost seconds.)

Text is held back while it ends in a prefix of a stop string, so a streamed client never sees
text that is later retracted. Each stop string has a Knuth–Morris–Pratt matcher fed every new
character once: its state is the longest prefix of the stop string that the text ends with, so
the holdback is the largest state and a stop string is found the character it completes, in
amortised constant work per character and stop string (the earlier scan compared every prefix
of every stop string at every token: quadratic in the stop strings' length).
"""

from __future__ import annotations

MAX_PENDING = 4  # tokens an incomplete character may wait for


class StopMatcher:
    """Knuth–Morris–Pratt over one stop string: `feed(c)` is True when the text fed so far ends
    with the whole string; `state` is the longest prefix of it the text ends with."""

    def __init__(self, stop: str):
        self.stop = stop
        self.state = 0
        self.steps = 0  # comparisons made (bounded by twice the characters fed)
        fail = [0] * len(stop)  # fail[i]: the longest proper border of stop[:i + 1]
        k = 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = fail[k - 1]
            if stop[i] == stop[k]:
                k += 1
            fail[i] = k
        self.fail = fail

    def feed(self, c: str) -> bool:
        state, stop = self.state, self.stop
        if state == len(stop):  # matched before: continue as after its longest border
            state = self.fail[state - 1]
        while state and stop[state] != c:
            state = self.fail[state - 1]
            self.steps += 1
        self.steps += 1
        if stop[state] == c:
            state += 1
        self.state = state
        return state == len(stop)


class Detokenizer:
    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.matchers = [StopMatcher(s) for s in stop if s]
        self.ids: list[int] = []
        self.prefix = 0  # the decode window starts here
        self.read = 0  # ids before this are in `text`
        self.emitted = 0  # characters of the text already sent
        self.text = ""
        self.pending = False  # the last delta ended in an incomplete character

    @property
    def stop_steps(self) -> int:
        """The stop matchers' work so far (comparisons)."""
        return sum(m.steps for m in self.matchers)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _step(self) -> str:
        """Decode the window; advance it when the new text is whole, or when an incomplete
        character has waited `MAX_PENDING` tokens. Returns the new text."""
        prefix_text = self._decode(self.ids[self.prefix:self.read])
        new_text = self._decode(self.ids[self.prefix:])
        delta = new_text[len(prefix_text):]
        if delta.endswith("\ufffd") and len(self.ids) - self.read < MAX_PENDING:
            self.pending = True
            return ""
        self.pending = False
        self.prefix, self.read = self.read, len(self.ids)
        return delta

    def _append(self, delta: str) -> int | None:
        """Add `delta` to the text, feeding the stop matchers; the index where a stop string
        starts, at the first character that completes one (None: none)."""
        start = len(self.text)
        self.text += delta
        if not self.matchers:
            return None
        for i, c in enumerate(delta, start):
            for m in self.matchers:
                if m.feed(c):
                    return i - len(m.stop) + 1
        return None

    def _holdback(self) -> int:
        """Characters at the end of the text that might start a stop string."""
        return max((m.state for m in self.matchers), default=0)

    def add(self, token_id: int) -> tuple[str, bool]:
        """Append a token; return (new text to send, whether a stop string was hit)."""
        self.ids.append(token_id)
        delta = self._step()
        if not delta:
            return "", False
        at = self._append(delta)
        if at is not None:
            self.text = self.text[:at]
            return self._flush_to(len(self.text)), True
        return self._flush_to(len(self.text) - self._holdback()), False

    def finish(self) -> str:
        """Everything not yet sent (at the end of generation): an incomplete character at the
        very end is dropped."""
        if self.pending:
            tail = self._decode(self.ids[self.prefix:])[
                len(self._decode(self.ids[self.prefix:self.read])):]
            at = self._append(tail.rstrip("\ufffd"))
            if at is not None:
                self.text = self.text[:at]
            self.pending = False
        return self._flush_to(len(self.text))

    def _flush_to(self, end: int) -> str:
        if end <= self.emitted:
            return ""
        delta = self.text[self.emitted:end]
        self.emitted = end
        return delta
