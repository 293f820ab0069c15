"""What llama.cpp's CPU backend does to activations before a matmul with a weight of a given type.

ggml converts the activations to the weight type's ``vec_dot_type`` before the dot products:
Q8_0 blocks of 32 for the 32-block quants (Q8_1 for Q4_1/Q5_1, the same values), Q8_K blocks of 256
for the K-quants and the IQ types but IQ4_NL, F16 for F16 weights. Emulating that rounding in torch makes the
perplexity torch predicts the one llama.cpp measures. Gradients pass straight through.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

_Q8_0 = {"Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1", "IQ4_NL"}
_Q8_K = {"Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K", "IQ4_XS",
         "IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S"}


def vec_dot_kind(weight_type: str) -> str | None:
    if weight_type in _Q8_0:
        return "Q8_0"
    if weight_type in _Q8_K:
        return "Q8_K"
    if weight_type in ("F16", "BF16"):
        return weight_type
    return None


def _q8_0(x: torch.Tensor) -> torch.Tensor:
    xb = x.reshape(*x.shape[:-1], x.shape[-1] // 32, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    d = (amax / 127.0).to(torch.float16).to(x.dtype)  # ggml stores the block scale as fp16
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    return (torch.round(xb * inv) * d).reshape(x.shape)


def _q8_k(x: torch.Tensor) -> torch.Tensor:
    xb = x.reshape(*x.shape[:-1], x.shape[-1] // 256, 256)
    peak = xb.gather(-1, xb.abs().argmax(-1, keepdim=True))  # signed value of largest magnitude
    nz = peak != 0
    iscale = torch.where(nz, -127.0 / torch.where(nz, peak, torch.ones_like(peak)), torch.zeros_like(peak))
    q = torch.round(iscale * xb).clamp(max=127)
    d = torch.where(nz, 1.0 / torch.where(nz, iscale, torch.ones_like(iscale)), torch.zeros_like(iscale))
    return (q * d).reshape(x.shape)


def quantize_activations(x: torch.Tensor, kind: str | None) -> torch.Tensor:
    """``x`` as ggml feeds it to the dot products for ``kind`` (straight-through gradient)."""
    if kind is None:
        return x
    with torch.no_grad():
        if kind == "Q8_0":
            y = _q8_0(x)
        elif kind == "Q8_K":
            y = _q8_k(x)
        elif kind == "F16":
            y = x.to(torch.float16).to(x.dtype)
        elif kind == "BF16":
            y = x.to(torch.bfloat16).to(x.dtype)
        else:
            raise ValueError(kind)
    return x + (y - x).detach() if x.requires_grad else y


class GGMLGeluTanh(torch.nn.Module):
    """GELU (tanh form) as ggml's CPU backend computes it (``GGML_GELU_FP16``): the input rounded to fp16,
    looked up in a table of fp16 results; 0 below -10, the identity above 10. Gradient of the exact GELU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        exact = F.gelu(x, approximate="tanh")
        with torch.no_grad():
            table = F.gelu(x.to(torch.float16).to(x.dtype), approximate="tanh").to(torch.float16).to(x.dtype)
            y = torch.where(x <= -10.0, torch.zeros_like(x), torch.where(x >= 10.0, x, table))
        return exact + (y - exact).detach()


def emulate_ggml_ops(model: torch.nn.Module) -> torch.nn.Module:
    """Swap, in place, the activations whose ggml CPU kernel rounds differently from torch (tanh GELU:
    Gemma's MLP) for their ggml emulation; returns ``model``."""
    from transformers.activations import GELUTanh

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, GELUTanh) or (isinstance(child, torch.nn.GELU) and child.approximate == "tanh"):
                setattr(module, name, GGMLGeluTanh())
    return model
