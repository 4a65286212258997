"""Pure-PyTorch reference of every softtf op: the oracle for the kernels and their fallback.

Signatures match ``torch.ops.softtf.<op>`` exactly. These functions favour clarity over speed
and may materialize ``W * M`` in full (and dequantize an int8 mask in full, in float64 for float64
inputs); the kernels must not. Low-precision inputs accumulate in
fp32 (``common.acc_dtype``), as in the kernels.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .common import acc_dtype, as_rows, as_samples, attention_scale, gate_activation
from .quant import dequantize_mask
from .table import ALL_NAMES

__all__ = list(ALL_NAMES)  # one function per op of the table, each with the op's signature


def masked_linear(x: Tensor, weight: Tensor, mask: Tensor, bias: Tensor | None = None) -> Tensor:
    """y = x (W ⊙ M)^T + b, computed in fp32 (fp64 for fp64 inputs), returned in x's dtype."""
    acc = acc_dtype(x.dtype)
    w = weight.to(acc) * dequantize_mask(mask, acc)
    y = torch.nn.functional.linear(x.to(acc), w, None if bias is None else bias.to(acc))
    return y.to(x.dtype)


def masked_linear_grad_input(grad_out: Tensor, weight: Tensor, mask: Tensor) -> Tensor:
    """dx = dy (W ⊙ M), in grad_out's dtype."""
    acc = acc_dtype(grad_out.dtype)
    w = weight.to(acc) * dequantize_mask(mask, acc)
    return (grad_out.to(acc) @ w).to(grad_out.dtype)


def masked_linear_grad_mask(grad_out: Tensor, x: Tensor, weight: Tensor, mask_dtype: torch.dtype) -> Tensor:
    """dM = (dy^T x) ⊙ W reduced over every leading dim, returned in ``mask_dtype``."""
    acc = acc_dtype(x.dtype)
    dy = as_rows(grad_out).to(acc)
    xx = as_rows(x).to(acc)
    return ((dy.T @ xx) * weight.to(acc)).to(mask_dtype)


def mask_mixture_grad(grad_out: Tensor, x: Tensor, weight: Tensor, masks: Tensor, per_sample: bool) -> Tensor:
    """∂H/∂α_t = Σ_{o,i} (dy^T x)[o,i] · W[o,i] · M_t[o,i].

    per_sample=False: reduce over every leading dim, returns [T].
    per_sample=True: x [B, ..., in], dy [B, ..., out]; sample b uses its own rows only, returns [B, T].
    Result dtype is fp32 (fp64 for fp64 inputs): these are scores, not activations.
    """
    acc = acc_dtype(x.dtype)
    t = masks.shape[0]
    wm = weight.to(acc).unsqueeze(0) * dequantize_mask(masks, acc)  # [T, out, in]
    if per_sample:
        dy = as_samples(grad_out).to(acc)
        xx = as_samples(x).to(acc)
        g = torch.einsum("bno,bni->boi", dy, xx)  # [B, out, in]
        return torch.einsum("boi,toi->bt", g, wm)
    dy = as_rows(grad_out).to(acc)
    xx = as_rows(x).to(acc)
    g = dy.T @ xx
    return (wm * g.unsqueeze(0)).reshape(t, -1).sum(1)


def mixed_task_linear(
    x: Tensor, weight: Tensor, masks: Tensor, task_ids: Tensor, bias: Tensor | None = None
) -> Tensor:
    """y_b = x_b (W ⊙ M_{task_ids[b]})^T + b for every sample b of x [B, ..., in]."""
    acc = acc_dtype(x.dtype)
    wm = weight.to(acc).unsqueeze(0) * dequantize_mask(masks, acc)[task_ids.long()]  # [B, out, in]
    xx = as_samples(x).to(acc)
    y = xx @ wm.transpose(1, 2)
    if bias is not None:
        y = y + bias.to(acc)
    return y.reshape(*x.shape[:-1], weight.shape[0]).to(x.dtype)


def mixed_task_linear_grad_input(grad_out: Tensor, weight: Tensor, masks: Tensor, task_ids: Tensor) -> Tensor:
    """dx_b = dy_b (W ⊙ M_{task_ids[b]})."""
    acc = acc_dtype(grad_out.dtype)
    wm = weight.to(acc).unsqueeze(0) * dequantize_mask(masks, acc)[task_ids.long()]
    dy = as_samples(grad_out).to(acc)
    return (dy @ wm).reshape(*grad_out.shape[:-1], weight.shape[1]).to(grad_out.dtype)


# ---------------------------------------------------------------- routed LoRA (SAPT)
def routed_lora(x: Tensor, lora_a: Tensor, lora_b: Tensor, weights: Tensor, scaling: float) -> Tensor:
    """y_b = Σ_t weights[b, t] · scaling · x_b A_tᵀ B_tᵀ, written as the loop over the T blocks
    (SAPT's official form), in fp32 (fp64 for fp64 inputs), returned in x's dtype."""
    acc = acc_dtype(x.dtype)
    xx = as_samples(x).to(acc)  # [B, N, in]
    a, b, w = lora_a.to(acc), lora_b.to(acc), weights.to(acc)
    y = torch.zeros(*xx.shape[:2], b.shape[1], dtype=acc, device=x.device)
    for t in range(a.shape[0]):
        y = y + (w[:, t] * scaling)[:, None, None] * ((xx @ a[t].T) @ b[t].T)
    return y.reshape(*x.shape[:-1], b.shape[1]).to(x.dtype)


