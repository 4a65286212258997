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

__all__ = ["MASK_DTYPES", "MODES", "MaskInit", "ModeState", "TASK_NAME", "current_task", "init_mask", "train_dtype", "use_task"]

MaskInit = Any  # "ones" | ("uniform", low, high)
TASK_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")
MASK_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# The task chosen by ``use_task`` for the current thread / asyncio task (None: the layer's own).
_CONTEXT_TASK: contextvars.ContextVar[str | None] = contextvars.ContextVar("softtf_task", default=None)
MODES = ("single", "disabled", "superposed", "per_sample")


@dataclass(frozen=True)
class ModeState:
    """A snapshot of a layer's selection (mode, active task, mixture), for :meth:`SoftLinear.restore_mode`."""

    mode: str
    active_task: str | None
    mix_names: tuple[str, ...] = ()
    alpha: Tensor | None = None
    task_ids: Tensor | None = None


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
    token = _CONTEXT_TASK.set(name)
    try:
        yield
    finally:
        _CONTEXT_TASK.reset(token)


def current_task() -> str | None:
    """The task chosen by the innermost :func:`use_task` of this thread / asyncio task, or ``None``."""
    return _CONTEXT_TASK.get()
