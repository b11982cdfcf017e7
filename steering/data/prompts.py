"""The packaged prompt sets (copied unchanged from Arditi et al.'s splits; see data/SOURCES.md)."""

from __future__ import annotations

import hashlib
import json
import re
from importlib import resources
from pathlib import Path

SPLITS = ("harmful_train", "harmful_val", "harmless_train", "harmless_val", "harmful_test_jbb",
          "overrefusal")


def load_instructions(source: str | Path) -> list[str]:
    """A split name (e.g. "harmful_val"), optionally sliced ("harmless_val[3000:3040]"), or a
    JSON file of strings or {"instruction": …} rows."""
    if isinstance(source, str) and (m := re.fullmatch(r"(\w+)\[(\d*):(\d*)\]", source)) \
            and m.group(1) in SPLITS:
        rows = load_instructions(m.group(1))
        return rows[int(m.group(2) or 0): int(m.group(3)) if m.group(3) else None]
    if isinstance(source, str) and source in SPLITS:
        text = resources.files("steering.data").joinpath(f"{source}.json").read_text()
    else:
        text = Path(source).read_text()
    rows = json.loads(text)
    return [r["instruction"] if isinstance(r, dict) else str(r) for r in rows]


def load_general_text(limit: int | None = None) -> list[str]:
    """WikiText-2 test paragraphs (spacing cleaned) for perplexity on general text."""
    lines = resources.files("steering.data").joinpath(
        "wikitext2_test_paragraphs500.jsonl").read_text().splitlines()
    texts = [json.loads(line)["text"] for line in lines if line.strip()]
    return texts[:limit] if limit else texts


def prompts_hash(prompts: list[str]) -> str:
    return hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:16]