def routed_lora_backward(grad_out: Tensor, x: Tensor, lora_a: Tensor, lora_b: Tensor, weights: Tensor,
                         scaling: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dlora_a, dlora_b, dweights) of :func:`routed_lora`, each in its input's dtype, by the
    chain rule block by block: with h_t = x A_tᵀ and dg_t = dy B_t, dw[b, t] = s Σ dg_t ⊙ h_t,
    dB_t = s Σ_b w_bt dy_bᵀ h_t, dA_t = s Σ_b w_bt dg_tᵀ x_b, dx = s Σ_t w_bt dg_t A_t."""
    acc = acc_dtype(x.dtype)
    xx, dy = as_samples(x).to(acc), as_samples(grad_out).to(acc)
    a, b, w = lora_a.to(acc), lora_b.to(acc), weights.to(acc)
    dx = torch.zeros_like(xx)
    da, db, dw = torch.zeros_like(a), torch.zeros_like(b), torch.zeros_like(w)
    for t in range(a.shape[0]):
        h, dg = xx @ a[t].T, dy @ b[t]  # [B, N, r]
        st = (w[:, t] * scaling)[:, None, None]
        dw[:, t] = scaling * (dg * h).sum((1, 2))
        db[t] = torch.einsum("bno,bnr->or", st * dy, h)
        da[t] = torch.einsum("bnr,bni->ri", st * dg, xx)
        dx = dx + (st * dg) @ a[t]
    return (dx.reshape(x.shape).to(x.dtype), da.to(lora_a.dtype), db.to(lora_b.dtype), dw.to(weights.dtype))


# ---------------------------------------------------------------- prefix attention
def _prefix_scores(q: Tensor, prefix_k: Tensor, alpha: Tensor, tau: Tensor, activation: str, sc: float):
    """(raw prefix scores s, gated s', σ(τs), σ'(τs)) in the accumulation dtype; σ terms None for "none"."""
    acc = acc_dtype(q.dtype)
    s = sc * (q.to(acc) @ prefix_k.to(acc).transpose(-1, -2))
    if activation == "none":
        return s, s, None, None
    a, da = gate_activation(tau.to(acc) * s, activation)
    return s, s + alpha.to(acc) * a, a, da


def _scores(q, k, prefix_k, alpha, tau, activation, sc):
    acc = acc_dtype(q.dtype)
    s_p, gated, a, da = _prefix_scores(q, prefix_k, alpha, tau, activation, sc)
    s_t = sc * (q.to(acc) @ k.to(acc).transpose(-1, -2))
    return torch.cat([gated, s_t], -1), s_p, a, da


def prefix_attention_forward(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor, alpha: Tensor,
                             tau: Tensor, activation: str, scale: float | None = None) -> tuple[Tensor, Tensor]:
    """(out, lse): out = softmax([s_p', s_t]) [prefix_v; v], lse its row log-sum-exp [B, H, N].

    s_p = scale q prefix_k^T, s_p' = s_p + alpha act(tau s_p) (s_p for "none"), s_t = scale q k^T.
    The whole [N, P + N] score matrix is materialized, in fp32 (fp64 for fp64 inputs)."""
    acc = acc_dtype(q.dtype)
    s, *_ = _scores(q, k, prefix_k, alpha, tau, activation, attention_scale(q, scale))
    lse = torch.logsumexp(s, -1)
    out = torch.softmax(s, -1) @ torch.cat([prefix_v, v], -2).to(acc)
    return out.to(q.dtype), lse


def prefix_attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
                              alpha: Tensor, tau: Tensor, out: Tensor, lse: Tensor, activation: str,
                              scale: float | None = None) -> tuple[Tensor, ...]:
    """(dq, dk, dv, dprefix_k, dprefix_v, dalpha, dtau), each in its input's dtype.

    The oracle recomputes the softmax from the inputs; ``out`` and ``lse`` (which the kernels
    read) are taken for the op's signature only. With dS = P ⊙ (dO Vᵀ - rowsum(dO ⊙ O)) split into
    the prefix part dS_p and the token part dS_t: dα = Σ dS_p σ(τs), dτ = Σ dS_p α σ'(τs) s, and
    the raw prefix scores get dS_p (1 + α τ σ'(τs))."""
    acc = acc_dtype(q.dtype)
    sc = attention_scale(q, scale)
    n_prefix = prefix_k.shape[-2]
    s, s_p, a, da = _scores(q, k, prefix_k, alpha, tau, activation, sc)
    p = torch.softmax(s, -1)
    do = grad_out.to(acc)
    dp = do @ torch.cat([prefix_v, v], -2).to(acc).transpose(-1, -2)
    ds = p * (dp - (p * dp).sum(-1, keepdim=True))
    ds_p, ds_t = ds[..., :n_prefix], ds[..., n_prefix:]
    if activation == "none":
        dalpha = dtau = torch.zeros((), dtype=acc, device=q.device)
    else:
        al, ta = alpha.to(acc), tau.to(acc)
        dalpha = (ds_p * a).sum()
        dtau = (ds_p * al * da * s_p).sum()
        ds_p = ds_p * (1 + al * ta * da)
    qq = q.to(acc)
    dq = sc * (ds_p @ prefix_k.to(acc) + ds_t @ k.to(acc))
    dk = sc * ds_t.transpose(-1, -2) @ qq
    dpk = sc * ds_p.transpose(-1, -2) @ qq
    pt = p.transpose(-1, -2)
    dpv, dv = pt[..., :n_prefix, :] @ do, pt[..., n_prefix:, :] @ do
    return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dpk.to(prefix_k.dtype), dpv.to(prefix_v.dtype),
            dalpha.to(alpha.dtype), dtau.to(tau.dtype))
