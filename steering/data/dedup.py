"""Keeping the test split out of the training and validation prompt sets.

`harmful_test_jbb` (JailbreakBench's 100 behaviours) is the held-out test split. Arditi et al.'s
training split draws on AdvBench, HarmBench and TDC2023, which JailbreakBench also draws on, so
some training and validation prompts ask for the same thing as a test prompt, in the same or
nearly the same words. Two stages find them:

1. **Fuzzy screen** (`screen`): every (row, test prompt) pair whose normalised strings
   (rapidfuzz's `default_process`: lower case, non-alphanumerics to spaces, trimmed) reach
   `fuzz.ratio` ≥ 70 (Indel similarity of the whole strings) or `fuzz.token_set_ratio` ≥ 80
   (similarity of the shared word set, catching one prompt contained in the other). The
   thresholds are deliberately loose: the screen only proposes pairs.
2. **Reading**: each screened row was read against the whole test split and removed when it asks
   for the same harmful act on the same kind of target as some test prompt, whatever the
   wording or the deliverable ("a guide", "a tutorial", "step-by-step instructions"); kept when
   only the phrasing template is shared ("Write a guide on how to create and distribute …" with
   another object).

`test_overlap.json` records every screened pair with its scores and the decision, and the rows
removed (their index in the file as published, their text and the test prompt they match).
`tests/steering/test_data_hygiene.py` re-runs the screen on the shipped files: a new screened pair without
a recorded decision, or a removed row that is back, fails it.

    python -m steering.data.dedup            # print the screen for the shipped files
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from importlib import resources

RATIO = 70  # fuzz.ratio threshold of the screen (0–100)
TOKEN_SET = 80  # fuzz.token_set_ratio threshold of the screen
TEST_SPLIT = "harmful_test_jbb"
CHECKED = ("harmful_train", "harmful_val", "harmless_train", "harmless_val", "overrefusal")


@dataclass(frozen=True)
class Pair:
    split: str
    index: int  # row index in the file as screened
    test_index: int
    ratio: int
    token_set_ratio: int
    instruction: str
    test_instruction: str


def screen(rows: list[str], test: list[str], split: str = "", ratio: int = RATIO,
           token_set: int = TOKEN_SET) -> list[Pair]:
    """Every (row, test prompt) pair at or above either threshold."""
    import numpy as np
    from rapidfuzz import fuzz, process, utils

    if not rows or not test:
        return []
    kw = dict(processor=utils.default_process, dtype=np.uint8, workers=1)
    a = process.cdist(rows, test, scorer=fuzz.ratio, **kw)
    b = process.cdist(rows, test, scorer=fuzz.token_set_ratio, **kw)
    hits = np.argwhere((a >= ratio) | (b >= token_set))
    return [Pair(split, int(i), int(j), int(a[i, j]), int(b[i, j]), rows[i], test[j])
            for i, j in hits]


def _rows(name: str) -> list[str]:
    text = resources.files("steering.data").joinpath(f"{name}.json").read_text()
    return [r["instruction"] if isinstance(r, dict) else str(r) for r in json.loads(text)]


def screen_shipped() -> list[Pair]:
    """The screen over every shipped training/validation set against the test split."""
    test = _rows(TEST_SPLIT)
    return [p for split in CHECKED for p in screen(_rows(split), test, split)]


def overlap_record() -> dict:
    """`test_overlap.json`: the screen's thresholds, every decision, the removed rows."""
    text = resources.files("steering.data").joinpath("test_overlap.json").read_text()
    return json.loads(text)


if __name__ == "__main__":
    for pair in screen_shipped():
        print(json.dumps(asdict(pair)))
