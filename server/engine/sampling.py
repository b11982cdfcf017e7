"""One step's token choice for every row of a batch, with one host transfer.

Per row b with logits ℓ_b (float32), temperature T_b, nucleus p_b and its own generator:

    T_b = 0        token = argmax ℓ_b                                   (batched over rows)
    T_b > 0        π = softmax(ℓ_b / max(T_b, 1e-4)), restricted to the smallest prefix of the
                   sorted π whose mass reaches p_b (Holtzman et al. 2020, nucleus sampling),
                   token ~ π with the row's generator (per row, so a seed gives the same
                   tokens whatever else is in the batch)

| where           | what is computed                                                           |
|-----------------|----------------------------------------------------------------------------|
| every row       | a finiteness check of ℓ_b: a row with NaN/±inf logits fails alone           |
| rows asking     | log_softmax, the chosen token's logprob, top-k (k = the largest asked)      |
| host            | one `.tolist()` of [tokens ‖ bad ‖ logprobs ‖ top-k values ‖ top-k ids]      |

A row whose logits are not finite is never sampled (multinomial would raise for it — and on CUDA
assert on the device, poisoning every row): its logits are replaced by zeros for the draw and the
row is reported as failed, so the other rows' tokens are exactly what they would be alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Draw:
    """One row's result; `error` set (and the rest meaningless) when the row cannot be sampled."""

    token: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    error: str | None = None


@dataclass
class RowSampling:
    """What `draw` needs of one row."""

    temperature: float
    top_p: float
    generator: torch.Generator | None
    top_logprobs: int | None  # None: no logprobs; 0: the chosen token's only; k: and top-k


def draw(logits: torch.Tensor, rows: list[RowSampling]) -> list[Draw]:
    """logits: [B, V], one row per entry of `rows` → one Draw per row (module docstring)."""
    logits = logits.float()
    n = len(rows)
    bad = ~torch.isfinite(logits).all(dim=-1)  # [B]
    sampled = [i for i, r in enumerate(rows) if r.temperature > 0]
    safe = torch.where(bad[:, None], torch.zeros((), dtype=logits.dtype, device=logits.device),
                       logits) if sampled else logits
    tokens = torch.argmax(safe, dim=-1)  # greedy rows keep this
    for i in sampled:
        r = rows[i]
        tokens[i] = _sample(safe[i], r.temperature, r.top_p, r.generator)
    asking = [i for i, r in enumerate(rows) if r.top_logprobs is not None]
    parts = [tokens.double(), bad.double()]
    k = max((rows[i].top_logprobs or 0 for i in asking), default=0)
    if asking:
        index = torch.tensor(asking, device=logits.device)
        lp = torch.log_softmax(logits[index], dim=-1)
        parts.append(lp.gather(1, tokens[index][:, None])[:, 0].double())
        if k:
            top = torch.topk(lp, k, dim=-1)
            parts += [top.values.double().flatten(), top.indices.double().flatten()]
    # One transfer for the whole step (token ids < 2^53 are exact in float64).
    host = torch.cat(parts).tolist()
    m = len(asking)
    chosen = host[2 * n:2 * n + m]
    top_values = host[2 * n + m:2 * n + m + m * k]
    top_ids = host[2 * n + m + m * k:]
    out = [Draw(token=int(host[i])) for i in range(n)]
    for j, i in enumerate(asking):
        out[i].logprob = chosen[j]
        want = rows[i].top_logprobs or 0
        if want:
            out[i].top_logprobs = [(int(t), v) for t, v in zip(top_ids[j * k:j * k + want],
                                                               top_values[j * k:j * k + want])]
    for i in range(n):
        if host[n + i]:
            out[i] = Draw(token=0, error="the model produced non-finite logits (NaN or inf) "
                                         "for this request")
    return out


def _sample(logits: torch.Tensor, temperature: float, top_p: float,
            generator: torch.Generator | None) -> torch.Tensor:
    """One token id (a 1-element tensor, left on the device) from one row's logits."""
    # A tiny temperature would overflow the logits to inf (then NaN): floor it (≈ greedy).
    probs = torch.softmax(logits / max(temperature, 1e-4), dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        keep = cumulative - sorted_probs < top_p
        keep[0] = True  # always the most likely token (a subnormal top_p rounds to 0 in fp32)
        sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
        choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
        return order[choice][0]
    return torch.multinomial(probs, 1, generator=generator)[0]
