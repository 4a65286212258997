"""The one table of the softtf ops. Everything per op on the Python side is derived from it: the
per-device kernels that choose a backend, the fake kernels and the autograd registration
(registry.py), and the public names of ``reference`` and ``triton``.

The schemas of the masked-linear ops live in the C++ list csrc/op_list.h (one X-macro entry per
op, defined as ``softtf::<op>``, ``softtf::_cpp_<op>`` and ``softtf::_cuda_<op>``). The attention
ops have no C++ kernel of ours: their schemas are written here (``OpSpec.schema``) and defined
from Python by registry.py; their CPU kernel (backend ``cpp``) is cpu_attention.py, over ATen's C++
flash attention, their CUDA kernel is Triton. ``COMPOSITES`` are public ops that only return an
output of a table op (CompositeImplicitAutograd). tests/test_op_table.py checks that the lists,
the backend modules and the typed wrappers of ops.py agree.
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
    # None: declared in csrc/op_list.h with its per-backend ops _cpp_<op> / _cuda_<op>. Else the
    # schema ("(args) -> outputs"), defined from Python; such an op has no per-backend ops.
    schema: str | None = None


@dataclass(frozen=True)
class Composite:
    """A public op defined from Python as output ``output`` of table op ``of`` (its autograd,
    fake and backend choice are those of ``of``), like aten's scaled_dot_product_attention."""
    name: str
    schema: str
    of: str
    output: int


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


def _routed_lora_out(x: Tensor, lora_a: Tensor, lora_b: Tensor, *rest) -> Tensor:
    return x.new_empty(_with_last(x, lora_b.shape[1]))


def _routed_lora_grads(grad_out, x, lora_a, lora_b, weights, scaling) -> tuple[Tensor, ...]:
    return tuple(t.new_empty(t.shape) for t in (x, lora_a, lora_b, weights))


def _attention_out_and_lse(q: Tensor, *rest) -> tuple[Tensor, Tensor]:
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=acc_dtype(q.dtype))


def _attention_grads(grad_out, q, k, v, prefix_k, prefix_v, alpha, tau, *rest) -> tuple[Tensor, ...]:
    return tuple(t.new_empty(t.shape) for t in (q, k, v, prefix_k, prefix_v, alpha, tau))


_ATTENTION_ARGS = ("Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, Tensor alpha, Tensor tau, "
                   "str activation, float? scale=None")

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
    # SAPT's routed LoRA: x [B, ..., in], lora_a [T, r, in], lora_b [T, out, r], weights [B, T],
    # scaling -> y [B, ..., out]; backward -> (dx, dlora_a, dlora_b, dweights).
    OpSpec("routed_lora", (0, 1, 2, 3), validate.routed_lora, _routed_lora_out,
           Autograd(autograd.routed_lora_setup, autograd.routed_lora_backward)),
    OpSpec("routed_lora_backward", (0, 1, 2, 3, 4), validate.routed_lora_backward, _routed_lora_grads),
    # NoRGa / DualPrompt prefix attention: q, k, v [B, H, N, D], prefix_k, prefix_v [B, H, P, D],
    # alpha, tau 0-dim. forward -> (out [B, H, N, D], lse [B, H, N] fp32/fp64).
    OpSpec("prefix_attention_forward", (0, 1, 2, 3, 4, 5, 6), validate.prefix_attention_forward,
           _attention_out_and_lse,
           Autograd(autograd.prefix_attention_setup, autograd.prefix_attention_backward),
           schema=f"({_ATTENTION_ARGS}) -> (Tensor, Tensor)"),
    OpSpec("prefix_attention_backward", tuple(range(10)), validate.prefix_attention_backward, _attention_grads,
           schema="(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, Tensor alpha, "
                  "Tensor tau, Tensor out, Tensor lse, str activation, float? scale=None) "
                  "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"),
)

COMPOSITES: tuple[Composite, ...] = (
    Composite("prefix_attention", f"({_ATTENTION_ARGS}) -> Tensor", of="prefix_attention_forward", output=0),
)

ALL_NAMES: tuple[str, ...] = tuple(spec.name for spec in OPS)
# The ops of the C++ list (what tests/test_fuzz_*.py draw cases for) and those defined from Python.
NAMES: tuple[str, ...] = tuple(spec.name for spec in OPS if spec.schema is None)
PYTHON_NAMES: tuple[str, ...] = tuple(spec.name for spec in OPS if spec.schema is not None)
BY_NAME: dict[str, OpSpec] = {spec.name: spec for spec in OPS}
