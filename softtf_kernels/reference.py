"""Pure-PyTorch reference of every softtf op: the oracle for the kernels and their fallback.

Signatures match ``torch.ops.softtf.<op>`` exactly. These functions favour clarity over speed
and may materialize ``W * M`` in full; the kernels must not. Low-precision inputs accumulate in
fp32 (``common.acc_dtype``), as in the kernels.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .common import acc_dtype, as_rows, as_samples
from .table import NAMES

__all__ = list(NAMES)  # one function per op of the table, each with the op's signature


def masked_linear(x: Tensor, weight: Tensor, mask: Tensor, bias: Tensor | None = None) -> Tensor:
    """y = x (W ⊙ M)^T + b, computed in fp32 (fp64 for fp64 inputs), returned in x's dtype."""
    acc = acc_dtype(x.dtype)
    w = weight.to(acc) * mask.to(acc)
    y = torch.nn.functional.linear(x.to(acc), w, None if bias is None else bias.to(acc))
    return y.to(x.dtype)


def masked_linear_grad_input(grad_out: Tensor, weight: Tensor, mask: Tensor) -> Tensor:
    """dx = dy (W ⊙ M), in grad_out's dtype."""
    acc = acc_dtype(grad_out.dtype)
    w = weight.to(acc) * mask.to(acc)
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
    wm = weight.to(acc).unsqueeze(0) * masks.to(acc)  # [T, out, in]
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
    wm = weight.to(acc).unsqueeze(0) * masks.to(acc)[task_ids.long()]  # [B, out, in]
    xx = as_samples(x).to(acc)
    y = xx @ wm.transpose(1, 2)
    if bias is not None:
        y = y + bias.to(acc)
    return y.reshape(*x.shape[:-1], weight.shape[0]).to(x.dtype)


def mixed_task_linear_grad_input(grad_out: Tensor, weight: Tensor, masks: Tensor, task_ids: Tensor) -> Tensor:
    """dx_b = dy_b (W ⊙ M_{task_ids[b]})."""
    acc = acc_dtype(grad_out.dtype)
    wm = weight.to(acc).unsqueeze(0) * masks.to(acc)[task_ids.long()]
    dy = as_samples(grad_out).to(acc)
    return (dy @ wm).reshape(*grad_out.shape[:-1], weight.shape[1]).to(grad_out.dtype)
