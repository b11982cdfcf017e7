"""Contrastive example files for `steer extract --positive FILE --negative FILE`.

Accepted, by extension (anything else is tried as JSON, then JSONL):

    .json    a list of strings, or of objects
    .jsonl   one string or object per line
    .csv     a header row; one row per example

An object (or CSV row) names its prompt under one of PROMPT_KEYS and may carry a completion under
one of COMPLETION_KEYS. With completions, activations are read on the completion tokens (the
prompt is the user turn, the completion the start of the assistant's answer, as repeng does);
without, on the last tokens of the chat template after the prompt. A file mixes neither: either
every example has a completion or none has. Packaged sets are named `package:NAME` (a file
`NAME.json` in `steering.data`, e.g. `package:register_casual`).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from steering.data.register import mean_casual_score

PROMPT_KEYS = ("prompt", "instruction", "question", "input", "text")
COMPLETION_KEYS = ("completion", "response", "output", "answer")


@dataclass(frozen=True)
class Example:
    prompt: str
    completion: str | None = None


def _from_row(row: object, where: str) -> Example:
    if isinstance(row, str):
        return Example(row)
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a string or an object, got {type(row).__name__}")
    prompt = next((row[k] for k in PROMPT_KEYS if row.get(k) not in (None, "")), None)
    if not isinstance(prompt, str):
        raise ValueError(f"{where}: no prompt (one of {', '.join(PROMPT_KEYS)})")
    completion = next((row[k] for k in COMPLETION_KEYS if row.get(k) not in (None, "")), None)
    if completion is not None and not isinstance(completion, str):
        raise ValueError(f"{where}: the completion must be a string")
    return Example(prompt, completion)


def _rows(text: str, suffix: str, source: str) -> list:
    if suffix == ".csv":
        return list(csv.DictReader(io.StringIO(text)))
    if suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    try:
        rows = json.loads(text)
    except json.JSONDecodeError:
        try:
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise ValueError(f"{source} is neither JSON nor JSONL ({exc})") from None
    if not isinstance(rows, list):
        raise ValueError(f"{source}: expected a JSON list of examples")
    return rows


def load_examples(source: str | Path) -> list[Example]:
    """The examples of one contrastive file (see the module docstring)."""
    name = str(source)
    if name.startswith("package:"):
        text = resources.files("steering.data").joinpath(f"{name[8:]}.json").read_text()
        suffix = ".json"
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"contrastive file {path} does not exist")
        text, suffix = path.read_text(), path.suffix.lower()
    examples = [_from_row(r, f"{name}[{i}]") for i, r in enumerate(_rows(text, suffix, name))]
    if not examples:
        raise ValueError(f"{name} holds no examples")
    with_completion = {e.completion is not None for e in examples}
    if len(with_completion) > 1:
        raise ValueError(f"{name}: either every example has a completion or none has")
    return examples


@dataclass(frozen=True)
class ShippedConcept:
    positive: str
    negative: str
    description: str
    # texts → how much of the concept they show: the concept pack's choice of layer is made by
    # it on held-out prompts (steering.extraction.concept, step 5)
    behaviour: Callable[[list[str]], float] | None = None


# Concepts whose packs are extracted at first use for a model and served besides refusal.
SHIPPED_CONCEPTS = {
    "casual": ShippedConcept(
        "package:register_casual", "package:register_formal",
        "casual (positive) vs formal (negative) register of the user's request and the answer "
        "it asks for; 64 + 64 prompts written for this project (data/README.md)",
        mean_casual_score),
}


def shipped_behaviour(positive: str, negative: str) -> Callable[[list[str]], float] | None:
    """The scorer of the shipped concept whose example sets these are (None for other files)."""
    return next((c.behaviour for c in SHIPPED_CONCEPTS.values()
                 if (c.positive, c.negative) == (str(positive), str(negative))), None)
