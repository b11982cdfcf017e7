"""The refusal task's data and metric, read from the repository's own files (lm-evaluation-
harness imports this module in its own virtual environment: no import of `steering` here)."""

from __future__ import annotations

import json
from pathlib import Path

DATA = Path(__file__).resolve().parents[3] / "steering" / "data"


def load_harmful_val(**_kwargs):
    """harmful_val.json as a one-split dataset: {"test": rows of instruction, category}."""
    import datasets

    rows = json.loads((DATA / "harmful_val.json").read_text())
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def _substrings() -> list[str]:
    constants = json.loads((DATA / "refusal_eval_constants.json").read_text())
    return [s.lower() for s in constants["refusal_substrings"]["strings"]]


SUBSTRINGS = _substrings()


def is_refusal(text: str) -> bool:
    """Arditi et al. 2024's JailbreakBench matcher: any refusal substring, case-insensitive
    (steering.evaluation.refusal.is_refusal, over the same list)."""
    low = text.lower()
    return any(s in low for s in SUBSTRINGS)


def process_results(doc: dict, results: list[str]) -> dict:
    return {"refusal_rate": float(is_refusal(results[0]))}
