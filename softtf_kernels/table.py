"""The one table of the softtf ops. Everything per op on the Python side is derived from it: the
per-device kernels that choose a backend, the fake kernels and the autograd registration
(registry.py), and the public names of ``reference`` and ``triton``.

The schemas live in the C++ list csrc/ops.h (one X-macro entry per op, defined as
``softtf::<op>``, ``softtf::_cpp_<op>`` and ``softtf::_cuda_<op>``); tests/test_op_table.py
checks that the two lists, the backend modules and the typed wrappers of ops.py agree.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor

from . import autograd, validate
from .common import acc_dtype


@dataclass(frozen=True)
class Autograd:
    setup_context: Callable
    backward: Callable


@dataclass(frozen=True)
class OpSpec:
    name: str
    # Positions of the float arguments whose dtypes choose the kernel: every float tensor and
    # every dtype argument (float64 anywhere goes to the reference on GPU backends, in forward and
    # backward alike; tests/test_op_table.py checks none is missing). The index-typed task_ids
    # are not float arguments; an omitted bias (None) is skipped.
    dtype_args: tuple[int, ...]
    # validate.<op>: raises naming the argument; takes the op's arguments and check_values=.
    validate: Callable[..., None]
    # An empty output of the right shape, dtype and device, for fake/meta tensors (no data read).
    fake: Callable[..., Tensor]
    autograd: Autograd | None = None


def _with_last(t: Tensor, last: int) -> list[int]:
    return [*t.shape[:-1], last]


def _out_features_like_input(x: Tensor, weight: Tensor, *rest) -> Tensor:
    # masked_linear, mixed_task_linear: x [..., in] -> y [..., out] in x's dtype.
    return x.new_empty(_with_last(x, weight.shape[0]))


def _in_features_like_grad(grad_out: Tensor, weight: Tensor, *rest) -> Tensor:
    # the grad_input ops: dy [..., out] -> dx [..., in] in dy's dtype.
    return grad_out.new_empty(_with_last(grad_out, weight.shape[1]))


def _mask_shaped(grad_out: Tensor, x: Tensor, weight: Tensor, mask_dtype) -> Tensor:
    return weight.new_empty(weight.shape, dtype=mask_dtype)


def _scores(grad_out: Tensor, x: Tensor, weight: Tensor, masks: Tensor, per_sample: bool) -> Tensor:
    shape = (x.shape[0], masks.shape[0]) if per_sample else (masks.shape[0],)
    return x.new_empty(shape, dtype=acc_dtype(x.dtype))


OPS: tuple[OpSpec, ...] = (
    OpSpec("masked_linear", (0, 1, 2, 3), validate.masked_linear, _out_features_like_input,
           Autograd(autograd.masked_linear_setup, autograd.masked_linear_backward)),
    OpSpec("masked_linear_grad_input", (0, 1, 2), validate.masked_linear_grad_input, _in_features_like_grad),
    OpSpec("masked_linear_grad_mask", (0, 1, 2, 3), validate.masked_linear_grad_mask, _mask_shaped),
    OpSpec("mask_mixture_grad", (0, 1, 2, 3), validate.mask_mixture_grad, _scores),
    OpSpec("mixed_task_linear", (0, 1, 2, 4), validate.mixed_task_linear, _out_features_like_input,
           Autograd(autograd.mixed_task_linear_setup, autograd.mixed_task_linear_backward)),
    OpSpec("mixed_task_linear_grad_input", (0, 1, 2), validate.mixed_task_linear_grad_input,
           _in_features_like_grad),
)

NAMES: tuple[str, ...] = tuple(spec.name for spec in OPS)
