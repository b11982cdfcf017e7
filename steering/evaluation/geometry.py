"""Where each method moves the activations, at the intervention layer (issue 5, item 3).

Harmful and harmless residual-stream activations at the pack's layer input and position, before
and after each method, projected to 2-D by a PCA fitted on the *unsteered* activations; and two
numbers per method:

- the mean position along the DiM axis, normalised so that the harmless mean is 0 and the harmful
  mean is 1: t(h) = (h − μ⁻)·r / ‖r‖², r = μ⁺ − μ⁻ (the means of the unsteered activations);
- the share of edited harmful activations whose nearest class mean (Euclidean, full space) is the
  harmless one. Because ‖h − μ⁻‖² − ‖h − μ⁺‖² = 2‖r‖² (t(h) − ½), that is exactly the share with
  t < ½: the per-sample view of the same axis, where the mean position is the average view.

Rocchetti & Ferrara 2026 claim that nullspace projection lands *between* the clusters (t ≈ ½) and
counterfactual flipping *in the opposite* cluster (t ≈ 0 for harmful activations).

An edited activation is read where the model reads it: the layer's input after every edit up to
that point. Methods whose edits all sit at or after that input (actadd, ace, INLP at the pack's
layer) are applied to the unsteered activations with the kernel directly (exact, no forward);
others (ablation at every layer) run the model up to the layer.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from steering.interventions.activations import encode_chats, layer_activations  # noqa: F401
from steering.interventions.conditions import dim_position  # noqa: F401 (re-exported)
from steering.interventions.kernel import BatchEdit, apply_edit
from steering.interventions.methods import RowSteering, SteeringSpec, build_row
from steering.models.loading import LoadedModel
from steering.packs.format import SteeringPack

# ---- numbers ------------------------------------------------------------------------------------

def nearest_is_harmless(acts: torch.Tensor, mean_harmful: torch.Tensor,
                        mean_harmless: torch.Tensor) -> torch.Tensor:
    """Per row: is the harmless class mean nearer than the harmful one? [N, d] → bool [N]"""
    a = acts.double()
    d_l = (a - mean_harmless.double()).norm(dim=-1)
    d_h = (a - mean_harmful.double()).norm(dim=-1)
    return d_l < d_h


def pca_2d(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """PCA of rows of x: (mean [d], components [2, d], explained-variance ratios of the two)."""
    x = x.double()
    mean = x.mean(0)
    _, s, vh = torch.linalg.svd(x - mean, full_matrices=False)
    var = s**2
    ratio = (var[:2] / var.sum().clamp_min(1e-30)).tolist()
    comps = vh[:2]
    if comps.shape[0] < 2:  # degenerate (one sample): pad with zeros
        comps = torch.cat([comps, torch.zeros(2 - comps.shape[0], x.shape[1], dtype=x.dtype)])
    return mean, comps, ratio


def project(x: torch.Tensor, mean: torch.Tensor, comps: torch.Tensor) -> torch.Tensor:
    return (x.double() - mean) @ comps.T


# ---- activations ---------------------------------------------------------------------------------

def edited_activations(lm: LoadedModel, prompts: Sequence[str], base: torch.Tensor, layer: int,
                       position: int, row: RowSteering, batch_size: int = 16,
                       desc: str | None = None) -> torch.Tensor:
    """`row`'s edited activations at `layer`'s input: the kernel on `base` when no edit comes
    before that point, else a steered forward."""
    if all(site_layer >= layer for site_layer, _ in row.edits):
        edit = row.edits.get((layer, "input"))
        if edit is None:
            return base.clone()
        batch = BatchEdit.stack([edit], torch.device("cpu"), torch.float32)
        return apply_edit(base.float()[None], batch)[0]
    return layer_activations(lm, prompts, layer, position, row, batch_size, desc)


# ---- the whole measurement -----------------------------------------------------------------------

def default_specs(pack: SteeringPack) -> list[SteeringSpec]:
    specs = [SteeringSpec("ablate", 1.0), SteeringSpec("actadd", 1.0),
             SteeringSpec("ace", 0.0), SteeringSpec("ace", 1.0)]
    if pack.max_k() and pack.layer in pack.inlp:
        k = pack.max_k()
        specs += [SteeringSpec(m, 1.0, k) for m in ("inlp_null", "inlp_flip", "inlp_reflect",
                                                     "inlp_zero_positive",
                                                     "inlp_negate_positive")]
    return specs


def _label(spec: SteeringSpec) -> str:
    label = f"{spec.method} s={spec.strength:g}"
    return label + (f" k={spec.k}" if spec.k is not None else "")


def geometry(lm: LoadedModel, pack: SteeringPack, harmful: Sequence[str],
             harmless: Sequence[str], specs: Sequence[SteeringSpec] | None = None,
             batch_size: int = 16) -> dict:
    """Before/after activations at the pack's layer and position, the PCA plane fitted on the
    unsteered ones, and each method's DiM-axis position and nearest-mean share (JSON-ready)."""
    layer, position = pack.layer, pack.position
    specs = list(specs) if specs is not None else default_specs(pack)
    base_h = layer_activations(lm, harmful, layer, position, None, batch_size,
                               desc="geometry: harmful activations")
    base_l = layer_activations(lm, harmless, layer, position, None, batch_size,
                               desc="geometry: harmless activations")
    mu_h, mu_l = base_h.mean(0), base_l.mean(0)
    mean, comps, ratio = pca_2d(torch.cat([base_h, base_l]))

    def summary(acts_h: torch.Tensor, acts_l: torch.Tensor) -> dict:
        return {
            "harmful_position": float(dim_position(acts_h, mu_h, mu_l).mean()),
            "harmless_position": float(dim_position(acts_l, mu_h, mu_l).mean()),
            "harmful_nearest_harmless": float(nearest_is_harmless(acts_h, mu_h, mu_l)
                                              .double().mean()),
            "harmless_nearest_harmful": float((~nearest_is_harmless(acts_l, mu_h, mu_l))
                                              .double().mean()),
            "pca_harmful": project(acts_h, mean, comps).float().tolist(),
            "pca_harmless": project(acts_l, mean, comps).float().tolist(),
        }

    out_methods = []
    for spec in tqdm(specs, desc="geometry: methods"):
        row = build_row(spec, pack)
        e_h = edited_activations(lm, harmful, base_h, layer, position, row, batch_size)
        e_l = edited_activations(lm, harmless, base_l, layer, position, row, batch_size)
        out_methods.append({"label": _label(spec), "method": spec.method,
                            "strength": spec.strength, "k": row.spec.k, **summary(e_h, e_l)})
    means_2d = project(torch.stack([mu_h, mu_l]), mean, comps).float().tolist()
    return {
        "layer": layer, "position": position, "n_harmful": len(harmful),
        "n_harmless": len(harmless), "pca_explained_variance": ratio,
        "pca_means": {"harmful": means_2d[0], "harmless": means_2d[1]},
        "unsteered": summary(base_h, base_l),
        "methods": out_methods,
    }


