"""Autograd formulas of the differentiable ops, registered from the op table (table.py).

Each op has a ``<op>_setup`` (torch.library setup_context) and a ``<op>_backward``. The backward
passes call the fused gradient ops through the typed wrappers of ops.py, so they run on whichever
backend is chosen for that call.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import ops
from .common import acc_dtype, as_rows, as_samples


def _flat(t: Tensor) -> Tensor:
    return as_rows(t)


def _has_bias(inputs: tuple, index: int) -> bool:
    # A trailing bias may be omitted (schema default None), so inputs can be shorter.
    return len(inputs) > index and inputs[index] is not None


def _bias_grad(ctx, dy: Tensor, index: int) -> Tensor | None:
    needs = ctx.needs_input_grad
    return _flat(dy).sum(0) if ctx.has_bias and len(needs) > index and needs[index] else None


# ---------------------------------------------------------------- masked_linear
def _weight_grad(dy: Tensor, x: Tensor, mask: Tensor, weight: Tensor) -> Tensor:
    # Weights are frozen in Soft-TF; dW = (dy^T x) ⊙ M is offered for completeness, unfused.
    acc = acc_dtype(x.dtype)
    return ((_flat(dy).to(acc).T @ _flat(x).to(acc)) * mask.to(acc)).to(weight.dtype)


def masked_linear_setup(ctx, inputs, output) -> None:
    x, weight, mask = inputs[:3]
    ctx.save_for_backward(x, weight, mask)
    ctx.has_bias = _has_bias(inputs, 3)


def masked_linear_backward(ctx, dy: Tensor):
    x, weight, mask = ctx.saved_tensors
    need_x, need_w, need_m = ctx.needs_input_grad[:3]
    dy = dy.contiguous() if dy.stride(-1) != 1 else dy
    dx = ops.masked_linear_grad_input(dy, weight, mask) if need_x else None
    dw = _weight_grad(dy, x, mask, weight) if need_w else None
    dm = ops.masked_linear_grad_mask(dy, x, weight, mask.dtype) if need_m else None
    return (dx, dw, dm, _bias_grad(ctx, dy, 3))[: len(ctx.needs_input_grad)]


# ---------------------------------------------------------------- mixed_task_linear
def mixed_task_linear_setup(ctx, inputs, output) -> None:
    x, weight, masks, task_ids = inputs[:4]
    ctx.save_for_backward(x, weight, masks, task_ids)
    ctx.has_bias = _has_bias(inputs, 4)


def mixed_task_linear_backward(ctx, dy: Tensor):
    x, weight, masks, task_ids = ctx.saved_tensors
    need_x, need_w, need_m = ctx.needs_input_grad[:3]
    acc = acc_dtype(x.dtype)
    dx = ops.mixed_task_linear_grad_input(dy, weight, masks, task_ids) if need_x else None
    dw = None
    if need_w:
        per_sample = masks[task_ids.long()].to(acc)  # [B, out, in]; unfused, W is frozen
        dyb = as_samples(dy).to(acc)
        xb = as_samples(x).to(acc)
        dw = torch.einsum("bno,bni,boi->oi", dyb, xb, per_sample).to(weight.dtype)
    dm = None
    if need_m:
        # Rare (masks of finished tasks are frozen): dM_t = Σ_{b: ids[b]=t} (dy_b^T x_b) ⊙ W, written
        # without data-dependent control flow so it traces under torch.compile.
        onehot = torch.nn.functional.one_hot(task_ids.long(), masks.shape[0]).to(acc)
        dyb = as_samples(dy).to(acc)
        xb = as_samples(x).to(acc)
        dm = (torch.einsum("bt,bno,bni->toi", onehot, dyb, xb) * weight.to(acc)).to(masks.dtype)
    return (dx, dw, dm, None, _bias_grad(ctx, dy, 4))[: len(ctx.needs_input_grad)]


# ---------------------------------------------------------------- routed_lora
def routed_lora_setup(ctx, inputs, output) -> None:
    x, lora_a, lora_b, weights, scaling = inputs
    ctx.save_for_backward(x, lora_a, lora_b, weights)
    ctx.scaling = scaling


def routed_lora_backward(ctx, dy: Tensor):
    # One fused backward op gives all four gradients (they share the two [tokens, T·r] GEMMs
    # x A_catᵀ and dy B_cat); those not needed are dropped.
    needs = ctx.needs_input_grad
    if not any(needs[:4]):
        return (None,) * len(needs)
    grads = ops.routed_lora_backward(dy, *ctx.saved_tensors, ctx.scaling)
    return tuple(g if needs[i] else None for i, g in enumerate(grads)) + (None,)


# ---------------------------------------------------------------- prefix_attention_forward
def prefix_attention_setup(ctx, inputs, output) -> None:
    q, k, v, prefix_k, prefix_v, alpha, tau, activation = inputs[:8]
    out, lse = output
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, alpha, tau, out, lse)
    ctx.activation = activation
    ctx.scale = inputs[8] if len(inputs) > 8 else None
    ctx.mark_non_differentiable(lse)


def prefix_attention_backward(ctx, grad_out: Tensor, grad_lse: Tensor | None):
    # lse is non-differentiable (an auxiliary output for the backward); one fused backward op gives
    # all seven gradients (the kernels compute them in the same passes).
    grads = ops.prefix_attention_backward(grad_out, *ctx.saved_tensors, ctx.activation, ctx.scale)
    needs = ctx.needs_input_grad
    return tuple(g if needs[i] else None for i, g in enumerate(grads)) + (None, None)[: len(needs) - 7]
