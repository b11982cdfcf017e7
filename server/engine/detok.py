"""Incremental detokenization with stop strings.

Text is re-decoded from all generated ids (robust for byte-level BPE), and held back while it
ends in an incomplete UTF-8 character or in a prefix of a stop string, so a streamed client never
sees text that is later retracted.
"""

from __future__ import annotations


class Detokenizer:
    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.emitted = 0  # characters of the text already sent
        self.text = ""

    def _holdback(self, text: str) -> int:
        """Characters at the end of `text` that might start a stop string."""
        keep = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    keep = max(keep, n)
                    break
        return keep

    def add(self, token_id: int) -> tuple[str, bool]:
        """Append a token; return (new text to send, whether a stop string was hit)."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for s in self.stop:
            at = text.find(s, max(0, self.emitted - len(s)))
            if at != -1:
                self.text = text[:at]
                return self._flush_to(len(self.text)), True
        self.text = text
        if text.endswith("\ufffd"):  # an incomplete multi-byte character
            return "", False
        return self._flush_to(len(text) - self._holdback(text)), False

    def finish(self) -> str:
        """Everything not yet sent (at the end of generation)."""
        text = self.text[:-1] if self.text.endswith("\ufffd") else self.text
        return self._flush_to(len(text))

    def _flush_to(self, end: int) -> str:
        if end <= self.emitted:
            return ""
        delta = self.text[self.emitted:end]
        self.emitted = end
        return delta
