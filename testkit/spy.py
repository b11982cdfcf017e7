"""Counting calls of a patched function, for tests that show work was (not) done."""

from __future__ import annotations


class Counter:
    """Counts calls of a patched function (and passes them on)."""

    def __init__(self, real):
        self.real, self.calls = real, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.real(*args, **kwargs)
