"""CPU kernels of the attention ops (backend ``cpp`` for them): ATen's C++ flash attention for the
token part, the small gated prefix part beside it, merged by log-sum-exp.

The token-token scores never exist in full: ``aten::_scaled_dot_product_flash_attention_for_cpu``
returns the normalized token output O_t and its log-sum-exp L_t. The prefix part is small
([N, P] per head, P the prompt length): s_p' = gate(scale q prefix_kᵀ), L_p = logsumexp(s_p').
With L = log(e^L_t + e^L_p) the output is O = e^(L_t - L) O_t + softmax-weights e^(s_p' - L)
prefix_v, exactly the softmax over [s_p', s_t].

Backward: ``aten::_scaled_dot_product_flash_attention_for_cpu_backward`` is given the merged O
and L, so it recomputes the token probabilities P_t = e^(s_t - L) of the joint softmax and uses
Δ = rowsum(dO ⊙ O) of the joint output: what it returns (dq's token share, dk, dv) is the token
share of the joint gradient. The prefix share uses the same Δ: dS_p' = P_p ⊙ (dO prefix_vᵀ - Δ),
then the gate's chain rule (common.gate_activation) gives dα, dτ and the raw prefix scores' dS_p.

Dtypes: float32, bfloat16, float16 and float64 (ATen's CPU flash attention takes all four); the
prefix part and the merge run in fp32 (fp64 for fp64). Strides: any. ATen's kernels read strided
q/k/v/dO/O but assume stride 1 along D (SDPA checks that before it picks them; their ops called
directly do not, and a q or O with another stride along D gave garbage), so a tensor handed to them
with another stride along D is copied first (``_unit_stride_d``); the prefix part is plain matmuls.
Outputs are contiguous. B = 0 or H = 0 return empty results without calling ATen (its kernel
divides by zero there).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .common import acc_dtype, attention_scale, gate_activation

__all__ = ["prefix_attention_forward", "prefix_attention_backward"]

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default


def _unit_stride_d(t: Tensor) -> Tensor:
    """``t`` [B, H, N, D] with stride 1 along D, copied only when it has another one."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _prefix_scores(q: Tensor, prefix_k: Tensor, alpha: Tensor, tau: Tensor, activation: str, sc: float):
    """(s_p raw, s_p' gated, σ(τ s_p), σ'(τ s_p)) [B, H, N, P] in the accumulation dtype."""
    acc = acc_dtype(q.dtype)
    s = torch.matmul(q.to(acc), prefix_k.to(acc).transpose(-1, -2)).mul_(sc)
    if activation == "none":
        return s, s, None, None
    a, da = gate_activation(tau.to(acc) * s, activation)
    return s, s + alpha.to(acc) * a, a, da


def prefix_attention_forward(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor, alpha: Tensor,
                             tau: Tensor, activation: str, scale: float | None = None) -> tuple[Tensor, Tensor]:
    acc = acc_dtype(q.dtype)
    b, h, n, _ = q.shape
    if b * h == 0:
        return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((b, h, n), dtype=acc)
    sc = attention_scale(q, scale)
    out_t, lse_t = _flash(_unit_stride_d(q), _unit_stride_d(k), _unit_stride_d(v), scale=sc)
    _, gated, _, _ = _prefix_scores(q, prefix_k, alpha, tau, activation, sc)
    lse = torch.logaddexp(lse_t.to(acc), torch.logsumexp(gated, -1))  # P = 0: logsumexp is -inf
    p = torch.exp(gated - lse.unsqueeze(-1))
    out = torch.matmul(p, prefix_v.to(acc))  # contiguous [B, H, N, D]
    out.addcmul_(out_t.to(acc), torch.exp(lse_t - lse).unsqueeze(-1))
    return out.to(q.dtype), lse.contiguous()


def prefix_attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
                              alpha: Tensor, tau: Tensor, out: Tensor, lse: Tensor, activation: str,
                              scale: float | None = None) -> tuple[Tensor, ...]:
    acc = acc_dtype(q.dtype)
    zero_a, zero_t = torch.zeros_like(alpha), torch.zeros_like(tau)
    if q.shape[0] * q.shape[1] == 0:
        return (*(torch.zeros_like(t, memory_format=torch.contiguous_format) for t in (q, k, v, prefix_k, prefix_v)),
                zero_a, zero_t)
    sc = attention_scale(q, scale)
    # Token share: ATen's flash backward on the joint O and L (the kernel wants L in fp32/fp64 as it
    # returned it, and O / dO in q's dtype).
    dq_t, dk, dv = _flash_backward(*(_unit_stride_d(t) for t in (grad_out, q, k, v, out)), lse, 0.0, False,
                                   scale=sc)
    # Prefix share.
    s, gated, a, da = _prefix_scores(q, prefix_k, alpha, tau, activation, sc)
    p = torch.exp(gated - lse.to(acc).unsqueeze(-1))  # [B, H, N, P]
    do = grad_out.to(acc)
    delta = (do * out.to(acc)).sum(-1, keepdim=True)
    ds = torch.matmul(do, prefix_v.to(acc).transpose(-1, -2)).sub_(delta).mul_(p)
    dalpha, dtau = zero_a, zero_t
    if activation != "none":
        al, ta = alpha.to(acc), tau.to(acc)
        dalpha = (ds * a).sum().to(alpha.dtype)
        dtau = (ds * da * s).sum().mul_(al).to(tau.dtype)
        ds = ds * (1 + al * ta * da)
    dq = torch.matmul(ds, prefix_k.to(acc)).mul_(sc).add_(dq_t.to(acc))
    dpk = torch.matmul(ds.transpose(-1, -2), q.to(acc)).mul_(sc)
    dpv = torch.matmul(p.transpose(-1, -2), do)
    contiguous = torch.contiguous_format
    return (dq.to(q.dtype), dk.contiguous(memory_format=contiguous), dv.contiguous(memory_format=contiguous),
            dpk.to(prefix_k.dtype), dpv.to(prefix_v.dtype), dalpha, dtau)
