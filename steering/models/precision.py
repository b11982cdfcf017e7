"""Weight precision, chosen once at start-up: fp32, bf16, fp16, int8 (and int4 where it pays).

    precision  weights (Linear)            activations in the matmul     kernel
    ---------  --------------------------  ----------------------------  --------------------------
    fp32       fp32                        fp32                          MKL / cuBLAS
    bf16/fp16  bf16 / fp16 (whole model)   bf16 / fp16                   cuBLAS (CPU: slow, no AVX512)
    int8       int8, per output channel    int8, per row (token)         fbgemm `linear_dynamic`
    int4       int4 weight-only (torchao)  bf16                          CUDA only (see docs)

`auto`: bf16 on CUDA, int8 on CPU (measured in docs/engine.md, quality in docs/precision.md).
The steering kernel never runs in these precisions: the hooks upcast the residual stream to fp32,
edit it, and cast back (steering.interventions.hooks).

int8 on CPU is PyTorch's own fbgemm dynamic-quantized linear (`torch.ops.quantized.linear_dynamic`,
the op behind `torch.ao.nn.quantized.dynamic.Linear`) with one change that makes it *per row*.
The stock module picks one activation scale for the whole input tensor (min/max over all rows),
so a row's result would depend on the other rows in the batch: steered rows next to an unsteered
one, or a long prompt's outlier token, would change each other's rounding — mixed batch ≠ solo.
`RowInt8Linear` instead rescales every row to max |x| = 1 and quantizes it on one fixed grid —
the 7-bit grid on [−1, 1] (scale 2/127, zero point 64, what fbgemm's dynamic path picks for a
tensor whose min/max are −1 and 1) — through fbgemm's linear that takes the input's scale
instead of measuring it (`linear_with_input_q_dq_qweight_dq_output_fp32`). The integer GEMM is
exact and the row's scale is multiplied back afterwards:

    y_b = a_b · W_q · q(x_b / a_b) + bias          a_b = max_i |x_b,i|,  q: 7-bit grid on [−1, 1]

That is per-token activation quantization (as in LLM.int8()/SmoothQuant's per-token variant,
Dettmers et al. 2022 §3; Xiao et al. 2023 §4) with per-channel symmetric weights — and each row's
output is bit-identical whatever else is in the batch.

Outlier channels (a few input channels carry activations 10–100× the rest) waste the row's grid,
so before quantizing we migrate part of their range into the weights — SmoothQuant (Xiao et al.
2023, eq. 4), computed once from a few chat-formatted *training* prompts at load:

    s_j = max|X_j|^α / max|W_:,j|^(1−α)   (α = 0.5)        y = (W·diag(s)) · (x / s)

Measured on the embedded model (WikiText, 768 tokens, KL to fp32 per token): per-row int8 0.064
nats, with smoothing 0.039 (perplexity +4.3% → +0.4%).
"""

from __future__ import annotations

import ctypes
import gc
import logging
import warnings
from collections.abc import Callable

import torch
from torch import nn

from steering.models import DTYPE_ALIASES, PRECISIONS

log = logging.getLogger(__name__)

FLOAT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str | None, device: torch.device) -> str:
    """`auto` → bf16 on CUDA (fp16 where bf16 is missing), int8 on CPU."""
    p = (precision or "auto").lower()
    p = DTYPE_ALIASES.get(p, p)
    if p not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if p == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "int8" if int8_available() else "fp32"
    if p == "int8" and device.type != "cpu":
        raise ValueError("precision int8 is the CPU's fbgemm kernel; on CUDA use bf16 or int4")
    if p == "int4" and device.type != "cuda":
        raise ValueError("precision int4 has no fast kernel on this CPU (AVX2, no AVX512/AMX: "
                         "measured slower than fp32, see docs/engine.md); use int8")
    return p


def load_dtype(precision: str) -> torch.dtype:
    """The dtype the checkpoint is loaded in before any quantization."""
    if precision == "int4":
        return torch.bfloat16
    return FLOAT_DTYPES.get(precision, torch.float32)


def int8_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines


