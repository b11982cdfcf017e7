"""Inspect a pack's direction on one prompt: where along the layers and tokens the stream sits on
its axis, what the direction says through the unembedding, and how it relates to the other
layers' directions.

- **Heatmap** (`scores`, [layers, tokens]): the residual entering every block at every token of
  the prompt (and a given completion) on that layer's DiM axis, normalised as conditions and
  monitors normalise it — (h − μ⁻_l)·r_l / ‖r_l‖² with r_l = μ⁺_l − μ⁻_l at the pack's read
  position, so 0 is the harmless class mean and 1 the harmful one at every layer (Arditi et al.
  2024 eq. 1; Lee et al. 2024). The stream is read unsteered.
- **Logit lens** of the direction (nostalgebraist 2020, "interpreting GPT: the logit lens"): the
  unit direction r̂ at the pack's layer through the final norm and the unembedding, W_U·norm(r̂);
  the tokens with the highest logits are those its addition promotes, the lowest those it
  suppresses (Arditi et al. 2024 §3 read their refusal direction this way).
- **Cosines** of the pack's direction with the DiM direction of every layer (the same read
  position): how much of one direction the others share.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from steering.interventions.capture import Prompt, encode
from steering.interventions.monitors import _LayerPlan, monitor_of, residual_stream
from steering.models.loading import LoadedModel
from steering.packs.format import SteeringPack


@dataclass
class Inspection:
    pack: str
    layer: int  # the layer whose direction the lens and the cosines use
    position: int  # the pack's read position
    token_ids: list[int]
    tokens: list[str]
    prompt_tokens: int  # the first `prompt_tokens` tokens are the prompt, the rest the completion
    scores: torch.Tensor  # float64 [n_layers, tokens]
    promoted: list[tuple[str, int, float]]  # (token, id, logit), highest first
    suppressed: list[tuple[str, int, float]]  # lowest first
    cosine: list[float]  # per layer, with the direction at `layer`

    def to_dict(self, digits: int = 4) -> dict:
        def lens(items):
            return [{"token": t, "id": i, "logit": round(v, digits)} for t, i, v in items]

        return {"pack": self.pack, "layer": self.layer, "position": self.position,
                "tokens": self.tokens, "token_ids": self.token_ids,
                "prompt_tokens": self.prompt_tokens,
                "layers": list(range(self.scores.shape[0])),
                "scores": [[round(float(x), digits) for x in row] for row in self.scores],
                "logit_lens": {"promoted": lens(self.promoted),
                               "suppressed": lens(self.suppressed)},
                "cosine": [round(c, digits) for c in self.cosine]}


def layer_axes(pack: SteeringPack) -> list[_LayerPlan]:
    """Every layer's DiM axis at the pack's read position."""
    return [_LayerPlan.of([monitor_of(pack, layer)], torch.device("cpu"))
            for layer in range(pack.n_layers)]


@torch.inference_mode()
def logit_lens(lm: LoadedModel, direction: torch.Tensor, top_k: int = 10
               ) -> tuple[list[tuple[str, int, float]], list[tuple[str, int, float]]]:
    """(promoted, suppressed): the `top_k` tokens with the highest and the lowest logits of the
    unit direction through the final norm and the unembedding."""
    unit = direction.float() / direction.float().norm().clamp_min(1e-12)
    x = unit.to(device=lm.device, dtype=lm.dtype)[None, None]
    logits = lm.model.get_output_embeddings()(lm.layout.final_norm(x))[0, 0].float().cpu()
    vocab = len(lm.tokenizer)
    logits = logits[:vocab]  # padded vocabularies: rows past the tokenizer are no tokens
    k = min(top_k, logits.shape[0])

    def items(values: torch.Tensor, index: torch.Tensor) -> list[tuple[str, int, float]]:
        return [(lm.tokenizer.decode([int(i)]), int(i), float(v)) for v, i in zip(values, index)]

    hi, lo = logits.topk(k), (-logits).topk(k)
    return items(hi.values, hi.indices), items(-lo.values, lo.indices)


def cosines(pack: SteeringPack, layer: int) -> list[float]:
    """cos(r_layer, r_l) for every layer l (0 where a direction is zero)."""
    p = pack.positions.index(pack.position)
    r = (pack.mean_harmful[:, p] - pack.mean_harmless[:, p]).double()  # [L, d]
    unit = r / r.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    return (unit @ unit[layer]).tolist()


def inspect_pack(lm: LoadedModel, pack: SteeringPack, prompt: Prompt,
                 completion: str | None = None, chat: bool = True, layer: int | None = None,
                 top_k: int = 10) -> Inspection:
    """The heatmap, logit lens and cosines of `pack` on `prompt` (+ `completion`, module
    docstring). `layer`: the direction the lens and cosines use (default: the pack's)."""
    ids = encode(lm, prompt, chat)
    n_prompt = len(ids)
    if completion:
        ids = ids + list(lm.tokenizer(completion, add_special_tokens=False)["input_ids"])
    return inspect_ids(lm, pack, ids, n_prompt, layer, top_k)


def inspect_ids(lm: LoadedModel, pack: SteeringPack, ids: list[int], n_prompt: int,
                layer: int | None = None, top_k: int = 10) -> Inspection:
    """`inspect_pack` on token ids whose first `n_prompt` are the prompt."""
    layer = pack.layer if layer is None else layer
    if not 0 <= layer < pack.n_layers:
        raise ValueError(f"layer must be between 0 and {pack.n_layers - 1}, got {layer}")
    stream = residual_stream(lm, ids)  # [L, T, d]
    scores = torch.stack([axis.score(stream[i])[:, 0] for i, axis in enumerate(layer_axes(pack))])
    promoted, suppressed = logit_lens(lm, pack.dim(layer), top_k)
    tokens = [lm.tokenizer.decode([t]) for t in ids]
    return Inspection(pack.name, layer, pack.position, ids, tokens, n_prompt, scores, promoted,
                      suppressed, cosines(pack, layer))
