"""Rules every Python implementation of the ops shares: the accumulation dtype and the output
allocator. The C++ kernels follow the same two rules (csrc/cpu/common.h, csrc/checks.h)."""
from __future__ import annotations

import math
import os

import torch
from torch import Tensor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums are accumulated (and scores returned) in: fp32 for fp32/bf16/fp16 inputs,
    fp64 for fp64 inputs (which gradcheck uses)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def new_output(shape, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """An uninitialised output. Under SOFTTF_POISON_OUTPUTS=1 (set by the tests, read per call like
    the C++ kernels do) it starts as NaN, so an element a kernel forgets to write fails the oracle
    instead of passing on lucky zeros."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if os.environ.get("SOFTTF_POISON_OUTPUTS", "0") == "1":
        t.fill_(float("nan"))
    return t


def as_rows(t: Tensor) -> Tensor:
    """``t [..., F]`` as ``[tokens, F]``. Sizes are spelled out rather than -1, which is ambiguous
    (and raises) when a dim is 0: 0 tokens, or F = 0 (``nn.Linear(0, n)``)."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def as_samples(t: Tensor) -> Tensor:
    """``t [B, ..., F]`` as ``[B, tokens per sample, F]``, valid for B = 0 and F = 0 too."""
    return t.reshape(t.shape[0], math.prod(t.shape[1:-1]), t.shape[-1])


# ---------------------------------------------------------------- prefix attention (NoRGa gate)
GATES = ("none", "sigmoid", "tanh", "gelu")
_SQRT1_2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


def attention_scale(q: Tensor, scale: float | None) -> float:
    """The score scale: ``scale``, or D^-0.5 for q [..., D] when None (as SDPA)."""
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


def gate_activation(z: Tensor, activation: str) -> tuple[Tensor, Tensor]:
    """NoRGa's σ and its derivative σ' at z, for activation "sigmoid", "tanh" or "gelu" (the exact
    erf GELU of torch.nn.GELU()). The gated prefix score is s + α·σ(τ·s)."""
    if activation == "sigmoid":
        a = torch.sigmoid(z)
        return a, a * (1 - a)
    if activation == "tanh":
        a = torch.tanh(z)
        return a, 1 - a * a
    if activation == "gelu":
        cdf = 0.5 * (1 + torch.erf(z * _SQRT1_2))
        return z * cdf, cdf + z * torch.exp(-0.5 * z * z) * _INV_SQRT_2PI
    raise ValueError(f"gate activation must be one of {', '.join(GATES[1:])}; got {activation!r}")
