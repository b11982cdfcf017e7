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
`RowInt8Linear` instead rescales every row to max |x| = 1 and appends one pin row [−1, 1, 0, …],
so the tensor's min/max — hence the quantization grid — is the same fixed [−1, 1] for every row in
every batch; the integer GEMM is exact and the row's scale is multiplied back afterwards:

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

import logging
import warnings

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
        smooth = smoothing_scales(model, tokenizer) if tokenizer is not None else None
        n = quantize_int8(model, smooth=smooth)
        log.info("int8: %d Linear layers quantized (fbgemm, per-row activations%s)", n,
                 ", SmoothQuant" if smooth else "")
    elif precision == "int4":
        _quantize_int4_torchao(model)
    return model


# ---- int8 (CPU, fbgemm) ---------------------------------------------------------------------


class RowInt8Linear(nn.Module):
    """A Linear with int8 per-channel weights and per-row int8 activations (module docstring)."""

    def __init__(self, linear: nn.Linear, smooth: torch.Tensor | None = None):
        super().__init__()
        w = linear.weight.detach().float()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        inv = None
        if smooth is not None:  # y = (W·diag(s)) · (x / s)
            w = w * smooth.float()[None]
            inv = (1.0 / smooth.float())[None]
        self.register_buffer("inv_smooth", inv, persistent=False)
        scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12).double()
        with warnings.catch_warnings():  # quantized tensors are deprecated (docs/engine.md)
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch.quantize_per_channel(w, scale, torch.zeros_like(scale, dtype=torch.long),
                                                 axis=0, dtype=torch.qint8)
        self._packed = torch.ops.quantized.linear_prepack(qweight, None)
        bias = linear.bias.detach().float().clone() if linear.bias is not None else None
        self.register_buffer("bias", bias, persistent=False)
        pin = torch.zeros(1, self.in_features)
        pin[0, 0], pin[0, 1 % self.in_features] = -1.0, 1.0
        self.register_buffer("_pin", pin, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        rows = x.reshape(-1, self.in_features).float()
        if self.inv_smooth is not None:
            rows = rows * self.inv_smooth
        amax = rows.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
        pinned = torch.cat([rows / amax, self._pin])
        y = torch.ops.quantized.linear_dynamic(pinned, self._packed, True)[:-1] * amax
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_int8(model: nn.Module, lm_head: bool = True,
                  smooth: dict[str, torch.Tensor] | None = None) -> int:
    """Replace every nn.Linear (lm_head included) with RowInt8Linear; returns how many.
    `smooth`: SmoothQuant scales by module name (`smoothing_scales`).

    A tied lm_head gets its own int8 copy; the input embedding keeps its fp32 table (a lookup
    reads one row per token, so its precision costs no time).
    """
    if not int8_available():
        raise RuntimeError("this PyTorch build has no fbgemm quantized engine (int8)")
    torch.backends.quantized.engine = "fbgemm"
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets = [(name, mod) for name, mod in model.named_modules()
               if isinstance(mod, nn.Linear) and (lm_head or mod is not out)]
    for name, mod in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, RowInt8Linear(mod, (smooth or {}).get(name)))
    config = getattr(model, "config", None)
    if lm_head and getattr(config, "tie_word_embeddings", False):
        # The tie now points at a module without `.weight`; keep transformers from re-tying.
        config.tie_word_embeddings = False
    return len(targets)


CALIBRATION_PROMPTS = 12  # per class, from the training splits (never the test split)
SMOOTH_ALPHA = 0.5


@torch.inference_mode()
def smoothing_scales(model: nn.Module, tokenizer, alpha: float = SMOOTH_ALPHA,
                     n_prompts: int = CALIBRATION_PROMPTS) -> dict[str, torch.Tensor]:
    """SmoothQuant's per-input-channel scales for every Linear, from chat-formatted prompts of
    the packaged training splits (harmless_train + harmful_train) run through the fp32 model."""
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
                a = x.reshape(-1, x.shape[-1]).abs().amax(0).float()
                amax[name] = torch.maximum(amax[name], a) if name in amax else a
            handles.append(mod.register_forward_pre_hook(hook))
    try:
        model(input_ids=enc["input_ids"].to(device), attention_mask=mask.long(),
              logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    scales = {}
    for name, mod in model.named_modules():
        if name in amax:
            w = mod.weight.detach().abs().amax(0).float().clamp_min(1e-5)
            scales[name] = (amax[name].clamp_min(1e-5) ** alpha / w ** (1 - alpha)).cpu()
    return scales


# ---- int4 (CUDA, torchao) ---------------------------------------------------------------------


def _quantize_int4_torchao(model: nn.Module) -> None:
    try:
        from torchao.quantization import Int4WeightOnlyConfig, quantize_
    except ImportError as exc:
        raise RuntimeError("precision int4 needs torchao (`pip install torchao`)") from exc
    quantize_(model, Int4WeightOnlyConfig(group_size=128))
