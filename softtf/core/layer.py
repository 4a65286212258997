"""SoftLinear: a frozen nn.Linear with one learnable soft mask per task (Soft-TransFormers).

    y = x (W ⊙ M_t)^T + b

The base layer's parameters never train. Each task owns a real-valued mask shaped like W; the
mask of the task being trained is an fp32 ``nn.Parameter``; once frozen it moves into a stacked
buffer ``frozen_masks`` [T, out, in] stored in ``mask_dtype`` (bf16/fp16 halve the bytes per task).
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from softtf_kernels import ops
from softtf_kernels.common import acc_dtype
from softtf_kernels.ops import superposed_linear

__all__ = ["LinearWrapper", "SoftLinear", "MaskInit", "ModeState", "MaskSwitch", "init_mask", "preserve_modes", "soft_layers", "superposed_linear", "train_dtype"]

MaskInit = Any  # "ones" | ("uniform", low, high)
_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")
_MASK_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
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
        m = torch.empty(shape, dtype=dtype, device=device)
        return m.uniform_(low, high, generator=generator)
    raise ValueError(f"init must be 'ones' or ('uniform', low, high), got {init!r}")


class LinearWrapper(nn.Module):
    """A module built around a frozen ``nn.Linear`` (``base_layer``), PEFT-style: the shape and
    parameters of the wrapped layer read through."""

    def __init__(self, base_layer: nn.Linear):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"{type(self).__name__}: base_layer must be an nn.Linear, got {type(base_layer).__name__}")
        base_layer.requires_grad_(False)
        self.base_layer = base_layer

    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features


class SoftLinear(LinearWrapper):
    """Wraps a frozen ``nn.Linear`` and applies the active task's soft mask to its weight.

    Args:
        base_layer: the pretrained ``nn.Linear``; its parameters are frozen in place.
        mask_dtype: dtype of frozen masks (default: the weight's dtype). Trainable masks are fp32.
    """

    def __init__(self, base_layer: nn.Linear, mask_dtype: torch.dtype | None = None):
        if mask_dtype is not None and mask_dtype not in _MASK_DTYPES:  # before base_layer is touched
            raise TypeError(f"SoftLinear: mask_dtype must be one of {_MASK_DTYPES}, got {mask_dtype}")
        super().__init__(base_layer)
        mask_dtype = base_layer.weight.dtype if mask_dtype is None else mask_dtype
        if mask_dtype not in _MASK_DTYPES:
            raise TypeError(f"SoftLinear: mask_dtype must be one of {_MASK_DTYPES}, got {mask_dtype}")
        self.mask_dtype = mask_dtype
        self.masks = nn.ParameterDict()  # unfrozen tasks
        w = base_layer.weight
        self.register_buffer("frozen_masks", torch.empty(0, *w.shape, dtype=mask_dtype, device=w.device))
        self._frozen: list[str] = []  # names of frozen_masks rows, in order
        self._order: list[str] = []  # every task, in the order added
        # What the next forward computes; replaced whole (never mutated) so a snapshot stays valid.
        self._state = ModeState("single", None)

    # ------------------------------------------------------------------ properties
    @property
    def mode(self) -> str:
        """``"single"``, ``"disabled"``, ``"superposed"`` or ``"per_sample"``."""
        return self._state.mode

    @property
    def active_task(self) -> str | None:
        """The task of single-task mode (``None`` before any task is selected)."""
        return self._state.active_task

    @property
    def tasks(self) -> list[str]:
        """Every task, in the order it was added."""
        return list(self._order)

    @property
    def frozen_tasks(self) -> list[str]:
        return list(self._frozen)

    def is_frozen(self, name: str) -> bool:
        self._check_known(name)
        return name in self._frozen

    # ------------------------------------------------------------------ task lifecycle
    def _check_known(self, name: str) -> None:
        if name not in self._order:
            known = ", ".join(self._order) or "none"
            raise KeyError(f"SoftLinear: unknown task {name!r} (known tasks: {known})")

    def add_task(self, name: str, init: MaskInit = "ones", generator: torch.Generator | None = None) -> None:
        """Add a task with a fresh trainable mask and make it the active task."""
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"SoftLinear: task name must match [A-Za-z0-9_-]+, got {name!r}")
        if name in self._order:
            raise ValueError(f"SoftLinear: task {name!r} already exists")
        w = self.weight
        mask = init_mask(w.shape, init, train_dtype(w.dtype), w.device, generator)
        self.masks[name] = nn.Parameter(mask)
        self._order.append(name)
        self.set_task(name)

    def set_task(self, name: str, train: bool | None = None) -> None:
        """Make ``name`` the active task (single-task mode). Its mask trains unless it is frozen."""
        self._check_known(name)
        frozen = name in self._frozen
        if train and frozen:
            raise ValueError(f"SoftLinear: task {name!r} is frozen; its mask cannot be trained (add a new task)")
        train = (not frozen) if train is None else train
        for n, p in self.masks.items():
            p.requires_grad_(bool(train) and n == name)
        self._state = ModeState("single", name)

    def freeze_task(self, name: str) -> None:
        """Move a trained mask into the frozen store (in ``mask_dtype``); it never trains again."""
        self._check_known(name)
        if name in self._frozen:
            raise ValueError(f"SoftLinear: task {name!r} is already frozen")
        mask = self.masks.pop(name).detach().to(self.mask_dtype)
        self.frozen_masks = torch.cat([self.frozen_masks, mask.unsqueeze(0)], 0)
        self._frozen.append(name)

    def delete_task(self, name: str) -> None:
        self._check_known(name)
        if name in self._frozen:
            i = self._frozen.index(name)
            self.frozen_masks = torch.cat([self.frozen_masks[:i], self.frozen_masks[i + 1 :]], 0)
            self._frozen.pop(i)
        else:
            del self.masks[name]
        self._order.remove(name)
        active = None if self.active_task == name else self.active_task
        mode = "single" if self.mode in ("superposed", "per_sample") else self.mode
        self._state = ModeState(mode, active)

    def mask(self, name: str) -> Tensor:
        """The mask of task ``name`` (the trainable Parameter, or a row of the frozen store)."""
        self._check_known(name)
        if name in self._frozen:
            return self.frozen_masks[self._frozen.index(name)]
        return self.masks[name]

    def stacked_masks(self, names: Sequence[str] | None = None) -> Tensor:
        """Masks of ``names`` (default: all tasks) stacked into [T, out, in], in ``mask_dtype``."""
        names = self.tasks if names is None else list(names)
        if not names:
            raise ValueError("SoftLinear: no tasks to stack")
        if list(names) == self._frozen:
            return self.frozen_masks
        return torch.stack([self.mask(n).to(self.mask_dtype) for n in names])

    # ------------------------------------------------------------------ modes
    def set_superposed(self, names: Sequence[str], alpha: Tensor) -> None:
        """Superposed mode (Gradient ID): the weight is W ⊙ Σ_t α_t M_t over the tasks ``names``.

        ``alpha`` is [T] (one mixture for the batch) or [B, T] with equal rows: the forward is the
        same, but autograd then returns ∂/∂α per sample (``alpha.grad`` [B, T]).
        """
        names = list(names)
        for n in names:
            self._check_known(n)
        if not isinstance(alpha, Tensor) or alpha.dim() not in (1, 2) or alpha.shape[-1] != len(names):
            got = tuple(alpha.shape) if isinstance(alpha, Tensor) else type(alpha).__name__
            raise ValueError(f"SoftLinear: alpha must have shape [{len(names)}] or [B, {len(names)}], got {got}")
        self._state = ModeState("superposed", self.active_task, tuple(names), alpha=alpha)

    def set_per_sample(self, names: Sequence[str], task_ids: Tensor) -> None:
        """Per-sample mode: sample b of the next batches uses the mask of ``names[task_ids[b]]``."""
        names = list(names)
        for n in names:
            self._check_known(n)
        if not isinstance(task_ids, Tensor) or task_ids.dim() != 1:
            raise ValueError("SoftLinear: task_ids must be a 1-D integer tensor (one task index per sample)")
        self._state = ModeState("per_sample", self.active_task, tuple(names), task_ids=task_ids)

    def disable_masks(self) -> None:
        """Run exactly the base layer (the pretrained model) until a task is selected again."""
        self._state = ModeState("disabled", self.active_task)

    def enable_masks(self) -> None:
        """Back to single-task mode on the active task."""
        self._state = ModeState("single", self.active_task)

    def mode_state(self) -> ModeState:
        """The current selection, to hand back to :meth:`restore_mode` later."""
        return self._state

    def restore_mode(self, state: ModeState) -> None:
        """Return to a selection saved by :meth:`mode_state` (its tasks must still exist)."""
        if not isinstance(state, ModeState):
            raise TypeError(f"SoftLinear.restore_mode: expected a ModeState, got {type(state).__name__}")
        for n in (*state.mix_names, *([state.active_task] if state.active_task else [])):
            self._check_known(n)
        self._state = state

    @contextlib.contextmanager
    def superposed(self, names: Sequence[str], alpha: Tensor) -> Iterator["SoftLinear"]:
        """``with layer.superposed(names, alpha):`` superposed mode inside, the previous mode after."""
        with preserve_modes([self]):
            self.set_superposed(names, alpha)
            yield self

    @contextlib.contextmanager
    def per_sample(self, names: Sequence[str], task_ids: Tensor) -> Iterator["SoftLinear"]:
        """``with layer.per_sample(names, task_ids):`` per-sample tasks inside, the previous mode after."""
        with preserve_modes([self]):
            self.set_per_sample(names, task_ids)
            yield self

    def masks_disabled(self) -> "MaskSwitch":
        """``with layer.masks_disabled():`` exactly the base layer inside, the previous mode after."""
        return MaskSwitch([self])

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "disabled" or (self.mode == "single" and self.active_task is None):
            return self.base_layer(x)
        if self.mode == "single":
            return ops.masked_linear(x, self.weight, self.mask(self.active_task), self.bias)
        state = self._state
        masks = self.stacked_masks(state.mix_names)
        if state.mode == "per_sample":
            ids = state.task_ids
            if x.dim() < 2 or x.shape[0] != ids.shape[0]:
                raise ValueError(
                    f"SoftLinear: per-sample mode holds {ids.shape[0]} task ids but x has "
                    f"shape {tuple(x.shape)} (expected [B, ..., in] with B = {ids.shape[0]})"
                )
            return ops.mixed_task_linear(x, self.weight, masks, ids, self.bias)
        return superposed_linear(x, self.weight, masks, state.alpha, self.bias)

    # ------------------------------------------------------------------ state
    def get_extra_state(self) -> dict:
        return {
            "tasks": list(self._order),
            "frozen": list(self._frozen),
            "active_task": self.active_task,
            "mode": "disabled" if self.mode == "disabled" else "single",
            "mask_dtype": str(self.mask_dtype).removeprefix("torch."),
        }

    def set_extra_state(self, state: dict) -> None:
        self._order = list(state["tasks"])
        self._frozen = list(state["frozen"])
        self._state = ModeState(state["mode"], state["active_task"])
        self.mask_dtype = getattr(torch, state["mask_dtype"])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        # Recreate the trainable-mask slots and the frozen store's shape so load_state_dict fills them.
        extra = state_dict.get(prefix + "_extra_state")
        if extra is not None:
            w = self.weight
            for name in list(self.masks.keys()):
                del self.masks[name]
            for name in extra["tasks"]:
                if name not in extra["frozen"]:
                    self.masks[name] = nn.Parameter(torch.empty(w.shape, dtype=train_dtype(w.dtype), device=w.device))
            frozen = state_dict.get(prefix + "frozen_masks")
            if frozen is not None:
                self.frozen_masks = torch.empty_like(frozen, device=w.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        if extra is not None and self.active_task is not None and self.mode != "disabled":
            self.set_task(self.active_task)

    def extra_repr(self) -> str:
        tasks = ", ".join(
            f"{n} ({'frozen ' + str(self.mask_dtype) if n in self._frozen else 'trainable ' + str(self.masks[n].dtype)})"
            for n in self._order
        )
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"weight_dtype={self.weight.dtype}, mask_dtype={self.mask_dtype}, tasks=[{tasks}], "
            f"active={self.active_task}, mode={self.mode}"
        )


def soft_layers(model: nn.Module) -> dict[str, SoftLinear]:
    """Every ``SoftLinear`` in ``model``, by dotted name, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, SoftLinear)}


@contextlib.contextmanager
def preserve_modes(layers: Sequence[SoftLinear]) -> Iterator[None]:
    """Restore every layer's selection on exit, whatever the block set in between."""
    layers = list(layers)
    saved = [layer.mode_state() for layer in layers]
    try:
        yield
    finally:
        for layer, state in zip(layers, saved):
            layer.restore_mode(state)


class MaskSwitch:
    """Disables the masks of ``layers`` on creation, like ``torch.set_grad_enabled``: called bare
    it stays in force (until ``enable_masks``); used as a context manager it restores each layer's
    previous selection on exit."""

    def __init__(self, layers: Sequence[SoftLinear]):
        self._layers = list(layers)
        self._saved = [layer.mode_state() for layer in self._layers]
        for layer in self._layers:
            layer.disable_masks()

    def __enter__(self) -> "MaskSwitch":
        return self

    def __exit__(self, *exc) -> None:
        for layer, state in zip(self._layers, self._saved):
            layer.restore_mode(state)
