"""Which reference point should the one-sided INLP edits use? Measured on validation data.

    .venv/bin/python bench/inlp_reference.py [--out docs/report/inlp_reference.json]

The pack's INLP directions Q (oriented toward harmful) come from activations at one template
position; the kernel edits every position with one reference c. Three choices for the one-sided
flip (AlterRep: h' = h − 2·Q·relu(Qᵀ(h − c))), same Q, same single site (the pack's default INLP
layer), at the k values of `--ks`:

- `midpoint` (the product's `inlp_flip` until 2026-12-02 and again since the names were fixed):
  c = Q·b, b the class boundary (midpoint of the class means) at the selected position, applied
  at every position;
- `reference-free`: c = 0, the bias-free projection of the INLP authors' code (Ravfogel et al.
  2020 project with P = I − QQᵀ, no offset), made one-sided on z = Qᵀh (shipped as
  `inlp_null`/`inlp_flip` from 2026-12-02; now the project's variants `inlp_zero_positive` /
  `inlp_negate_positive`);
- `position-aware`: at each post-instruction template position p, c_p = Q·Qᵀ·m_p with m_p the
  midpoint of the pack's class means at that position; positions where no class means exist
  (the instruction, generated tokens, plain text) are left alone.

Then the product's own flip (`build_row`) at every INLP layer of the pack
(`steering.layers`), to compare one site with several.

For each: refusal on harmful_val (the split selection uses; never the test split) and on a
harmless_val slice disjoint from both selection and the report's evaluation slice, on greedy
completions (substring matcher), WikiText-2 perplexity, and the share of WikiText token
positions the edit moves at all (some z > 0). One JSON file; `steer report` shows it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HARMFUL = "harmful_val"
HARMLESS = "harmless_val[200:220]"
VARIANTS = ("midpoint", "reference-free", "position-aware")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/report/inlp_reference.json")
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--ks", default="2,max", help="flip k values (max: the pack's)")
    parser.add_argument("--precision", default="fp32",
                        help="weights (the steering arithmetic is fp32 either way)")
    parser.add_argument("--n-general", type=int, default=4)
    parser.add_argument("--general-tokens", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--only", choices=("references", "sites"), default=None,
                        help="run one part (the other part's rows are kept from --out)")
    args = parser.parse_args(argv)

    import torch

    from steering import SteeringSpec, build_row, load_model
    from steering.data.prompts import load_general_text, load_instructions, prompts_hash
    from steering.evaluation.metrics import perplexity, rate_record
    from steering.evaluation.passes import decode, generate_greedy, sequence_nll
    from steering.extraction.store import ensure_pack

    t_start = time.perf_counter()
    lm = load_model("embedded", device="cpu", precision=args.precision)
    pack = ensure_pack(lm)
    layer = pack.inlp_default_layers[0]
    inl = pack.inlp[layer]
    k_max = inl.count
    n_pos = len(pack.positions)
    harmful = load_instructions(HARMFUL)
    harmless = load_instructions(HARMLESS)
    general = [lm.tokenizer(t, add_special_tokens=True)["input_ids"][: args.general_tokens]
               for t in load_general_text(args.n_general)]
    midpoints = (pack.mean_harmful[layer] + pack.mean_harmless[layer]) / 2  # [P, d]

    state: dict = {"edit": None, "chat": False}

    def reference(variant: str, q: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
        if variant == "midpoint":
            return q @ b  # [d]
        if variant == "reference-free":
            return torch.zeros(q.shape[0])
        return (midpoints @ q) @ q.T  # [P, d]: Q·Qᵀ·m_p per template position

    def hook(module, hargs, kwargs):
        edit = state["edit"]
        if edit is None:
            return None
        h = hargs[0] if hargs else kwargs["hidden_states"]
        q, c, alpha, per_position = edit
        if per_position:
            if not state["chat"] or h.shape[1] < n_pos:  # decode steps and plain text: untouched
                return None
            out = h.clone()
            tail = h[:, -n_pos:, :]
            z = torch.einsum("bpd,dk->bpk", tail - c[None], q).clamp_min(0)
            out[:, -n_pos:, :] = tail - alpha * z @ q.T
        else:
            z = ((h - c) @ q).clamp_min(0)
            out = h - alpha * z @ q.T
        if hargs:
            return (out, *hargs[1:]), kwargs
        kwargs["hidden_states"] = out
        return hargs, kwargs

    handle = lm.layout.blocks[layer].register_forward_pre_hook(hook, with_kwargs=True)

    # WikiText activations at the edited layer's input, to count the positions each edit moves.
    captured: list = []

    def capture(module, hargs, kwargs):
        captured.append((hargs[0] if hargs else kwargs["hidden_states"])[0].float())

    cap = lm.layout.blocks[layer].register_forward_pre_hook(capture, with_kwargs=True)
    with torch.inference_mode():
        for ids in general:
            lm.model(input_ids=torch.tensor([ids]), use_cache=False, logits_to_keep=1)
    cap.remove()
    general_h = torch.cat(captured)  # [tokens, d]

    def run(edit, row=None) -> dict:
        state["edit"] = edit
        t0 = time.perf_counter()
        state["chat"] = True
        comps, _ = generate_greedy(lm, harmful + harmless, row, args.max_new_tokens,
                                   args.batch_size)
        texts = decode(lm, comps)
        state["chat"] = False
        nll, n = sequence_nll(lm, general, [len(g) - 1 for g in general], row,
                              batch_size=args.batch_size)
        out = {**rate_record("harmful", texts[: len(harmful)]),
               **rate_record("harmless", texts[len(harmful):]), "ppl_general": perplexity(nll, n)}
        if edit is not None:
            q, c, _, per_position = edit
            out["general_positions_moved"] = 0.0 if per_position else float(
                (((general_h - c) @ q) > 0).any(-1).double().mean())
        out["seconds"] = round(time.perf_counter() - t0, 1)
        state["edit"] = None
        print(json.dumps({k: v for k, v in out.items() if not k.endswith("_ci")}), flush=True)
        return out

    previous = json.loads(Path(args.out).read_text()) if args.only and Path(args.out).is_file() \
        else {}
    rows = [{"variant": "unsteered", **run(None)}]
    ks = sorted({k_max if k == "max" else int(k) for k in args.ks.split(",")}
                & set(range(1, k_max + 1)))
    if args.only == "sites":
        rows += [r for r in previous.get("rows", []) if r["variant"] in VARIANTS]
    for variant in VARIANTS if args.only != "sites" else ():
        for method, alpha, k_values in (("inlp_flip", 2.0, ks),):
            for k in k_values:
                q = inl.directions[:k].T.contiguous().float()
                c = reference(variant, q, inl.boundary[:k].float())
                print(f"{variant} {method} k={k}", flush=True)
                rows.append({"variant": variant, "method": method, "k": k,
                             **run((q, c, alpha, variant == "position-aware"))})
    if args.only != "references":
        every = tuple(pack.inlp_layers)
        k_all = min(pack.inlp[x].count for x in every)
        specs = [SteeringSpec("inlp_flip", 1.0, k_all, every)]
        for spec in specs:
            print(f"sites: {spec}", flush=True)
            row = build_row(spec, pack)
            rows.append({"variant": "sites", "method": spec.method, "k": spec.k,
                         "layers": list(row.spec.layers), **run(None, row)})
    else:
        rows += [r for r in previous.get("rows", []) if r["variant"] == "sites"]
    handle.remove()
    result = {
        "what": "one-sided INLP edits with three reference points, validation data",
        "layer": layer, "position": pack.position, "template_positions": n_pos, "k_max": k_max,
        "pack_created": pack.meta.get("created"),
        "harmful": {"source": HARMFUL, "n": len(harmful), "sha256": prompts_hash(harmful)},
        "harmless": {"source": HARMLESS, "n": len(harmless), "sha256": prompts_hash(harmless)},
        "general_text": {"n": len(general), "tokens": sum(len(g) - 1 for g in general)},
        "max_new_tokens": args.max_new_tokens, "precision": args.precision,
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "seconds": round(time.perf_counter() - t_start, 1),
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({"out": args.out, "seconds": result["seconds"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
