"""Incremental detokenization with stop strings.

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

Text is held back while it ends in a prefix of a stop string, so a streamed client never sees
text that is later retracted.
"""

from __future__ import annotations


class Detokenizer:
    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.prefix = 0  # the decode window starts here
        self.read = 0  # ids before this are in `text`
        self.emitted = 0  # characters of the text already sent
        self.text = ""
        self.pending = False  # the last delta ended in an incomplete character

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _holdback(self, text: str) -> int:
        """Characters at the end of `text` that might start a stop string."""
        keep = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    keep = max(keep, n)
                    break
        return keep

    def _step(self) -> str:
        """Decode the window; advance it when the new text is whole. Returns the new text."""
        prefix_text = self._decode(self.ids[self.prefix:self.read])
        new_text = self._decode(self.ids[self.prefix:])
        delta = new_text[len(prefix_text):]
        if delta.endswith("\ufffd"):
            self.pending = True
            return ""
        self.pending = False
        self.prefix, self.read = self.read, len(self.ids)
        return delta

    def add(self, token_id: int) -> tuple[str, bool]:
        """Append a token; return (new text to send, whether a stop string was hit)."""
        self.ids.append(token_id)
        delta = self._step()
        if not delta:
            return "", False
        self.text += delta
        for s in self.stop:
            at = self.text.find(s, max(0, self.emitted - len(s) + 1))
            if at != -1:
                self.text = self.text[:at]
                return self._flush_to(len(self.text)), True
        return self._flush_to(len(self.text) - self._holdback(self.text)), False

    def finish(self) -> str:
        """Everything not yet sent (at the end of generation): an incomplete character at the
        very end is dropped."""
        if self.pending:
            tail = self._decode(self.ids[self.prefix:])[
                len(self._decode(self.ids[self.prefix:self.read])):]
            self.text += tail.rstrip("\ufffd")
            self.pending = False
        return self._flush_to(len(self.text))

    def _flush_to(self, end: int) -> str:
        if end <= self.emitted:
            return ""
        delta = self.text[self.emitted:end]
        self.emitted = end
        return delta
