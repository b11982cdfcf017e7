"""The test split stays out of the training and validation prompt sets (steering/data/dedup.py)."""

from __future__ import annotations

import pytest

from steering.data.dedup import CHECKED, TEST_SPLIT, overlap_record, screen, screen_shipped
from steering.data.prompts import load_instructions

pytest.importorskip("rapidfuzz")


def test_every_screened_pair_has_a_recorded_decision():
    record = overlap_record()
    kept = {(k["split"], k["instruction"], k["test_index"]) for k in record["kept"]}
    new = [p for p in screen_shipped() if (p.split, p.instruction, p.test_index) not in kept]
    assert not new, f"screened pairs without a decision in test_overlap.json: {new[:3]}"


def test_removed_rows_are_gone_and_counts_match():
    record = overlap_record()
    for r in record["removed"]:
        assert r["instruction"] not in load_instructions(r["split"]), r["split"]
    for split in CHECKED:
        assert len(load_instructions(split)) == record["counts"][split]["rows_shipped"]
    assert sum(c["removed"] for c in record["counts"].values()) == len(record["removed"]) > 0


def test_the_screen_flags_a_reworded_test_prompt():
    test = load_instructions(TEST_SPLIT)
    reworded = [test[0].upper() + "!", test[1].replace(" a ", " the ", 1), "Bake bread."]
    flagged = {p.index for p in screen(reworded, test)}
    assert flagged == {0, 1}
