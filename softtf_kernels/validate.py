"""Argument checks of the ops, one function per op (named like it), run before any backend and
by the fake kernels.

Each check raises with the op, the argument and what was expected, so a user sees the same
message whichever backend runs. Nothing is broadcast or cast silently. Every check takes the
op's arguments plus the keyword ``check_values``: False skips the checks that read tensor values
(the task_ids range), which fake and meta tensors do not have; ops without such checks accept
it so that the registry can call every check the same way.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .common import GATES, acc_dtype
from .quant import QMASK_DTYPE, QMASK_TAIL

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INDEX_DTYPES = (torch.int64, torch.int32)


def _float(op: str, name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, bfloat16, float16 or float64, got {t.dtype}")


def _same_device(op: str, ref_name: str, ref: Tensor, **others: Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}")


def _weight(op: str, weight: Tensor) -> tuple[int, int]:
    _float(op, "weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    return weight.shape[0], weight.shape[1]


def _activation(op: str, name: str, t: Tensor, feat: int, weight: Tensor, what: str) -> None:
    _float(op, name, t)
    if t.dim() < 1 or t.shape[-1] != feat:
        raise ValueError(f"{op}: {name} must have last dim {feat} ({what}), got shape {tuple(t.shape)}")
    if t.dtype != weight.dtype:
        raise TypeError(f"{op}: {name} dtype {t.dtype} must equal weight dtype {weight.dtype}")


def _mask_dtype(op: str, name: str, t: Tensor) -> None:
    """A mask is float (any of FLOAT_DTYPES) or int8 (softtf_kernels.quant's row-quantized layout)."""
    if isinstance(t, Tensor) and t.dtype == QMASK_DTYPE:
        return
    if isinstance(t, Tensor) and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, bfloat16, float16, float64 or int8 (a quantized mask), got {t.dtype}")
    _float(op, name, t)


def _mask_cols(weight: Tensor, mask: Tensor) -> int:
    return weight.shape[1] + (QMASK_TAIL if mask.dtype == QMASK_DTYPE else 0)


def _mask(op: str, name: str, mask: Tensor, weight: Tensor) -> None:
    _mask_dtype(op, name, mask)
    want = (weight.shape[0], _mask_cols(weight, mask))
    if tuple(mask.shape) != want:
        what = f"[out, in + {QMASK_TAIL}] = {list(want)} (an int8 mask)" if mask.dtype == QMASK_DTYPE else f"weight's shape {want}"
        raise ValueError(f"{op}: {name} must have {what}, got {tuple(mask.shape)}")


def _masks(op: str, masks: Tensor, weight: Tensor) -> int:
    _mask_dtype(op, "masks", masks)
    if masks.dim() != 3 or tuple(masks.shape[1:]) != (weight.shape[0], _mask_cols(weight, masks)):
        tail = f" + {QMASK_TAIL}] (int8 masks)" if masks.dtype == QMASK_DTYPE else "]"
        raise ValueError(
            f"{op}: masks must have shape [T, {weight.shape[0]}, {weight.shape[1]}{tail}, got {tuple(masks.shape)}"
        )
    if masks.shape[0] == 0:
        raise ValueError(f"{op}: masks must hold at least one task, got shape {tuple(masks.shape)}")
    return masks.shape[0]


def _bias(op: str, bias: Tensor | None, out_f: int, x: Tensor) -> None:
    if bias is None:
        return
    _float(op, "bias", bias)
    if bias.dim() != 1 or bias.shape[0] != out_f:
        raise ValueError(f"{op}: bias must have shape [{out_f}], got {tuple(bias.shape)}")
    if bias.dtype != x.dtype:
        raise TypeError(f"{op}: bias dtype {bias.dtype} must equal x dtype {x.dtype}")


def _leading(op: str, a_name: str, a: Tensor, b_name: str, b: Tensor) -> None:
    if tuple(a.shape[:-1]) != tuple(b.shape[:-1]):
        raise ValueError(
            f"{op}: {a_name} and {b_name} must have the same leading dims, got "
            f"{tuple(a.shape)} and {tuple(b.shape)}"
        )


def masked_linear(x, weight, mask, bias=None, *, check_values: bool = True) -> None:
    op = "softtf.masked_linear"
    out_f, in_f = _weight(op, weight)
    _activation(op, "x", x, in_f, weight, "weight.shape[1]")
    _mask(op, "mask", mask, weight)
    _bias(op, bias, out_f, x)
    _same_device(op, "weight", weight, x=x, mask=mask, bias=bias)


def masked_linear_grad_input(grad_out, weight, mask, *, check_values: bool = True) -> None:
    op = "softtf.masked_linear_grad_input"
    out_f, _ = _weight(op, weight)
    _activation(op, "grad_out", grad_out, out_f, weight, "weight.shape[0]")
    _mask(op, "mask", mask, weight)
    _same_device(op, "weight", weight, grad_out=grad_out, mask=mask)


def masked_linear_grad_mask(grad_out, x, weight, mask_dtype, *, check_values: bool = True) -> None:
    op = "softtf.masked_linear_grad_mask"
    out_f, in_f = _weight(op, weight)
    _activation(op, "x", x, in_f, weight, "weight.shape[1]")
    _activation(op, "grad_out", grad_out, out_f, weight, "weight.shape[0]")
    _leading(op, "grad_out", grad_out, "x", x)
    if mask_dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: mask_dtype must be float32, bfloat16, float16 or float64, got {mask_dtype}")
    _same_device(op, "weight", weight, grad_out=grad_out, x=x)


def mask_mixture_grad(grad_out, x, weight, masks, per_sample, *, check_values: bool = True) -> None:
    op = "softtf.mask_mixture_grad"
    out_f, in_f = _weight(op, weight)
    _activation(op, "x", x, in_f, weight, "weight.shape[1]")
    _activation(op, "grad_out", grad_out, out_f, weight, "weight.shape[0]")
    _leading(op, "grad_out", grad_out, "x", x)
    _masks(op, masks, weight)
    if per_sample and x.dim() < 2:
        raise ValueError(f"{op}: per_sample=True needs x of shape [B, ..., {in_f}], got {tuple(x.shape)}")
    _same_device(op, "weight", weight, grad_out=grad_out, x=x, masks=masks)


def _task_ids(op: str, task_ids: Tensor, batch: int, n_tasks: int, check_values: bool) -> None:
    if not isinstance(task_ids, Tensor) or task_ids.dtype not in INDEX_DTYPES:
        got = task_ids.dtype if isinstance(task_ids, Tensor) else type(task_ids).__name__
        raise TypeError(f"{op}: task_ids must be an int64 or int32 tensor, got {got}")
    if task_ids.dim() != 1 or task_ids.shape[0] != batch:
        raise ValueError(f"{op}: task_ids must have shape [{batch}] (one id per sample), got {tuple(task_ids.shape)}")
    if check_values and batch > 0:
        lo, hi = int(task_ids.min()), int(task_ids.max())
        if lo < 0 or hi >= n_tasks:
            raise ValueError(f"{op}: task_ids must lie in [0, {n_tasks}), got values in [{lo}, {hi}]")


def mixed_task_linear(x, weight, masks, task_ids, bias=None, *, check_values: bool = True) -> None:
    op = "softtf.mixed_task_linear"
    out_f, in_f = _weight(op, weight)
    _activation(op, "x", x, in_f, weight, "weight.shape[1]")
    if x.dim() < 2:
        raise ValueError(f"{op}: x must have shape [B, ..., {in_f}], got {tuple(x.shape)}")
    n_tasks = _masks(op, masks, weight)
    _task_ids(op, task_ids, x.shape[0], n_tasks, check_values)
    _bias(op, bias, out_f, x)
    _same_device(op, "weight", weight, x=x, masks=masks, task_ids=task_ids, bias=bias)


def mixed_task_linear_grad_input(grad_out, weight, masks, task_ids, *, check_values: bool = True) -> None:
    op = "softtf.mixed_task_linear_grad_input"
    out_f, _ = _weight(op, weight)
    _activation(op, "grad_out", grad_out, out_f, weight, "weight.shape[0]")
    if grad_out.dim() < 2:
        raise ValueError(f"{op}: grad_out must have shape [B, ..., {out_f}], got {tuple(grad_out.shape)}")
    n_tasks = _masks(op, masks, weight)
    _task_ids(op, task_ids, grad_out.shape[0], n_tasks, check_values)
    _same_device(op, "weight", weight, grad_out=grad_out, masks=masks, task_ids=task_ids)


# ---------------------------------------------------------------- routed LoRA (SAPT)
def _scaling(op: str, scaling) -> None:
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
        raise ValueError(f"{op}: scaling must be a finite float, got {scaling!r}")


def _routed_lora_args(op: str, x, lora_a, lora_b, weights, scaling) -> None:
    _float(op, "lora_a", lora_a)
    if lora_a.dim() != 3:
        raise ValueError(f"{op}: lora_a must be 3-D [T, r, in], got shape {tuple(lora_a.shape)}")
    if lora_a.shape[0] == 0:
        raise ValueError(f"{op}: lora_a must hold at least one task, got shape {tuple(lora_a.shape)}")
    n_tasks, rank, in_f = lora_a.shape
    _float(op, "x", x)
    if x.dim() < 2 or x.shape[-1] != in_f:
        raise ValueError(f"{op}: x must have shape [B, ..., {in_f}] (lora_a.shape[2]), got {tuple(x.shape)}")
    if x.dtype != lora_a.dtype:
        raise TypeError(f"{op}: x dtype {x.dtype} must equal lora_a dtype {lora_a.dtype}")
    _float(op, "lora_b", lora_b)
    if lora_b.dim() != 3 or lora_b.shape[0] != n_tasks or lora_b.shape[2] != rank:
        raise ValueError(f"{op}: lora_b must have shape [{n_tasks}, out, {rank}], got {tuple(lora_b.shape)}")
    if lora_b.dtype != lora_a.dtype:
        raise TypeError(f"{op}: lora_b dtype {lora_b.dtype} must equal lora_a dtype {lora_a.dtype}")
    _float(op, "weights", weights)
    if weights.dim() != 2 or tuple(weights.shape) != (x.shape[0], n_tasks):
        raise ValueError(f"{op}: weights must have shape [{x.shape[0]}, {n_tasks}] (one row per sample), "
                         f"got {tuple(weights.shape)}")
    _scaling(op, scaling)
    _same_device(op, "lora_a", lora_a, x=x, lora_b=lora_b, weights=weights)


def routed_lora(x, lora_a, lora_b, weights, scaling, *, check_values: bool = True) -> None:
    _routed_lora_args("softtf.routed_lora", x, lora_a, lora_b, weights, scaling)


def routed_lora_backward(grad_out, x, lora_a, lora_b, weights, scaling, *, check_values: bool = True) -> None:
    op = "softtf.routed_lora_backward"
    _routed_lora_args(op, x, lora_a, lora_b, weights, scaling)
    _float(op, "grad_out", grad_out)
    out_f = lora_b.shape[1]
    if grad_out.dim() != x.dim() or grad_out.shape[-1] != out_f:
        raise ValueError(f"{op}: grad_out must have shape [B, ..., {out_f}] (lora_b.shape[1]), "
                         f"got {tuple(grad_out.shape)}")
    _leading(op, "grad_out", grad_out, "x", x)
    if grad_out.dtype != x.dtype:
        raise TypeError(f"{op}: grad_out dtype {grad_out.dtype} must equal x dtype {x.dtype}")
    _same_device(op, "lora_a", lora_a, grad_out=grad_out)


# ---------------------------------------------------------------- prefix attention
def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _same_dtype(op: str, ref: Tensor, **others: Tensor) -> None:
    for name, t in others.items():
        if t.dtype != ref.dtype:
            raise TypeError(f"{op}: {name} dtype {t.dtype} must equal q dtype {ref.dtype}")


def _like_q(op: str, q: Tensor, **others: Tensor) -> None:
    for name, t in others.items():
        _float(op, name, t)
        if t.shape != q.shape:
            raise ValueError(f"{op}: {name} must have q's shape [B, H, N, D] = {_shape(q)}, got {_shape(t)}")


def _prefix_attention_args(op, q, k, v, prefix_k, prefix_v, alpha, tau, activation, scale) -> None:
    _float(op, "q", q)
    if q.dim() != 4:
        raise ValueError(f"{op}: q must be 4-D [B, H, N, D], got shape {_shape(q)}")
    b, h, n, d = q.shape
    if n < 1:
        raise ValueError(f"{op}: q must hold at least one token (N >= 1), got shape {_shape(q)}")
    if d < 1:
        raise ValueError(f"{op}: the head dim D must be >= 1, got q of shape {_shape(q)}")
    _like_q(op, q, k=k, v=v)
    for name, t in (("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        _float(op, name, t)
        if t.dim() != 4 or (t.shape[0], t.shape[1], t.shape[3]) != (b, h, d):
            raise ValueError(f"{op}: {name} must have shape [B, H, P, D] = [{b}, {h}, P, {d}] (P >= 0 prefix "
                             f"tokens, already selected per sample), got {_shape(t)}")
    if prefix_v.shape != prefix_k.shape:
        raise ValueError(f"{op}: prefix_v must have prefix_k's shape {_shape(prefix_k)}, got {_shape(prefix_v)}")
    _same_dtype(op, q, k=k, v=v, prefix_k=prefix_k, prefix_v=prefix_v)
    for name, t in (("alpha", alpha), ("tau", tau)):
        _float(op, name, t)
        if t.dim() != 0:
            raise ValueError(f"{op}: {name} must be a 0-dim tensor (one learned scalar shared by all heads), "
                             f"got shape {_shape(t)}")
    if not isinstance(activation, str) or activation not in GATES:
        raise ValueError(f"{op}: activation must be one of {', '.join(GATES)}; got {activation!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        raise ValueError(f"{op}: scale must be a finite float or None (D^-0.5), got {scale!r}")
    _same_device(op, "q", q, k=k, v=v, prefix_k=prefix_k, prefix_v=prefix_v, alpha=alpha, tau=tau)


def prefix_attention_forward(q, k, v, prefix_k, prefix_v, alpha, tau, activation, scale=None, *,
                             check_values: bool = True) -> None:
    _prefix_attention_args("softtf.prefix_attention", q, k, v, prefix_k, prefix_v, alpha, tau, activation, scale)


def prefix_attention_backward(grad_out, q, k, v, prefix_k, prefix_v, alpha, tau, out, lse, activation, scale=None,
                              *, check_values: bool = True) -> None:
    op = "softtf.prefix_attention_backward"
    _prefix_attention_args(op, q, k, v, prefix_k, prefix_v, alpha, tau, activation, scale)
    _like_q(op, q, grad_out=grad_out, out=out)
    _same_dtype(op, q, grad_out=grad_out, out=out)
    _float(op, "lse", lse)
    if lse.shape != q.shape[:3]:
        raise ValueError(f"{op}: lse must have shape [B, H, N] = {_shape(q)[:3]}, got {_shape(lse)}")
    if lse.dtype != acc_dtype(q.dtype):
        raise TypeError(f"{op}: lse must be {acc_dtype(q.dtype)} (the forward's log-sum-exp), got {lse.dtype}")
    _same_device(op, "q", q, grad_out=grad_out, out=out, lse=lse)