def apply_precision(model: nn.Module, precision: str, tokenizer=None) -> nn.Module:
    """Quantize `model` in place for an integer precision (float precisions are load dtypes).
    With a `tokenizer`, int8 is calibrated for SmoothQuant on a few training prompts."""
    if precision == "int8":
        ranges = activation_ranges(model, tokenizer) if tokenizer is not None else None
        n = quantize_int8(model, act_ranges=ranges)
        half_embedding_table(model)
        log.info("int8: %d Linear layers quantized (fbgemm, per-row activations%s)", n,
                 ", SmoothQuant" if ranges else "")
        _own_memory(model)
    elif precision == "int4":
        _quantize_int4_torchao(model)
    return model


def _own_memory(model: nn.Module) -> None:
    """Copy what stays in float (embedding, norms) out of the checkpoint's memory map, so the
    map — 4 bytes per parameter of the fp32 file — is released once the Linears are int8."""
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()
        for mod in model.modules():
            for name, buf in list(mod.named_buffers(recurse=False)):
                if buf is not None:
                    setattr(mod, name, buf.clone())
    release_memory()


def release_memory() -> None:
    """Collect, then hand the conversion's freed heap back to the OS (glibc keeps it otherwise)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


# ---- int8 (CPU, fbgemm) ---------------------------------------------------------------------


class HalfTableEmbedding(nn.Embedding):
    """An embedding whose table is stored in fp16 and whose rows come out fp32: the residual
    stream stays fp32, the table takes half the memory (the embedded model's 151,936 × 896 table:
    545 → 272 MB, a quarter of the int8 model's RSS). The lookup is the only use of the table
    (the int8 lm_head has its own copy), and fp16 keeps 11 significant bits: on the embedded
    model 97.9% of the values are exact in fp16 and the largest error is 2·10⁻⁴ of the largest
    value — far inside the int8 matmuls' own rounding (docs/engine.md)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids).float()


def half_embedding_table(model: nn.Module) -> None:
    """Swap the input embedding for a HalfTableEmbedding (int8 precision; works on meta too)."""
    emb = model.get_input_embeddings()
    if isinstance(emb, HalfTableEmbedding) or emb.weight.dtype != torch.float32:
        return
    half = HalfTableEmbedding(emb.num_embeddings, emb.embedding_dim, emb.padding_idx,
                              device=emb.weight.device, dtype=torch.float16)
    with torch.no_grad():
        if not emb.weight.is_meta:
            half.weight.copy_(emb.weight)
    half.requires_grad_(False)
    model.set_input_embeddings(half)


# The 7-bit activation grid on [−1, 1]: bit-identical to `linear_dynamic(…, reduce_range=True)` on
# a tensor pinned to min −1 / max 1 (checked in tests/steering/test_precision.py), without the pin row and
# without measuring the range each call.
_GRID_SCALE, _GRID_ZERO_POINT = 2.0 / 127, 64
_int8_linear = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32


class RowInt8Linear(nn.Module):
    """A Linear with int8 per-channel weights and per-row int8 activations (module docstring).
    `smooth`: SmoothQuant's per-input-channel scales s (y = (W·diag(s)) · (x / s))."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 smooth: torch.Tensor | None = None):
        super().__init__()
        w = weight.detach().float()
        inv = None
        if smooth is not None:
            w = w * smooth.float()[None]
            inv = (1.0 / smooth.float())[None]
        scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12).double()
        with warnings.catch_warnings():  # quantized tensors are deprecated (docs/engine.md)
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch.quantize_per_channel(w, scale, torch.zeros_like(scale, dtype=torch.long),
                                                 axis=0, dtype=torch.qint8)
        self._setup(qweight, bias, inv)

    def _setup(self, qweight: torch.Tensor, bias: torch.Tensor | None,
               inv_smooth: torch.Tensor | None) -> None:
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("inv_smooth", inv_smooth, persistent=False)
        self._packed = torch.ops.quantized.linear_prepack(qweight, None)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone(),
                             persistent=False)

    @classmethod
    def from_int8(cls, int8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                  inv_smooth: torch.Tensor | None = None) -> RowInt8Linear:
        """Rebuild from `int8_state` (the cached form: no float weight is ever materialized)."""
        mod = cls.__new__(cls)
        nn.Module.__init__(mod)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch._make_per_channel_quantized_tensor(
                int8, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0)
        mod._setup(qweight, bias, inv_smooth)
        return mod

    def int8_state(self) -> dict[str, torch.Tensor]:
        """The int8 weight, its per-channel scales, bias and 1/s: what `from_int8` takes."""
        qweight, _ = torch.ops.quantized.linear_unpack(self._packed)
        state = {"int8": qweight.int_repr(), "scale": qweight.q_per_channel_scales().double()}
        if self.bias is not None:
            state["bias"] = self.bias
        if self.inv_smooth is not None:
            state["inv_smooth"] = self.inv_smooth
        return state

    @classmethod
    def from_linear(cls, linear: nn.Linear, smooth: torch.Tensor | None = None) -> RowInt8Linear:
        return cls(linear.weight, linear.bias, smooth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        rows = x if dtype == torch.float32 else x.float()  # [..., in]: any leading shape
        if self.inv_smooth is not None:
            rows = rows * self.inv_smooth
        # a_b = max_i |x_b,i| (abs + amax: exact, and 3-5x faster here than the ∞-norm kernel),
        # then x_b / a_b on the fixed grid.
        amax = rows.abs().amax(dim=-1, keepdim=True).clamp_min_(1e-12)
        y = _int8_linear(rows / amax, _GRID_SCALE, _GRID_ZERO_POINT, self._packed).mul_(amax)
        if self.bias is not None:
            y = y.add_(self.bias)
        return y if dtype == torch.float32 else y.to(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class SharedInputInt8(nn.Module):
    """Sibling Linears that read the same input (q/k/v, gate/up) as one int8 matmul.

    Each sibling becomes an `Int8Slice` of the fused output; the first sibling called with a
    tensor computes the fused product, the others called with *the same tensor object* reuse it.
    Per output element the arithmetic is the unfused one (same row grid, same integer dot
    product), so fusing changes no result — only the number of kernel calls (7 → 4 per layer).
    """

    def __init__(self, linear: RowInt8Linear, n: int):
        super().__init__()
        self.linear = linear  # the siblings' weights stacked along the output axis
        self.n = n
        self._x: torch.Tensor | None = None
        self._y: torch.Tensor | None = None
        self._left = 0

    def output(self, x: torch.Tensor) -> torch.Tensor:
        if self._left > 0 and x is self._x:
            self._left -= 1
            y = self._y
        else:
            y = self.linear(x)
            self._left = self.n - 1
        self._x, self._y = (x, y) if self._left > 0 else (None, None)
        return y


class Int8Slice(nn.Module):
    def __init__(self, group: SharedInputInt8, start: int, end: int):
        super().__init__()
        self.group = group
        self.start, self.end = start, end
        self.in_features, self.out_features = group.linear.in_features, end - start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.output(x)[..., self.start:self.end]  # a view: consumers reshape it


# Siblings that read one input, by architecture family (llama, qwen2/3, mistral, gemma, phi3 …).
FUSE_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _smooth(act: torch.Tensor | None, weights: list[torch.Tensor],
            alpha: float) -> torch.Tensor | None:
    """SmoothQuant eq. 4: s_j = max|X_j|^α / max|W_:,j|^(1−α) over the (fused) weight."""
    if act is None:
        return None
    w = torch.cat([x.detach().abs().float() for x in weights]).amax(0).clamp_min(1e-5)
    return act.clamp_min(1e-5) ** alpha / w ** (1 - alpha)


Int8Builder = Callable[[str, list[nn.Linear]], RowInt8Linear]


def quantize_int8(model: nn.Module, lm_head: bool = True,
                  act_ranges: dict[str, torch.Tensor] | None = None,
                  alpha: float = 0.5, fuse: bool = True, build: Int8Builder | None = None) -> int:
    """Replace every nn.Linear (lm_head included) with int8 (RowInt8Linear, or slices of a
    SharedInputInt8 for q/k/v and gate/up); returns how many Linears were replaced.
    `act_ranges`: per-input-channel max |x| by module name (`activation_ranges`) → SmoothQuant.
    `build(name, linears)`: makes the int8 module for the Linear(s) `name` (the first sibling's
    name when fused) — by default quantized from their weights; the int8 cache passes one that
    reads stored int8 tensors instead (then the model may live on the meta device).

    A tied lm_head gets its own int8 copy; the input embedding keeps its fp32 table (a lookup
    reads one row per token, so its precision costs no time).
    """
    if not int8_available():
        raise RuntimeError("this PyTorch build has no fbgemm quantized engine (int8)")
    torch.backends.quantized.engine = "fbgemm"
    ranges = act_ranges or {}

    def from_weights(name: str, linears: list[nn.Linear]) -> RowInt8Linear:
        if len(linears) == 1:
            weight, bias = linears[0].weight.detach(), linears[0].bias
            return RowInt8Linear(weight, bias, _smooth(ranges.get(name), [weight], alpha))
        weight = torch.cat([m.weight.detach() for m in linears])
        bias = None
        if any(m.bias is not None for m in linears):
            bias = torch.cat([m.bias.detach() if m.bias is not None else
                              torch.zeros(m.out_features, dtype=m.weight.dtype) for m in linears])
        return RowInt8Linear(weight, bias, _smooth(ranges.get(name), [weight], alpha))

    build = build or from_weights
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets = {name: mod for name, mod in model.named_modules()
               if isinstance(mod, nn.Linear) and (lm_head or mod is not out)}
    done: set[str] = set()
    for name, mod in targets.items():
        if name in done:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        prefix = f"{parent_name}." if parent_name else ""
        group = next((g for g in FUSE_GROUPS if child in g), None) if fuse else None
        members = [c for c in group if f"{prefix}{c}" in targets] if group else []
        if len(members) > 1 and len({targets[f"{prefix}{c}"].in_features
                                     for c in members}) == 1:
            linears = [targets[f"{prefix}{c}"] for c in members]
            fused = SharedInputInt8(build(name, linears), len(linears))
            start = 0
            for c, m in zip(members, linears, strict=True):
                setattr(parent, c, Int8Slice(fused, start, start + m.out_features))
                start += m.out_features
                done.add(f"{prefix}{c}")
            continue
        setattr(parent, child, build(name, [mod]))
        done.add(name)
    config = getattr(model, "config", None)
    if lm_head and getattr(config, "tie_word_embeddings", False):
        # The tie now points at a module without `.weight`; keep transformers from re-tying.
        config.tie_word_embeddings = False
    return len(targets)


def int8_modules(model: nn.Module) -> dict[str, RowInt8Linear]:
    """Each int8 module by the name `quantize_int8` built it under (a fused group's int8 Linear
    sits at `<first sibling>.group.linear`)."""
    return {name.removesuffix(".group.linear"): mod for name, mod in model.named_modules()
            if isinstance(mod, RowInt8Linear)}


CALIBRATION_PROMPTS = 12  # per class, from the training splits (never the test split)
SMOOTH_ALPHA = 0.5


@torch.inference_mode()
def activation_ranges(model: nn.Module, tokenizer,
                      n_prompts: int = CALIBRATION_PROMPTS) -> dict[str, torch.Tensor]:
    """Per-input-channel max |x| of every Linear's input over chat-formatted prompts from the
    packaged training splits (harmless_train + harmful_train), run through the model as loaded."""
    from steering.data.prompts import load_instructions
    from steering.models.chat import format_chat

    prompts = (load_instructions("harmless_train")[:n_prompts]
               + load_instructions("harmful_train")[:n_prompts])
    texts = [format_chat(tokenizer, p) for p in prompts]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    device = next(model.parameters()).device
    mask = enc["attention_mask"].to(device).bool()
    amax: dict[str, torch.Tensor] = {}
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            def hook(mod, args, name=name):
                x = args[0][mask] if args[0].shape[:2] == mask.shape else args[0]
                a = x.reshape(-1, x.shape[-1]).abs().amax(0).float().cpu()
                amax[name] = torch.maximum(amax[name], a) if name in amax else a
            handles.append(mod.register_forward_pre_hook(hook))
    try:
        model(input_ids=enc["input_ids"].to(device), attention_mask=mask.long(),
              logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    return amax


# ---- int4 (CUDA, torchao) ---------------------------------------------------------------------


def _quantize_int4_torchao(model: nn.Module) -> None:
    try:
        from torchao.quantization import Int4WeightOnlyConfig, quantize_
    except ImportError as exc:
        raise RuntimeError("precision int4 needs torchao (`pip install torchao`)") from exc
    quantize_(model, Int4WeightOnlyConfig(group_size=128))
