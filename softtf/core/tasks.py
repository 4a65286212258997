"""What a task is before it meets a layer: its name rule, the dtypes and initialisation of its
masks, the snapshot of a layer's selection (:class:`ModeState`) and the per-call selection
(:func:`use_task`, a context variable: private to each thread and asyncio task)."""
from __future__ import annotations

import contextlib
import contextvars
import re
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from softtf_kernels.common import acc_dtype
from softtf_kernels.quant import QMASK_DTYPE, QMASK_TAIL, dequantize_mask, quantize_mask

__all__ = ["MASK_DTYPES", "MODES", "MaskInit", "ModeState", "SampleTasks", "TASK_NAME", "current_sample_tasks", "current_task",
           "init_mask", "train_dtype", "use_task", "use_tasks", "frozen_form", "stored_shape", "stack_masks"]

MaskInit = Any  # "ones" | ("uniform", low, high)
TASK_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")
# int8: frozen masks row-quantized (softtf_kernels.quant: codes + a per-row fp32 scale and offset)
MASK_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64, QMASK_DTYPE)
# The task chosen by ``use_task`` for the current thread / asyncio task (None: the layer's own).
_CONTEXT_TASK: contextvars.ContextVar[str | None] = contextvars.ContextVar("softtf_task", default=None)
MODES = ("single", "disabled", "superposed", "per_sample")


class SampleTasks:
    """A per-call choice of one task per sample (:func:`use_tasks`): the distinct ``names`` and
    ``ids`` [B] (indices into them), with a copy of the ids per device the layers ask for."""

    def __init__(self, names: tuple[str, ...], ids: Tensor):
        self.names, self.ids = names, ids
        self._on: dict[torch.device, Tensor] = {ids.device: ids}

    def ids_on(self, device: torch.device) -> Tensor:
        if device not in self._on:
            self._on[device] = self.ids.to(device)
        return self._on[device]


_CONTEXT_SAMPLE_TASKS: contextvars.ContextVar[SampleTasks | None] = contextvars.ContextVar("softtf_sample_tasks", default=None)


@dataclass(frozen=True)
class ModeState:
    """A snapshot of a layer's selection (mode, active task, mixture), for :meth:`SoftLinear.restore_mode`."""

    mode: str
    active_task: str | None
    mix_names: tuple[str, ...] = ()
    alpha: Tensor | None = None
    task_ids: Tensor | None = None


def stored_shape(weight_shape: Sequence[int], mask_dtype: torch.dtype) -> tuple[int, int]:
    """The shape a frozen mask is stored in: the weight's, plus the 8 tail bytes per row for int8."""
    out_f, in_f = weight_shape
    return (out_f, in_f + QMASK_TAIL) if mask_dtype == QMASK_DTYPE else (out_f, in_f)


def frozen_form(mask: Tensor, mask_dtype: torch.dtype) -> Tensor:
    """A trained mask as the frozen store keeps it: converted to ``mask_dtype`` (a copy), or
    row-quantized for int8."""
    return quantize_mask(mask) if mask_dtype == QMASK_DTYPE else mask.to(mask_dtype, copy=True)


def stack_masks(masks: Sequence[Tensor], mask_dtype: torch.dtype) -> Tensor:
    """Masks (frozen ones in ``mask_dtype``, trainable ones in their training dtype) stacked for the
    mixture ops: in ``mask_dtype``, or, when int8 frozen masks meet a trainable one, in the trainable
    one's dtype with the int8 ones dequantized (a float mask cannot become int8 differentiably)."""
    if mask_dtype == QMASK_DTYPE:
        float_ones = [m for m in masks if m.dtype != QMASK_DTYPE]
        if not float_ones:
            return torch.stack(list(masks))
        dt = float_ones[0].dtype
        return torch.stack([dequantize_mask(m, dt) if m.dtype == QMASK_DTYPE else m.to(dt) for m in masks])
    return torch.stack([m.to(mask_dtype) for m in masks])


def train_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    # Masks train in fp32 (fp64 for fp64 models): bf16 parameters would swallow small Adam steps.
    return acc_dtype(weight_dtype)


