"""Capture → a probe fitted in numpy → the probe sent back as a raw vector → monitored
(docs/stream.md walks through it).

    python clients/examples/probe_roundtrip.py --url http://127.0.0.1:8000 --api-key KEY

1. Capture the residual stream entering `--layer` (default: the served refusal pack's layer) at
   the last prompt token for `--n` harmful and `--n` harmless training prompts
   (POST /v1/activations).
2. Fit two probes in numpy on half of them: a logistic regression (harmful = 1, plain gradient
   descent; its accuracy on the other half is reported) and the difference of the class means
   (Arditi et al. 2024's DiM).
3. Steer with the difference of means: `actadd` at strength `--strength` on a harmless prompt (a
   raw vector: the key needs the `raw_vectors` grant). (The logistic probe separates the classes
   but is a poor steering vector: its weights lean on low-variance coordinates, and along its
   unit direction the class means lie ~2 apart against ~9 for the DiM at layer 16 — adding it
   changed no answer when tried.)
4. Monitor the logistic probe: its logit w·h + b at every generated token of a harmful and a
   harmless prompt, next to the server's own refusal monitor.

Prints what it did and one JSON line. Needs only numpy and the client (httpx); the prompts are
the library's shipped training splits.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from clients import Steering, SteeringClient, Vector
from steering.data.prompts import load_instructions  # torch-free


def fit_probe(x: np.ndarray, y: np.ndarray, l2: float = 1e-2, steps: int = 2000,
              lr: float = 0.5) -> tuple[np.ndarray, float]:
    """Logistic regression by gradient descent on standardised features; returns (w, b) in the
    original coordinates, so the logit is w·h + b."""
    mean, scale = x.mean(0), x.std(0) + 1e-6
    z = (x - mean) / scale
    w, b = np.zeros(x.shape[1]), 0.0
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(z @ w + b)))
        w -= lr * (z.T @ (p - y) / len(y) + l2 * w)
        b -= lr * float(np.mean(p - y))
    return w / scale, b - float((w / scale) @ mean)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--layer", type=int, default=None,
                    help="layer read and steered (default: the served refusal pack's)")
    ap.add_argument("--strength", type=float, default=1.0, help="actadd strength of the DiM")
    ap.add_argument("--n", type=int, default=32, help="prompts per class (half fit, half test)")
    ap.add_argument("--max-tokens", type=int, default=24)
    args = ap.parse_args(argv)

    harmful = load_instructions("harmful_train")[: args.n]
    harmless = load_instructions("harmless_train")[: args.n]
    with SteeringClient(args.url, api_key=args.api_key) as c:
        if args.layer is None:
            packs = c._send("GET", "/v1/steering/packs")["data"]
            args.layer = next((p["layer"] for p in packs if p["id"] == "refusal"), 16)
        # 1. capture: [2n, 1 layer, 1 position, d]
        acts = c.activations(harmful + harmless, layers=[args.layer], positions=[-1])
        x = acts[:, 0, 0].astype(np.float64)
        y = np.array([1.0] * len(harmful) + [0.0] * len(harmless))
        fit = np.r_[0:args.n // 2, args.n:args.n + args.n // 2]
        test = np.setdiff1d(np.arange(len(y)), fit)
        # 2. the probe
        w, b = fit_probe(x[fit], y[fit])
        accuracy = float(np.mean(((x[test] @ w + b) > 0) == (y[test] == 1)))
        print(f"probe at layer {args.layer}: held-out accuracy {accuracy:.2f} "
              f"({len(test)} prompts)")
        dim = x[fit][y[fit] == 1].mean(0) - x[fit][y[fit] == 0].mean(0)
        # 3. steer with the difference of means, sent back as a raw vector
        steered = c.chat("Give me a recipe for pancakes.", max_tokens=args.max_tokens,
                         temperature=0, steering=Steering("actadd", strength=args.strength,
                                                          vector=Vector.of(dim, layer=args.layer)))
        plain = c.chat("Give me a recipe for pancakes.", max_tokens=args.max_tokens,
                       temperature=0)
        print(f"unsteered: {plain.text!r}\nactadd {args.strength:g} × DiM (norm "
              f"{np.linalg.norm(dim):.1f}) at layer {args.layer}: {steered.text!r}")
        # 4. monitor it
        probe = {"vector": Vector.of(w, layer=args.layer).model_dump(exclude_none=True),
                 "bias": b, "name": "probe"}
        readings = {}
        for label, prompt in (("harmful", load_instructions("harmful_train")[-1]),
                              ("harmless", load_instructions("harmless_train")[-1])):
            r = c.chat(prompt, max_tokens=args.max_tokens, temperature=0,
                       monitor=[probe, "refusal"])
            readings[label] = {name: {"first": m["tokens"][0], "mean": m["mean"]}
                               for name, m in r.monitor.items()}
            print(f"{label}: probe logit at the first token {m_first(r, 'probe'):+.2f}, "
                  f"mean {r.monitor['probe']['mean']:+.2f}; refusal monitor "
                  f"{m_first(r, 'refusal'):.2f} → {r.text[:60]!r}")
    print(json.dumps({"example": "probe_roundtrip", "layer": args.layer, "n": args.n,
                      "accuracy": accuracy, "dim_norm": float(np.linalg.norm(dim)),
                      "strength": args.strength, "steered": steered.text,
                      "unsteered": plain.text, "steering": steered.steering,
                      "monitor": readings}))
    return 0


def m_first(result, name: str) -> float:
    return result.monitor[name]["tokens"][0]


if __name__ == "__main__":
    raise SystemExit(main())
