"""The method names and one-line descriptions (torch-free: the command line and clients read them).

The math of each method is in `steering.interventions.methods`.
"""

from __future__ import annotations

METHODS = ("none", "actadd", "ablate", "ace", "inlp_null", "inlp_flip")
INLP_METHODS = ("inlp_null", "inlp_flip")
DESCRIPTIONS = {
    "none": "the unsteered model",
    "actadd": "activation addition of the DiM vector (induces refusal at strength > 0)",
    "ablate": "directional ablation of the DiM direction at every layer (removes refusal)",
    "ace": "affine concept editing: strength 0 = no refusal, 1 = refusal",
    "inlp_null": "INLP nullspace projection onto the class boundary (weaker suppression)",
    "inlp_flip": "INLP counterfactual flipping across the class boundary (suppresses refusal)",
}
