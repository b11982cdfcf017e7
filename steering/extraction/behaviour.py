"""Behavioural scores of a concept pack's candidates on held-out prompts (concept.py, step 5).

A candidate (layer, read position) is scored by what adding its direction does: `actadd` at
strength 1 through the steering kernel (`build_row` rows, `hooks_of` hooks, as every other pass),
on the negative-class **validation** split, which the direction was not fitted on. Each score is
"steered minus unsteered", higher = more of the concept:

| examples | measure | `selection.behaviour.measure` |
|---|---|---|
| prompt/completion | mean log-likelihood gap ℓ̄⁺ − ℓ̄⁻ of the positive vs the negative completions given the prompt | `loglik_gap` |
| prompt-only, with a scorer | the scorer on greedy answers (`tokens` new tokens) to negative-class prompts | `scorer` |

The likelihood gap is Rimsky et al. 2024's measure ("Steering Llama 2 via Contrastive Activation
Addition", §3: the probability the steered model gives the behaviour-matching answer against the
other one), on free-text completions instead of A/B letters. ℓ̄ is the **per-token mean**
log-probability of a class's completions, pooled over the validation pairs (Σ log p over the
class's completion tokens / their number; `steering.evaluation.passes.sequence_nll`), so a
steering that makes every token likelier by the same amount scores 0 whatever the completions'
lengths. Pairs: where the two files hold the same prompts, a prompt's positive and negative
completion (split together, so both are held out); otherwise the i-th negative validation prompt
with its own completion and the i-th positive validation completion.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from steering.data.contrastive import Example
from steering.evaluation.passes import decode, generate_greedy, sequence_nll
from steering.interventions.methods import RowSteering, SteeringSpec, build_row
from steering.models.chat import format_chat
from steering.models.loading import LoadedModel

Scorer = Callable[[list[str]], float]  # texts → how much of the concept they show


@dataclass(frozen=True)
class Pair:
    prompt: str
    positive: str
    negative: str


def is_paired(positive: Sequence[Example], negative: Sequence[Example]) -> bool:
    """Both classes are prompt/completion examples over the same, distinct prompts."""
    if positive[0].completion is None or negative[0].completion is None:
        return False
    pos, neg = [e.prompt for e in positive], [e.prompt for e in negative]
    return len(set(pos)) == len(pos) == len(neg) == len(set(neg)) and set(pos) == set(neg)


def validation_pairs(pos_val: Sequence[Example], neg_val: Sequence[Example], paired: bool,
                     limit: int) -> list[Pair]:
    """Up to `limit` (prompt, positive completion, negative completion) held-out triples."""
    if paired:
        by_prompt = {e.prompt: e.completion for e in pos_val}
        missing = [e.prompt for e in neg_val if e.prompt not in by_prompt]
        if missing:
            raise ValueError(f"paired split lost the positive completion of {missing[0]!r}")
        return [Pair(e.prompt, by_prompt[e.prompt] or "", e.completion or "")
                for e in neg_val][:limit]
    return [Pair(e.prompt, pos_val[i % len(pos_val)].completion or "", e.completion or "")
            for i, e in enumerate(neg_val[:limit])]


@dataclass
class LoglikGap:
    """ℓ̄⁺ − ℓ̄⁻ over `pairs` under a steering row, minus the same unsteered (module docstring)."""

    lm: LoadedModel
    pairs: list[Pair]
    batch_size: int = 16
    base: float = field(init=False)

    def __post_init__(self) -> None:
        tok = self.lm.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        heads = [tok(format_chat(tok, p.prompt), add_special_tokens=False)["input_ids"]
                 for p in self.pairs]
        self._sides = []
        for side in ("positive", "negative"):
            bodies = [tok(getattr(p, side), add_special_tokens=False)["input_ids"] or [pad]
                      for p in self.pairs]
            self._sides.append(([h + b for h, b in zip(heads, bodies)],
                                [len(b) for b in bodies]))
        self.base = self.gap(None)

    def mean_logprobs(self, row: RowSteering | None) -> tuple[float, float]:
        """(ℓ̄⁺, ℓ̄⁻): per-token mean log-probability of each side's completions."""
        out = []
        for sequences, n_targets in self._sides:
            nll, count = sequence_nll(self.lm, sequences, n_targets, row, self.batch_size)
            out.append(-nll / max(count, 1))
        return out[0], out[1]

    def gap(self, row: RowSteering | None) -> float:
        pos, neg = self.mean_logprobs(row)
        return pos - neg

    def __call__(self, row: RowSteering) -> float:
        return self.gap(row) - self.base

    def evaluate(self, rows: Sequence[RowSteering]) -> list[float]:
        return [self(row) for row in rows]

    def record(self) -> dict:
        return {"measure": "loglik_gap", "split": "negative_val", "n": len(self.pairs),
                "base": self.base,
                "what": "per-token mean log p(positive completion | prompt) minus the same for "
                        "the negative completion, under actadd at strength 1, minus unsteered"}


@dataclass
class ScoredAnswers:
    """The scorer on greedy answers to `prompts` under a steering row, minus unsteered.

    `evaluate` generates the unsteered answers and every row's in one batched generation (the
    kernel steers each batch row by its own settings): decoding a small model on a CPU is bound
    by reading the weights once per step, so one pass of `tokens` steps for every candidate
    costs little more than one candidate's."""

    lm: LoadedModel
    prompts: list[str]
    scorer: Scorer
    tokens: int = 24
    batch_size: int = 64
    base: float | None = None

    def answers(self, rows: Sequence[RowSteering | None]) -> list[list[str]]:
        """Greedy answers to every prompt, per row (None: unsteered)."""
        none = build_row(SteeringSpec("none"), None)
        per_prompt = [none if row is None else row for row in rows for _ in self.prompts]
        ids, _ = generate_greedy(self.lm, self.prompts * len(rows), per_prompt, self.tokens,
                                 self.batch_size)
        texts, n = decode(self.lm, ids), len(self.prompts)
        return [texts[i * n:(i + 1) * n] for i in range(len(rows))]

    def evaluate(self, rows: Sequence[RowSteering]) -> list[float]:
        base, *steered = [float(self.scorer(t)) for t in self.answers([None, *rows])]
        self.base = base
        return [score - base for score in steered]

    def __call__(self, row: RowSteering) -> float:
        return self.evaluate([row])[0]

    def record(self) -> dict:
        name = getattr(self.scorer, "__qualname__", type(self.scorer).__name__)
        return {"measure": "scorer", "scorer": f"{getattr(self.scorer, '__module__', '')}."
                f"{name}".lstrip("."), "split": "negative_val", "n": len(self.prompts),
                "tokens": self.tokens, "base": self.base,
                "what": "the scorer on greedy answers under actadd at strength 1, minus "
                        "unsteered"}


def measure(lm: LoadedModel, pos_val: Sequence[Example], neg_val: Sequence[Example],
            paired: bool, scorer: Scorer | None, n_prompts: int, tokens: int,
            batch_size: int) -> LoglikGap | ScoredAnswers | None:
    """The behavioural measure for these examples (module table), or None: prompt-only examples
    without a scorer have none. `evaluate(rows)` scores rows (steered minus unsteered)."""
    if neg_val[0].completion is not None:
        return LoglikGap(lm, validation_pairs(pos_val, neg_val, paired, n_prompts), batch_size)
    if scorer is None:
        return None
    return ScoredAnswers(lm, [e.prompt for e in neg_val][:n_prompts], scorer, tokens)
