"""What each steering method *is*: one `Method` record per method (torch-free: the command line,
the clients, the server's policy and schema, the evaluation grid and the report read it).

A method is this record plus its kernel parameters, the row builder registered for it in
`steering.interventions.methods` (`@builder("name")`); the math of each is in that module's table.
Adding a method: docs/architecture.md, "Adding a method".

Effect on refusal is stated per strength range, in the papers' terms:

| method | raises refusal (harmless prompts) | lowers refusal (harmful prompts) |
|---|---|---|
| actadd | strength > 0 | strength < 0 |
| ace | strength > 0 (toward the harmful mean) | strength < 1 (0: the harmless mean) |
| ablate, inlp_null, inlp_flip, inlp_zero_positive, inlp_negate_positive | never | any strength |
| inlp_reflect | any strength | any strength |

The INLP methods and their reference point are in `steering.interventions.methods`' docstring:
`inlp_null` (Ravfogel et al. 2020's nullspace projection), `inlp_flip` (AlterRep, Ravfogel et
al. 2021) and `inlp_reflect` act around the INLP origin (the midpoint of the class means the
classifiers were fitted around); `inlp_zero_positive` and `inlp_negate_positive` are this
project's variants around the residual stream's raw origin (`Method.variant_of`).

(ActAdd: h' = h + s·r, Arditi et al. 2024; ACE: h' = h − r̂r̂ᵀ(h − μ⁻) + s·‖r‖·r̂, Marshall et al.
2024 eq. 3, so s = 0 puts the refusal coordinate at the harmless mean's and s = 1 at the harmful
mean's.) The server's policy derives from `lowers`: a key without the refusal-lowering grant may
use a method only at strengths outside that range.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Strengths:
    """The strengths s with lo < s < hi (None: unbounded on that side); `Strengths()` is all."""

    lo: float | None = None
    hi: float | None = None

    def __contains__(self, s: float) -> bool:
        return (self.lo is None or s > self.lo) and (self.hi is None or s < self.hi)

    @property
    def everything(self) -> bool:
        return self.lo is None and self.hi is None

    def describe(self) -> str:
        if self.everything:
            return "any strength"
        if self.lo is None:
            return f"strength < {self.hi:g}"
        if self.hi is None:
            return f"strength > {self.lo:g}"
        return f"{self.lo:g} < strength < {self.hi:g}"

    def complement(self) -> tuple[float | None, float | None] | None:
        """The closed range [lo, hi] outside this one, if it is one interval (None: empty)."""
        if self.everything:
            return None
        if self.lo is None:
            return (self.hi, None)
        if self.hi is None:
            return (None, self.lo)
        return None  # two intervals: not needed by any method


Family = Literal["none", "dim", "affine", "inlp"]
Layers = Literal["none", "pack", "every", "inlp"]  # default layers: the pack's, all, INLP's


@dataclass(frozen=True)
class Method:
    """One steering method: everything the server, the evaluation and the clients need."""

    name: str
    family: Family
    description: str  # one line, shown by /v1/steering/methods and the command line
    operation: str | None  # the pack vector operation it needs (steering.packs.identity)
    layers: Layers  # default layers
    raises: Strengths | None  # strengths that raise refusal on harmless prompts (None: never)
    lowers: Strengths | None  # strengths that lower refusal on harmful prompts (None: never)
    eval_strengths: tuple[float, ...] = ()  # the evaluation grid's and the precision gate's
    calibrated: bool = False  # extraction calibrates the strength that reaches its effect
    uses_k: bool = False  # takes `k`, the number of leading directions
    paper: str = ""
    # A variant this project made of a published method (named here), not a method of a paper.
    variant_of: str | None = None

    def purpose(self, strength: float) -> Literal["induce", "suppress", "other"]:
        """What a setting is for: it only raises refusal (induce), only lowers it (suppress),
        or does both or neither (other)."""
        up = self.raises is not None and strength in self.raises
        down = self.lowers is not None and strength in self.lowers
        if up and not down:
            return "induce"
        if down and not up:
            return "suppress"
        return "other"

    def lowers_refusal(self, strength: float) -> bool:
        return self.lowers is not None and strength in self.lowers

    @property
    def strength_without_grant(self) -> tuple[float | None, float | None] | None:
        """[lo, hi] a key without the refusal-lowering grant may use (None: refused)."""
        if self.lowers is None:
            return (None, None)
        return self.lowers.complement()


ALWAYS = Strengths()

REGISTRY: dict[str, Method] = {m.name: m for m in (
    Method("none", "none", "the unsteered model", None, "none", None, None),
    Method("actadd", "dim", "activation addition of the DiM vector (induces refusal at "
           "strength > 0)", "add", "pack", raises=Strengths(lo=0.0), lowers=Strengths(hi=0.0),
           eval_strengths=(1.0,), calibrated=True, paper="Arditi et al. 2024"),
    Method("ablate", "dim", "directional ablation of the DiM direction at every layer "
           "(removes refusal)", "ablate", "every", raises=None, lowers=ALWAYS,
           eval_strengths=(1.0,), paper="Arditi et al. 2024"),
    Method("ace", "affine", "affine concept editing: strength 0 = no refusal, 1 = refusal",
           "affine", "pack", raises=Strengths(lo=0.0), lowers=Strengths(hi=1.0),
           eval_strengths=(0.0, 1.0), calibrated=True, paper="Marshall et al. 2024"),
    Method("inlp_null", "inlp", "INLP nullspace projection: the leading k INLP coordinates "
           "set to the class boundary's (h' = h − QQᵀ(h − m), m the midpoint of the class "
           "means INLP was fitted around; lands between the clusters)", "inlp", "inlp",
           raises=None, lowers=ALWAYS, eval_strengths=(1.0,), uses_k=True,
           paper="Ravfogel et al. 2020; Rocchetti & Ferrara 2026"),
    Method("inlp_flip", "inlp", "INLP counterfactual flip (AlterRep): harmful-side "
           "coordinates mirrored across the class boundary, harmless-side ones untouched "
           "(h' = h − 2·Q·relu(Qᵀ(h − m)))", "inlp", "inlp", raises=None, lowers=ALWAYS,
           eval_strengths=(1.0,), uses_k=True,
           paper="Ravfogel et al. 2021; Rocchetti & Ferrara 2026"),
    Method("inlp_reflect", "inlp", "INLP two-sided reflection across the class boundary: "
           "every activation changes side, so harmless prompts move toward refusal (geometry "
           "studies)", "inlp", "inlp", raises=ALWAYS, lowers=ALWAYS, uses_k=True),
    Method("inlp_zero_positive", "inlp", "this project's variant, not a paper's: INLP "
           "coordinates measured from the residual stream's raw origin, the positive ones set "
           "to 0 (h' = h − Q·relu(Qᵀh)); moves harmless activations too", "inlp", "inlp",
           raises=None, lowers=ALWAYS, eval_strengths=(1.0,), uses_k=True,
           variant_of="inlp_null"),
    Method("inlp_negate_positive", "inlp", "this project's variant, not a paper's: INLP "
           "coordinates measured from the residual stream's raw origin, the positive ones "
           "negated (h' = h − 2·Q·relu(Qᵀh)); moves harmless activations too", "inlp", "inlp",
           raises=None, lowers=ALWAYS, eval_strengths=(1.0,), uses_k=True,
           variant_of="inlp_flip"),
)}


def method(name: str) -> Method:
    """The record of `name` (KeyError for an unknown one; `methods.build_row` names the field)."""
    return REGISTRY[name]


def methods_where(**fields) -> tuple[str, ...]:
    """Names of the methods whose record has every given field value (`family="inlp"`)."""
    return tuple(m.name for m in REGISTRY.values()
                 if all(getattr(m, k) == v for k, v in fields.items()))


METHODS = tuple(REGISTRY)
INLP_METHODS = methods_where(uses_k=True)
CALIBRATED_METHODS = methods_where(calibrated=True)  # actadd, ace
DESCRIPTIONS = {m.name: m.description for m in REGISTRY.values()}
APPLY_TO = ("all", "prompt", "generation")  # which positions a steering object edits


def eval_grid() -> list[tuple[str, float]]:
    """(method, strength) of the evaluation grid and the precision gate, in registry order."""
    return [(m.name, s) for m in REGISTRY.values() for s in m.eval_strengths]

CALIBRATED = "calibrated"

# Built-in server presets (`<served-name>+<preset>`); `strength: "calibrated"` takes the pack's
# calibrated strength for the method (steering.extraction.extract), 1 where the pack records none.
# Each description states what the preset does and the validation measurement behind it: outputs
# of the embedded model (int8, 64 greedy tokens) on harmful_val (37 prompts) and
# harmless_val[400:424] (24), read by hand as refuses / complies / other
# (steering/data/judge_labelled.jsonl; docs/report/judge.md). `no-refusal` is ablation: of the
# suppression methods read, it answers harmful requests most often (complies 24/37; inlp_flip
# 12/37, inlp_null 16/37, ace s=0 21/37, and the raw-origin inlp_negate_positive k=2, the
# preset's setting until 2026-12-06, 14/37 with 23/37 deflecting), so it does what its name says.
BUILTIN_PRESETS: dict[str, dict] = {
    "no-refusal": {"method": "ablate", "strength": 1.0,
                   "description": "less refusal: directional ablation of the DiM direction at "
                                  "every layer (Arditi et al. 2024), the same setting as "
                                  "`ablate`. Embedded model, validation prompts read by hand: "
                                  "harmful requests answered 24/37 (unsteered 10/37), refused "
                                  "2/37 (unsteered 19/37); harmless ones answered 23/24 "
                                  "(unsteered 20/24)"},
    "ablate": {"method": "ablate", "strength": 1.0,
               "description": "less refusal: directional ablation of the DiM direction at "
                              "every layer (Arditi et al. 2024). Embedded model, validation "
                              "prompts read by hand: harmful requests answered 24/37, refused "
                              "2/37, deflected 11/37; harmless ones answered 23/24"},
    "more-refusal": {"method": "actadd", "strength": CALIBRATED,
                     "description": "more refusal: activation addition of the DiM vector at the "
                                    "pack's calibrated strength (embedded model: 1.5; harmless "
                                    "validation prompts refused 20/24, read by hand; unsteered "
                                    "4/24)"},
    "ace-refuse": {"method": "ace", "strength": CALIBRATED,
                   "description": "more refusal: affine concept editing at the pack's "
                                  "calibrated strength (Marshall et al. 2024; embedded model: "
                                  "1.5; harmless validation prompts refused 20/24, read by "
                                  "hand; unsteered 4/24)"},
}

# The fields every steering object takes besides the method's own (documented by the server's
# /v1/steering/methods and the command line's --help).
CONTROLS: dict[str, str] = {
    "apply_to": "which positions are edited: 'all' (default), 'prompt' (prompt positions only) "
                "or 'generation' (positions that produce answer tokens: the last prompt "
                "position, which yields the first token, and every generated token)",
    "generation_window": "[start, end) or [start]: edit only while generating tokens start … "
                         "end−1 (0-based); implies apply_to 'generation'",
    "when": "{pack, layer?, above | below}: apply only if the prompt's score on the pack's "
            "DiM axis (harmless mean 0, harmful mean 1; residual at the pack's layer input and "
            "position) is above / below the threshold; the response reports the score",
    "list": "steering may be a list of objects: their edits run in list order at each site",
}

# The command line's compact spelling of a steering setting (`steer chat --steer`, `steer compare
# --variant`); clients/cli.py parses it.
VARIANT_SYNTAX = """\
A variant is a preset name (no-refusal), a steering object, or several objects joined by '+'
(a list: applied in that order at every site). An object is METHOD[:STRENGTH[:K]] followed by
comma-separated options:
  prompt | generation | all      positions to steer (apply_to; default all)
  window=S-E | window=S-         only while generating tokens S … E-1 (implies generation)
  above=T | below=T              only when the prompt's refusal score (harmless mean 0, harmful
                                 mean 1) is above / below T; when-pack=NAME, when-layer=L
  pack=NAME | layers=L/L/...
A preset name also takes options (no-refusal,generation). Examples:
  actadd:4,generation    actadd:4,window=0-8    actadd:4,above=0.5
  ablate+actadd:4        ablate,below=0.4,generation"""