def init_mask(shape: Sequence[int], init: MaskInit, dtype: torch.dtype, device, generator=None) -> Tensor:
    """A new mask: ``"ones"`` (reproduces the pretrained layer) or ``("uniform", low, high)``."""
    if isinstance(init, str) and init == "ones":
        return torch.ones(shape, dtype=dtype, device=device)
    if isinstance(init, (tuple, list)) and len(init) == 3 and init[0] == "uniform":
        low, high = float(init[1]), float(init[2])
        if not low <= high:
            raise ValueError(f"init: uniform bounds must satisfy low <= high, got ({low}, {high})")
        big = torch.finfo(dtype).max
        if not -big <= low <= high <= big:
            raise ValueError(f"init: uniform bounds must be finite numbers within {dtype}'s range, got ({low}, {high})")
        m = torch.empty(shape, dtype=dtype, device=device)
        return m.uniform_(low, high, generator=generator)
    raise ValueError(f"init must be 'ones' or ('uniform', low, high), got {init!r}")


@contextlib.contextmanager
def use_task(name: str) -> Iterator[None]:
    """``with softtf.use_task("task0"): y = model(x)``: every SoftLinear in single-task mode runs
    task ``task0`` for the calls made inside the block, whatever task the layer has selected.

    The choice is held in a :class:`contextvars.ContextVar`, so it belongs to the current thread
    or asyncio task alone: this is the way to serve several tasks concurrently from one shared
    model (``set_task`` changes the layers themselves, which every thread sees). Modes set on a
    layer for the length of a call (superposed, per-sample, disabled: Gradient ID,
    ``predict_with_tasks``, ``PromptID.query``) still take precedence inside that call. A layer
    that does not hold ``name`` raises ``KeyError`` in its forward. Eager mode only: a
    ``torch.compile``-d forward uses the layer's own selection. It selects the task of the
    forward; which mask trains is still chosen by ``set_task``.
    """
    if not isinstance(name, str) or not TASK_NAME.match(name):
        raise ValueError(f"use_task: name must be a task name matching [A-Za-z0-9_-]+, got {name!r}")
    token, sample = _CONTEXT_TASK.set(name), _CONTEXT_SAMPLE_TASKS.set(None)  # the innermost choice wins
    try:
        yield
    finally:
        _CONTEXT_SAMPLE_TASKS.reset(sample)
        _CONTEXT_TASK.reset(token)


@contextlib.contextmanager
def use_tasks(names: str | Sequence[str]) -> Iterator[None]:
    """``with softtf.use_tasks(["a", "b", "a"]): y = model(x)``: sample b of the calls inside runs
    task ``names[b]`` in every SoftLinear in single-task mode (``mixed_task_linear``); one name (or
    one distinct name) is :func:`use_task`. Like :func:`use_task` it is a context variable, private
    to the thread / asyncio task, so concurrent calls with different tasks share no state; modes a
    layer holds for a call (superposed, per-sample, disabled) still win; eager mode only."""
    if isinstance(names, str):
        names = [names]
    names = list(names)
    if not names:
        raise ValueError("use_tasks: names must hold one task name per sample (or one name), got none")
    for n in names:
        if not isinstance(n, str) or not TASK_NAME.match(n):
            raise ValueError(f"use_tasks: task names must match [A-Za-z0-9_-]+, got {n!r}")
    distinct = tuple(dict.fromkeys(names))
    if len(distinct) == 1:
        with use_task(distinct[0]):
            yield
        return
    index = {n: i for i, n in enumerate(distinct)}
    choice = SampleTasks(distinct, torch.tensor([index[n] for n in names], dtype=torch.long))
    token, single = _CONTEXT_SAMPLE_TASKS.set(choice), _CONTEXT_TASK.set(None)
    try:
        yield
    finally:
        _CONTEXT_TASK.reset(single)
        _CONTEXT_SAMPLE_TASKS.reset(token)


def current_sample_tasks() -> SampleTasks | None:
    """The per-sample choice of the innermost :func:`use_tasks` of this thread / asyncio task."""
    return _CONTEXT_SAMPLE_TASKS.get()


def current_task() -> str | None:
    """The task chosen by the innermost :func:`use_task` of this thread / asyncio task, or ``None``."""
    return _CONTEXT_TASK.get()
