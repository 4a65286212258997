"""Which implementation runs an op: chosen per call from the backend setting, the device and the
dtypes (the choice is cached per such key, see :func:`choose`).

Setting: the process default (env ``SOFTTF_BACKEND`` at import, then :func:`set_backend`),
overridden inside ``with use_backend(name):`` blocks. ``use_backend`` is scoped by a
:class:`contextvars.ContextVar`: it affects only the current thread / asyncio task (and code run
in it), so overlapping blocks in two threads never leak into each other or into the default.

- ``auto``      CPU tensors -> C++ CPU kernel; CUDA tensors -> the first of the op's
                :data:`CUDA_AUTO_ORDER` that can run them (measured fastest first).
- ``cpp``       the C++ CPU kernel (CPU tensors only). For the ops defined from Python (the
                attention ops, table.PYTHON_NAMES) that is cpu_attention.py over ATen's C++
                flash attention.
- ``cuda``      the CUDA C++ kernel (CUDA tensors only; the extension must have been built with CUDA).
                The Python-defined ops have none (their CUDA kernel is Triton): naming it raises.
- ``triton``    the Triton kernel (CUDA tensors, or CPU tensors with TRITON_INTERPRET=1).
- ``reference`` the pure-PyTorch oracle on any device.

A backend that is named explicitly but cannot run on the tensors' device raises; it never
silently hands the work to another kernel. Inputs a kernel does not support (for instance
float64 on Triton) go to the reference, which is exact for them.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from typing import Callable, Iterator

import torch

from . import cpu_attention, reference
from . import triton as triton_ops
from .table import PYTHON_NAMES

BACKENDS = ("auto", "cpp", "cuda", "triton", "reference")


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name


# The process default (SOFTTF_BACKEND, then set_backend) and the scoped override of use_backend:
# None in the context var means "no use_backend block active here, use the default".
_default = _check_name(os.environ.get("SOFTTF_BACKEND", "auto").strip().lower() or "auto", "SOFTTF_BACKEND")
_scoped: contextvars.ContextVar[str | None] = contextvars.ContextVar("softtf_backend", default=None)


def get_backend() -> str:
    """The backend setting in effect here: the innermost active :func:`use_backend` of this
    thread / asyncio task, else the process default."""
    scoped = _scoped.get()
    return _default if scoped is None else scoped


def set_backend(name: str) -> None:
    """Set the process default: the backend wherever no :func:`use_backend` block is active
    (every thread, later calls). Inside a ``use_backend`` block the block's choice still wins."""
    global _default
    _default = _check_name(str(name).strip().lower(), "backend")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Choose a backend for the calls made inside the block, in this thread / asyncio task only:
    ``with use_backend("reference"): ...``. Blocks nest; the previous setting returns on exit."""
    token = _scoped.set(_check_name(str(name).strip().lower(), "backend"))
    try:
        yield
    finally:
        _scoped.reset(token)


@functools.lru_cache(maxsize=None)
def _has_kernel(op: str, key: str) -> bool:
    # Cached: the extension's kernels are registered once, when softtf_kernels._C is imported.
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"softtf::{op}", key)
    except RuntimeError:
        return False


def cpp_available(op: str = "masked_linear") -> bool:
    return op in cpu_attention.__all__ or _has_kernel(f"_cpp_{op}", "CPU")


def cuda_available(op: str = "masked_linear") -> bool:
    """True when the extension was built with the CUDA kernels for ``op``."""
    return _has_kernel(f"_cuda_{op}", "CUDA")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_has(op: str) -> bool:
    return op in triton_ops.__all__


def available_backends(device: str | torch.device = "cpu", op: str = "masked_linear") -> list[str]:
    """Backends that can run ``op`` on tensors of ``device`` here."""
    dev = torch.device(device).type
    names = []
    if dev == "cpu" and cpp_available(op):
        names.append("cpp")
    if dev == "cuda" and cuda_available(op):
        names.append("cuda")
    if triton_available() and (dev == "cuda" or (dev == "cpu" and triton_interpreter())) and _triton_has(op):
        names.append("triton")
    names.append("reference")
    return names


# What `auto` runs on CUDA tensors, per op, fastest first as measured on an H100 (bf16 and fp32,
# ViT-B/BERT-base shapes; tools/gpu_check.sh, figures in bench/README.md "Measured on an H100").
# The masked-linear family: cuBLAS on W ⊙ M (the reference) beat both fused kernels at every shape
# measured (the Triton kernel took 1.6-6x the eager time, the CUDA C++ WMMA kernel ~10x), so
# `auto` takes it there and the kernels run only when named. routed_lora: CUDA C++ beat Triton.
# int8 masks are the exception (see _cuda_auto): for them the masked-linear ops take INT8_MASK_ORDER.
_MASKED = ("reference",)
CUDA_AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "masked_linear": _MASKED, "masked_linear_grad_input": _MASKED, "masked_linear_grad_mask": _MASKED,
    "mask_mixture_grad": _MASKED, "mixed_task_linear": _MASKED, "mixed_task_linear_grad_input": _MASKED,
    "routed_lora": ("cuda", "triton", "reference"), "routed_lora_backward": ("cuda", "triton", "reference"),
    "prefix_attention_forward": ("triton", "reference"), "prefix_attention_backward": ("triton", "reference"),
}


# The ops that read masks, and what `auto` runs on CUDA when a mask is int8 (softtf_kernels.quant):
# the reference would dequantize the whole mask in memory, 4x the bytes the int8 layout exists to
# save, before cuBLAS reads it again; the Triton kernel reads the codes and dequantizes in registers.
# (Chosen for those bytes; not yet timed against the reference on a GPU.)
INT8_MASK_OPS = ("masked_linear", "masked_linear_grad_input", "mask_mixture_grad", "mixed_task_linear",
                 "mixed_task_linear_grad_input")
INT8_MASK_ORDER = ("triton", "reference")


def _cuda_auto(op: str, has_f64: bool, has_int8: bool) -> str:
    order = CUDA_AUTO_ORDER.get(op, ("triton", "cuda", "reference"))
    if has_int8 and op in INT8_MASK_OPS:
        order = INT8_MASK_ORDER
    for name in order:
        if name == "triton" and triton_available() and not has_f64 and _triton_has(op):
            return name
        if name == "cuda" and cuda_available(op) and not has_f64:
            return name
        if name == "reference":
            return name
    return "reference"


@functools.lru_cache(maxsize=None)
def choose(op: str, device: torch.device, setting: str, dtypes: tuple[torch.dtype, ...],
           triton_interpret: bool) -> str:
    """The backend that runs ``op`` on ``device`` tensors of ``dtypes`` under the backend
    ``setting``, or an error saying why the setting cannot run them.

    A pure function of its arguments, hence cached: the dispatcher is asked once per key, not per
    call (errors are not cached, they are raised again). The setting is part of the key, so
    :func:`set_backend` takes effect at the next call, and so is TRITON_INTERPRET, which the
    triton backend reads per call on CPU tensors. Only the device's type matters; the device
    itself is the key so that errors can name it.
    """
    name = setting
    device_type = device.type
    has_f64 = torch.float64 in dtypes
    has_int8 = torch.int8 in dtypes  # an int8 mask: dtypes holds every tensor argument's (registry.py)
    if name == "auto":
        if device_type == "cpu":
            name = "cpp" if cpp_available(op) else "reference"
        elif device_type == "cuda":
            name = _cuda_auto(op, has_f64, has_int8)
        else:
            name = "reference"
    if name == "reference":
        return name
    if name == "cpp":
        if device_type != "cpu":
            raise RuntimeError(f"softtf.{op}: backend 'cpp' runs CPU tensors only, got {device} tensors")
        if not cpp_available(op):
            raise RuntimeError(f"softtf.{op}: the C++ CPU kernel is not built into softtf_kernels._C")
        return name
    if name == "cuda":
        if device_type != "cuda":
            raise RuntimeError(f"softtf.{op}: backend 'cuda' runs CUDA tensors only, got {device} tensors")
        if op in PYTHON_NAMES:
            raise RuntimeError(f"softtf.{op}: has no CUDA C++ kernel (its CUDA kernel is Triton); "
                               "use backend 'triton' or 'auto'")
        if not cuda_available(op):
            raise RuntimeError(
                f"softtf.{op}: softtf_kernels._C was built without CUDA kernels for this op "
                "(reinstall with SOFTTF_FORCE_CUDA=1, see README)"
            )
        return "reference" if has_f64 else name
    # triton
    if not triton_available():
        raise RuntimeError(f"softtf.{op}: backend 'triton' needs the triton package (pip install triton)")
    if device_type == "cpu" and not triton_interpret:
        raise RuntimeError(
            f"softtf.{op}: backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported"
        )
    if device_type not in ("cpu", "cuda"):
        raise RuntimeError(f"softtf.{op}: backend 'triton' does not run {device} tensors")
    if has_f64:
        return "reference"
    if not _triton_has(op):
        raise NotImplementedError(f"softtf.{op}: no Triton kernel yet; use backend 'reference'")
    return name


def implementation(op: str, name: str) -> Callable:
    """The function of backend ``name`` for ``op``. Looked up on every call (an attribute read, cheap)
    rather than cached, so that a kernel replaced on its module (tests wrap them) is the one run."""
    if name == "reference":
        return getattr(reference, op)
    if name == "triton":
        return getattr(triton_ops, op)
    if name == "cpp" and op in cpu_attention.__all__:
        return getattr(cpu_attention, op)
    return getattr(torch.ops.softtf, f"_{name}_{op}")  # _cpp_<op> / _cuda_<op>


def resolve(op: str, device: torch.device, dtypes: tuple[torch.dtype, ...] = ()) -> tuple[str, Callable]:
    """(backend name, implementation) for one call of ``op`` on ``device``."""
    name = choose(op, device, get_backend(), tuple(dtypes), triton_interpreter())
    return name, implementation(op, name)
