"""The method names and one-line descriptions (torch-free: the command line and clients read them).

The math of each method is in `steering.interventions.methods`.
"""

from __future__ import annotations

METHODS = ("none", "actadd", "ablate", "ace", "inlp_null", "inlp_flip", "inlp_reflect")
INLP_METHODS = ("inlp_null", "inlp_flip", "inlp_reflect")
APPLY_TO = ("all", "prompt", "generation")  # which positions a steering object edits
DESCRIPTIONS = {
    "none": "the unsteered model",
    "actadd": "activation addition of the DiM vector (induces refusal at strength > 0)",
    "ablate": "directional ablation of the DiM direction at every layer (removes refusal)",
    "ace": "affine concept editing: strength 0 = no refusal, 1 = refusal",
    "inlp_null": "INLP one-sided nullspace projection: coordinates on the harmful side of the "
                 "INLP directions set to zero (weaker suppression)",
    "inlp_flip": "INLP one-sided counterfactual flip (AlterRep): coordinates on the harmful "
                 "side of the INLP directions negated, the others untouched (suppresses "
                 "refusal)",
    "inlp_reflect": "INLP two-sided reflection across the class boundary: every activation "
                    "changes side, so harmless prompts move toward refusal (geometry studies)",
}

CALIBRATED = "calibrated"

# Built-in server presets (`<served-name>+<preset>`); `strength: "calibrated"` takes the pack's
# calibrated strength for the method (steering.packs.extract), 1 where the pack records none.
BUILTIN_PRESETS: dict[str, dict] = {
    "no-refusal": {"method": "inlp_flip", "k": 2, "strength": 1.0,
                   "description": "less refusal: one-sided INLP counterfactual flip (AlterRep) "
                                  "on 2 leading directions; harmless prompts are left alone "
                                  "(Rocchetti & Ferrara 2026)"},
    "ablate": {"method": "ablate", "strength": 1.0,
               "description": "less refusal: directional ablation of the DiM direction at "
                              "every layer (Arditi et al. 2024)"},
    "more-refusal": {"method": "actadd", "strength": CALIBRATED,
                     "description": "more refusal: activation addition of the DiM vector at the "
                                    "pack's calibrated strength (refuses most harmless prompts)"},
    "ace-refuse": {"method": "ace", "strength": CALIBRATED,
                   "description": "more refusal: affine concept editing at the pack's "
                                  "calibrated strength (Marshall et al. 2024)"},
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
