"""Python side of the `softtf` ops: per-device kernels that pick a backend, fake kernels for
torch.compile / meta tensors, and autograd formulas. The schemas live in csrc/ops.cpp."""
from __future__ import annotations

import torch
from torch import Tensor

from . import _validate, backend

_lib = torch.library.Library("softtf", "FRAGMENT")


def _out_shape(t: Tensor, last: int) -> list[int]:
    return [*t.shape[:-1], last]


# ---------------------------------------------------------------- device kernels (backend choice)
def _dispatching(op: str, dtype_args: tuple[int, ...]):
    check = getattr(_validate, op)

    def kernel(*args):
        check(*args)
        dtypes = tuple(args[i].dtype for i in dtype_args if isinstance(args[i], Tensor))
        _, impl = backend.resolve(op, args[0].device, dtypes)
        return impl(*args)

    kernel.__name__ = f"{op}_dispatch"
    return kernel


_DTYPE_ARGS = {
    "masked_linear": (0, 1, 2),
    "masked_linear_grad_input": (0, 1, 2),
    "masked_linear_grad_mask": (0, 1, 2),
    "mask_mixture_grad": (0, 1, 2, 3),
    "mixed_task_linear": (0, 1, 2),
    "mixed_task_linear_grad_input": (0, 1, 2),
}
for _op, _args in _DTYPE_ARGS.items():
    torch.library.register_kernel(f"softtf::{_op}", ("cpu", "cuda"), _dispatching(_op, _args), lib=_lib)


# ---------------------------------------------------------------- fake kernels (shapes only)
@torch.library.register_fake("softtf::masked_linear", lib=_lib)
def _(x, weight, mask, bias=None):
    _validate.masked_linear(x, weight, mask, bias)
    return x.new_empty(_out_shape(x, weight.shape[0]))


@torch.library.register_fake("softtf::masked_linear_grad_input", lib=_lib)
def _(grad_out, weight, mask):
    _validate.masked_linear_grad_input(grad_out, weight, mask)
    return grad_out.new_empty(_out_shape(grad_out, weight.shape[1]))


@torch.library.register_fake("softtf::masked_linear_grad_mask", lib=_lib)
def _(grad_out, x, weight, mask_dtype):
    _validate.masked_linear_grad_mask(grad_out, x, weight, mask_dtype)
    return weight.new_empty(weight.shape, dtype=mask_dtype)


def _score_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.library.register_fake("softtf::mask_mixture_grad", lib=_lib)
def _(grad_out, x, weight, masks, per_sample):
    _validate.mask_mixture_grad(grad_out, x, weight, masks, per_sample)
    shape = (x.shape[0], masks.shape[0]) if per_sample else (masks.shape[0],)
    return x.new_empty(shape, dtype=_score_dtype(x))


@torch.library.register_fake("softtf::mixed_task_linear", lib=_lib)
def _(x, weight, masks, task_ids, bias=None):
    _validate.mixed_task_linear(x, weight, masks, task_ids, bias, check_values=False)
    return x.new_empty(_out_shape(x, weight.shape[0]))


@torch.library.register_fake("softtf::mixed_task_linear_grad_input", lib=_lib)
def _(grad_out, weight, masks, task_ids):
    _validate.mixed_task_linear_grad_input(grad_out, weight, masks, task_ids, check_values=False)
    return grad_out.new_empty(_out_shape(grad_out, weight.shape[1]))


# ---------------------------------------------------------------- autograd
def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


def _weight_grad(dy: Tensor, x: Tensor, mask: Tensor, weight: Tensor) -> Tensor:
    # Weights are frozen in Soft-TF; dW = (dy^T x) ⊙ M is offered for completeness, unfused.
    acc = _score_dtype(x)
    return ((_flat(dy).to(acc).T @ _flat(x).to(acc)) * mask.to(acc)).to(weight.dtype)


def _ml_setup(ctx, inputs, output):
    x, weight, mask, *rest = inputs  # bias may be omitted (schema default)
    ctx.save_for_backward(x, weight, mask)
    ctx.has_bias = bool(rest) and rest[0] is not None


def _ml_backward(ctx, dy):
    x, weight, mask = ctx.saved_tensors
    need_x, need_w, need_m, *need_rest = ctx.needs_input_grad
    need_b = bool(need_rest) and need_rest[0]
    dy = dy.contiguous() if dy.stride(-1) != 1 else dy
    dx = torch.ops.softtf.masked_linear_grad_input(dy, weight, mask) if need_x else None
    dw = _weight_grad(dy, x, mask, weight) if need_w else None
    dm = torch.ops.softtf.masked_linear_grad_mask(dy, x, weight, mask.dtype) if need_m else None
    db = _flat(dy).sum(0) if (ctx.has_bias and need_b) else None
    return (dx, dw, dm, db)[: len(ctx.needs_input_grad)]


torch.library.register_autograd("softtf::masked_linear", _ml_backward, setup_context=_ml_setup, lib=_lib)


def _mt_setup(ctx, inputs, output):
    x, weight, masks, task_ids, *rest = inputs
    ctx.save_for_backward(x, weight, masks, task_ids)
    ctx.has_bias = bool(rest) and rest[0] is not None


def _mt_backward(ctx, dy):
    x, weight, masks, task_ids = ctx.saved_tensors
    need_x, need_w, need_m, _, *need_rest = ctx.needs_input_grad
    need_b = bool(need_rest) and need_rest[0]
    dx = torch.ops.softtf.mixed_task_linear_grad_input(dy, weight, masks, task_ids) if need_x else None
    dw = None
    if need_w:
        per_sample = masks[task_ids.long()].to(_score_dtype(x))  # [B, out, in]; unfused, W is frozen
        dyb = dy.reshape(dy.shape[0], -1, dy.shape[-1]).to(per_sample.dtype)
        xb = x.reshape(x.shape[0], -1, x.shape[-1]).to(per_sample.dtype)
        dw = torch.einsum("bno,bni,boi->oi", dyb, xb, per_sample).to(weight.dtype)
    dm = None
    if need_m:
        # Rare (masks of finished tasks are frozen): dM_t = Σ_{b: ids[b]=t} (dy_b^T x_b) ⊙ W, written
        # without data-dependent control flow so it traces under torch.compile.
        acc = _score_dtype(x)
        onehot = torch.nn.functional.one_hot(task_ids.long(), masks.shape[0]).to(acc)
        dyb = dy.reshape(dy.shape[0], -1, dy.shape[-1]).to(acc)
        xb = x.reshape(x.shape[0], -1, x.shape[-1]).to(acc)
        dm = (torch.einsum("bt,bno,bni->toi", onehot, dyb, xb) * weight.to(acc)).to(masks.dtype)
    db = _flat(dy).sum(0) if (ctx.has_bias and need_b) else None
    return (dx, dw, dm, None, db)[: len(ctx.needs_input_grad)]


torch.library.register_autograd("softtf::mixed_task_linear", _mt_backward, setup_context=_mt_setup, lib=_lib)