def strip_points(geo: dict) -> dict:
    """`geo` without the per-prompt 2-D points (for compact JSON)."""
    def clean(d: dict) -> dict:
        return {k: v for k, v in d.items() if not k.startswith("pca_harm")}
    return {**{k: v for k, v in geo.items() if k not in {"unsteered", "methods"}},
            "unsteered": clean(geo["unsteered"]), "methods": [clean(m) for m in geo["methods"]]}


# ---- plot ----------------------------------------------------------------------------------------

def plot_geometry(geo: dict) -> bytes:
    """One panel per method: unsteered clusters faded, edited activations solid. PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = geo["methods"]
    n = max(1, len(methods))
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.8 * rows), squeeze=False)
    base_h = torch.tensor(geo["unsteered"]["pca_harmful"])
    base_l = torch.tensor(geo["unsteered"]["pca_harmless"])
    mh, ml = geo["pca_means"]["harmful"], geo["pca_means"]["harmless"]
    ev = geo["pca_explained_variance"]
    for ax, m in zip(axes.flat, methods):
        ax.scatter(base_h[:, 0], base_h[:, 1], s=10, c="tab:red", alpha=0.15, lw=0)
        ax.scatter(base_l[:, 0], base_l[:, 1], s=10, c="tab:blue", alpha=0.15, lw=0)
        eh = torch.tensor(m["pca_harmful"])
        el = torch.tensor(m["pca_harmless"])
        ax.scatter(eh[:, 0], eh[:, 1], s=14, c="tab:red", marker="x", lw=1,
                   label="harmful, edited")
        ax.scatter(el[:, 0], el[:, 1], s=14, c="tab:blue", marker="+", lw=1,
                   label="harmless, edited")
        ax.scatter([mh[0]], [mh[1]], s=80, c="darkred", marker="*", label="harmful mean")
        ax.scatter([ml[0]], [ml[1]], s=80, c="navy", marker="*", label="harmless mean")
        ax.set_title(f"{m['label']}\nharmful t = {m['harmful_position']:.2f}, "
                     f"nearest harmless {m['harmful_nearest_harmless']:.0%}", fontsize=9)
        ax.set_xlabel(f"PC1 ({ev[0]:.0%})", fontsize=8)
        ax.set_ylabel(f"PC2 ({ev[1]:.0%})" if len(ev) > 1 else "PC2", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(methods):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(f"Layer {geo['layer']} input, position {geo['position']}: faded = unsteered "
                 "(PCA fitted on these)", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.95))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
