"""The report's plots: refusal per setting (three-way rates) and the INLP leading-k sweep.

Each function returns PNG bytes (matplotlib, Agg backend); the geometry plot is
`steering.evaluation.geometry.plot_geometry`.
"""

from __future__ import annotations

from steering.reports.claims import find, one_site, refusal


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    _plt().close(fig)
    return buf.getvalue()


def plot_ksweep(result: dict) -> bytes | None:
    """Refusal rate and perplexities against k for inlp_null and inlp_flip."""
    res = result["results"]
    base = result["baseline"]
    series = {m: sorted([r for r in res if r["method"] == m and one_site(r)],
                        key=lambda r: r["k"])
              for m in ("inlp_null", "inlp_flip", "inlp_zero_positive", "inlp_negate_positive")}
    if not any(series.values()):
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = (("harmful refusal", "harmful refusal rate"),
              ("ppl_completions", "PPL on own completions"),
              ("ppl_general", "PPL on WikiText"))
    abl = find(res, "ablate", 1.0)

    def value(r: dict, key: str) -> float:
        if key == "harmful refusal":
            kn = refusal(r, "harmful")
            return kn[0] / kn[1] if kn and kn[1] else float("nan")
        return r[key]

    for ax, (key, title) in zip(axes, panels):
        for method, rows in series.items():
            if rows:
                ax.plot([r["k"] for r in rows], [value(r, key) for r in rows], marker="o",
                        label=method)
        ax.axhline(value(base, key), color="grey", ls="--", lw=1, label="unsteered")
        if abl:
            ax.axhline(value(abl, key), color="black", ls=":", lw=1, label="DiM ablation")
        ax.set_xlabel("k (leading INLP directions)")
        ax.set_title(title, fontsize=10)
        ks = sorted({r["k"] for rows in series.values() for r in rows})
        ax.set_xticks(ks)
    axes[0].set_ylim(-0.05, 1.05)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def plot_methods(result: dict) -> bytes:
    """Per setting and prompt set, the three-way rates as stacked bars (refuses, complies,
    other); the substring matcher's refusal where the three-way judge did not run."""
    plt = _plt()
    rows = [result["baseline"], *result["results"]]
    sets = [s for s in ("harmful", "harmless", "overrefusal") if s in result["prompts"]]
    fig, axes = plt.subplots(1, len(sets), figsize=(max(7, 0.5 * len(rows)) * len(sets) / 1.6,
                                                    4.2), squeeze=False)
    colours = {"refuses": "tab:red", "complies": "tab:green", "other": "tab:grey"}
    for ax, s in zip(axes[0], sets):
        x = list(range(len(rows)))
        bottom = [0.0] * len(rows)
        for label, colour in colours.items():
            vals = []
            for r in rows:
                n = r.get(f"{s}_n3")
                if n:
                    vals.append(r[f"{s}_{label}"]["count"] / n)
                elif label == "refuses":
                    vals.append(r.get(f"{s}_refusal_rate") or 0.0)
                else:
                    vals.append(0.0)
            ax.bar(x, vals, 0.7, bottom=bottom, color=colour, label=label)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_xticks(x)
        ax.set_xticklabels([r["label"] for r in rows], rotation=40, ha="right", fontsize=7)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{s} ({result['prompts'][s]['source']})", fontsize=9)
    axes[0][0].set_ylabel("share of answers (three-way judge)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)
