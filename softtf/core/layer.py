"""SoftLinear: a frozen nn.Linear with one learnable soft mask per task (Soft-TransFormers).

    y = x (W ⊙ M_t)^T + b

The base layer's parameters never train. Each task owns a real-valued mask shaped like W; the
mask of the task being trained is an fp32 ``nn.Parameter``; once frozen it moves into a stacked
buffer ``frozen_masks`` [T, out, in] stored in ``mask_dtype`` (bf16/fp16 halve the bytes per task),
or stays a view of a memory-mapped mask file (:mod:`softtf.core.frozen_store`).

Serving several tasks concurrently: select the task per call with ``with use_task(name):`` (a
context variable, private to each thread and asyncio task) rather than ``set_task`` (shared state
of the layer). Forward takes its snapshot of the selection and mask references under the layer's
lock and counts itself in flight until it returns (:mod:`softtf.core.serving`); structural changes
(add, freeze, delete, load) hold the lock and are refused while another thread's call is in flight.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from softtf_kernels import ops
from softtf_kernels.ops import superposed_linear

from .frozen_store import FrozenStore, StoreState
from .linear import LinearWrapper
from .modes import MaskSwitch, preserve_modes
from .serving import ServingGuard, exclusive
from .tasks import (MASK_DTYPES, TASK_NAME, frozen_form, stack_masks, stored_shape, MaskInit, ModeState, SampleTasks, current_sample_tasks, current_task, init_mask,
                    train_dtype, use_task, use_tasks)

__all__ = [
    "LinearWrapper", "SoftLinear", "MaskInit", "ModeState", "MaskSwitch", "MASK_DTYPES", "TASK_NAME", "current_task",
    "init_mask", "preserve_modes", "soft_layers", "superposed_linear", "train_dtype", "use_task", "use_tasks",
]


class SoftLinear(FrozenStore, LinearWrapper):
    """Wraps a frozen ``nn.Linear`` and applies the active task's soft mask to its weight.

    Args:
        base_layer: the pretrained ``nn.Linear``; its parameters are frozen in place.
        mask_dtype: dtype of frozen masks (default: the weight's dtype). Trainable masks are fp32.

    NaN and Inf in the inputs or in a mask are not checked: they propagate through the forward as
    in the reference ``x @ (W * M).T + b`` (task inference refuses them: see ``gradient_id``).
    Threads: choose the task per call with :func:`use_task`; add/freeze/delete/load raise
    ``RuntimeError`` while another thread's forward call is in flight (:mod:`softtf.core.serving`).
    """

    def __init__(self, base_layer: nn.Linear, mask_dtype: torch.dtype | None = None):
        if mask_dtype is not None and mask_dtype not in MASK_DTYPES:  # before base_layer is touched
            raise TypeError(f"SoftLinear: mask_dtype must be one of {MASK_DTYPES}, got {mask_dtype}")
        super().__init__(base_layer)
        mask_dtype = base_layer.weight.dtype if mask_dtype is None else mask_dtype
        if mask_dtype not in MASK_DTYPES:
            raise TypeError(f"SoftLinear: mask_dtype must be one of {MASK_DTYPES}, got {mask_dtype}")
        self.mask_dtype = mask_dtype
        self.masks = nn.ParameterDict()  # unfrozen tasks
        w = base_layer.weight
        self._init_store(stored_shape(w.shape, mask_dtype), mask_dtype, w.device)
        self._frozen: list[str] = []  # names of the frozen tasks, in order
        self._order: list[str] = []  # every task, in the order added
        # What the next forward computes; replaced whole (never mutated) so a snapshot stays valid.
        self._state = ModeState("single", None)
        self._guard = ServingGuard()  # its lock: structural changes and forward's snapshot; calls in flight
        self._owners: tuple[ServingGuard, ...] = ()  # the guard of the SoftModel serving through this layer

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        defaults = {"_guard": ServingGuard, "_owners": tuple, "_rows": lambda: None, "_mapped": frozenset}
        for name, default in defaults.items():  # pickled by an older softtf: no guard, one stacked store
            self.__dict__.setdefault(name, default())

    @property
    def _lock(self):  # copies and pickles get a fresh guard (ServingGuard.__reduce__), hence a fresh lock
        return self._guard.lock

    @property
    def serving_guard(self) -> ServingGuard:
        """The layer's lock and forward calls in flight (:mod:`softtf.core.serving`)."""
        return self._guard

    def serve_under(self, guard: ServingGuard | None) -> None:
        """Refuse changes of this layer alone while calls are in flight under ``guard`` too (the
        guard of the model that holds the layer; ``None``: no model)."""
        self._owners = () if guard is None else (guard,)

    def _structural(self, operation: str):
        return exclusive([*self._owners, self._guard], f"SoftLinear.{operation}")

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
        if not isinstance(name, str) or not TASK_NAME.match(name):
            raise ValueError(f"SoftLinear: task name must match [A-Za-z0-9_-]+, got {name!r}")
        w = self.weight
        mask = init_mask(w.shape, init, train_dtype(w.dtype), w.device, generator)
        with self._structural(f"add_task({name!r})"):
            if name in self._order:
                raise ValueError(f"SoftLinear: task {name!r} already exists")
            self.masks[name] = nn.Parameter(mask)
            self._order.append(name)
            self.set_task(name)

    def _apply(self, fn, recurse: bool = True):
        """.to(dtype) / .half() / .double(): the base layer converts; trainable masks stay in the training
        dtype (fp32; fp64 for fp64 weights), frozen ones in ``mask_dtype``; Parameters are kept (optimizers)."""
        frozen_dtype = self._buffers["frozen_masks"].dtype
        super()._apply(fn, recurse)
        want = train_dtype(self.weight.dtype)
        for p in [p for p in self.masks.values() if p.dtype != want]:
            p.data, p.grad = p.data.to(want), None if p.grad is None else p.grad.to(want)
        self.frozen_masks = self._buffers["frozen_masks"].to(frozen_dtype)
        if self._rows is not None and any(m.device != self.weight.device for m in self._rows.values()):
            self._restack(self.weight.device, frozen_dtype)  # moved: file-backed rows cannot follow
        return self

    def set_task(self, name: str, train: bool | None = None) -> None:
        """Make ``name`` the active task (single-task mode). Its mask trains unless it is frozen."""
        self._check_known(name)
        frozen = name in self._frozen
        if train and frozen:
            raise ValueError(f"SoftLinear: task {name!r} is frozen; its mask cannot be trained (add a new task)")
        train = (not frozen) if train is None else train
        with self._lock:
            for n, p in self.masks.items():
                p.requires_grad_(bool(train) and n == name)
            self._state = ModeState("single", name)

    def freeze_task(self, name: str) -> None:
        """Move a trained mask into the frozen store (in ``mask_dtype``); it never trains again."""
        with self._structural(f"freeze_task({name!r})"):
            self._check_known(name)
            if name in self._frozen:
                raise ValueError(f"SoftLinear: task {name!r} is already frozen")
            mask = frozen_form(self.masks[name].detach(), self.mask_dtype)  # a copy: an optimizer may still hold the Parameter
            self._set_store(self._staged_store(self._store_state(), self.frozen_tasks, {name: mask}, mapped=False))
            del self.masks[name]
            self._frozen.append(name)

    def delete_task(self, name: str) -> None:
        with self._structural(f"delete_task({name!r})"):
            self._check_known(name)
            if name in self._frozen:
                self._drop_frozen(name)
                self._frozen.remove(name)
            else:
                del self.masks[name]
            self._order.remove(name)
            active = None if self.active_task == name else self.active_task
            mode = "single" if self.mode in ("superposed", "per_sample") else self.mode
            self._state = ModeState(mode, active)

    def stage_tasks(self, masks: dict[str, Tensor], frozen: Sequence[str] = (), active: str | None = None,
                    mapped: bool = False) -> Callable[[], None]:
        """Prepare adding the tasks ``masks`` (name -> mask shaped like the weight; frozen tasks in
        ``mask_dtype``, the others in the training dtype) without changing the layer.

        Returns ``commit()``, which adds them at once: the trainable masks, then ``frozen`` (in that
        order) in the frozen store, and selects ``active`` (default: the last new task). Staging
        every layer of a model before committing any makes a load all-or-nothing. ``mapped``: the
        frozen masks are views of a memory-mapped file (CPU layers only), kept as they are rather
        than copied (:mod:`softtf.core.frozen_store`); trainable masks are always copied."""
        names, frozen, w = list(masks), list(frozen), self.weight
        for n in names:
            if not isinstance(n, str) or not TASK_NAME.match(n):
                raise ValueError(f"SoftLinear.stage_tasks: task name must match [A-Za-z0-9_-]+, got {n!r}")
        with self._lock:
            order, old_frozen, store = list(self._order), list(self._frozen), self._store_state()
        if mapped and w.device.type != "cpu":
            raise ValueError(f"SoftLinear.stage_tasks: mapped masks serve CPU layers only; this layer is on {w.device}")
        clash = [n for n in names if n in order]
        if clash:
            raise ValueError(f"SoftLinear.stage_tasks: tasks {clash} already exist (tasks: {order})")
        if len(set(frozen)) != len(frozen) or not set(frozen) <= set(names):
            raise ValueError(f"SoftLinear.stage_tasks: frozen must list new tasks ({names}) once each, got {frozen}")
        if active is not None and active not in names + order:
            raise ValueError(f"SoftLinear.stage_tasks: active must be None or a task, got {active!r}")
        for n, m in masks.items():
            want = self.mask_dtype if n in frozen else train_dtype(w.dtype)
            shape = stored_shape(w.shape, want)
            if not isinstance(m, Tensor) or tuple(m.shape) != shape or m.dtype != want:
                got = (tuple(m.shape), m.dtype) if isinstance(m, Tensor) else type(m).__name__
                raise ValueError(f"SoftLinear.stage_tasks: mask {n!r} must be a {want} tensor of shape {shape}, got {got}")
        params = {n: nn.Parameter(m.detach().to(w.device, copy=True)) for n, m in masks.items() if n not in frozen}
        store = self._staged_store(store, old_frozen, {n: masks[n].detach().to(w.device) for n in frozen}, mapped)
        select = active if active is not None else (names[-1] if names else None)

        def commit() -> None:
            with self._structural(f"stage_tasks commit of {names}"):
                if self._order != order or self._frozen != old_frozen:
                    raise RuntimeError("SoftLinear.stage_tasks: the layer's tasks changed since staging; stage again")
                for n, p in params.items():
                    self.masks[n] = p
                self._set_store(store)
                self._frozen.extend(frozen)
                self._order.extend(names)
                if select is not None:
                    self.set_task(select)

        return commit

    def mask(self, name: str) -> Tensor:
        """The mask of task ``name`` (the trainable Parameter, or a row of the frozen store: for
        ``mask_dtype`` int8 the stored codes + scale/offset, ``softtf_kernels.quant.dequantize_mask``
        gives the values)."""
        with self._lock:
            return self._mask_of(name)

    def stacked_masks(self, names: Sequence[str] | None = None) -> Tensor:
        """Masks of ``names`` (default: all tasks) stacked into [T, out, in], in ``mask_dtype``."""
        with self._lock:
            refs = self._mask_refs(self.tasks if names is None else names)
        return self._stack(refs)

    # The helpers below read the task structure: callers hold the lock (or are being traced).
    def _mask_of(self, name: str) -> Tensor:
        self._check_known(name)
        if name in self._frozen:
            return self._frozen_mask(name)
        return self.masks[name]

    def _mask_refs(self, names: Sequence[str]) -> Tensor | list[Tensor]:
        # The frozen store itself when ``names`` are exactly its rows, else each task's mask.
        names = list(names)
        if not names:
            raise ValueError("SoftLinear: no tasks to stack")
        whole = self._whole_store(names)
        return whole if whole is not None else [self._mask_of(n) for n in names]

    def _stack(self, refs: Tensor | list[Tensor]) -> Tensor:
        return refs if isinstance(refs, Tensor) else stack_masks(refs, self.mask_dtype)

    # ------------------------------------------------------------------ modes
    def set_superposed(self, names: Sequence[str], alpha: Tensor) -> None:
        """Superposed mode (Gradient ID): the weight is W ⊙ Σ_t α_t M_t over the tasks ``names``.

        ``alpha`` is [T] (one mixture for the batch) or [B, T] (sample b uses W ⊙ Σ_t α_bt M_t;
        autograd returns ∂/∂α per sample, ``alpha.grad`` [B, T]). Equal rows cost one masked GEMM;
        rows that differ (a router's mixture, SAPT over masks) cost T masked GEMMs, never a masked
        weight per sample (``softtf_kernels.ops.superposed_linear``).
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
        if torch.compiler.is_compiling():  # traced: no lock, nothing counted; the context variables are guarded
            return self._run(x, *self._select(current_task() or self._state.active_task, current_sample_tasks()))
        with self._lock:  # a structural change lands wholly before this snapshot, or is refused until the call ends
            snapshot = self._select(current_task() or self._state.active_task, current_sample_tasks())
            self._guard.enter()
        try:
            return self._run(x, *snapshot)
        finally:
            self._guard.leave()

    def _run(self, x: Tensor, state: ModeState, mask: Tensor | None, refs: Tensor | list[Tensor] | None) -> Tensor:
        """The forward of a snapshot: (selection, mask of single-task mode, masks of a mixture);
        the mask is the :func:`use_task` task's if one is set, both are None when the base layer runs."""
        if mask is None and refs is None:
            return self.base_layer(x)
        if refs is None:
            return ops.masked_linear(x, self.weight, mask, self.bias)
        masks = self._stack(refs)
        if state.mode == "per_sample":
            ids = state.task_ids
            if x.dim() < 2 or x.shape[0] != ids.shape[0]:
                raise ValueError(
                    f"SoftLinear: per-sample mode holds {ids.shape[0]} task ids but x has "
                    f"shape {tuple(x.shape)} (expected [B, ..., in] with B = {ids.shape[0]})"
                )
            return ops.mixed_task_linear(x, self.weight, masks, ids, self.bias)
        return superposed_linear(x, self.weight, masks, state.alpha, self.bias)

    def _select(self, task: str | None, sample_tasks: SampleTasks | None = None
                ) -> tuple[ModeState, Tensor | None, Tensor | list[Tensor] | None]:
        state = self._state
        if state.mode == "single" and sample_tasks is not None:  # use_tasks: this call's tasks per sample
            names = sample_tasks.names
            chosen = ModeState("per_sample", state.active_task, names, task_ids=sample_tasks.ids_on(self.weight.device))
            return chosen, None, self._mask_refs(names)
        if state.mode == "single":
            return state, None if task is None else self._mask_of(task), None
        if state.mode == "disabled":
            return state, None, None
        return state, None, self._mask_refs(state.mix_names)

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
        with self._structural("load_state_dict"):
            self._order = list(state["tasks"])
            self._frozen = list(state["frozen"])
            self._state = ModeState(state["mode"], state["active_task"])
            self.mask_dtype = getattr(torch, state["mask_dtype"])

    def _load_from_state_dict(self, *args) -> None:
        with self._structural("load_state_dict"):
            self._load_tasks_from_state_dict(*args)

    def _load_tasks_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
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
                self._set_store(StoreState(torch.empty_like(frozen, device=w.device), None, frozenset()))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        if extra is not None and self.active_task is not None and self.mode != "disabled":
            self.set_task(self.active_task)

    def extra_repr(self) -> str:
        kinds = {n: f"frozen {self.mask_dtype}{' mapped' * (n in self._mapped)}" if n in self._frozen else f"trainable {self.masks[n].dtype}" for n in self._order}
        tasks = ", ".join(f"{n} ({kind})" for n, kind in kinds.items())
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weight_dtype={self.weight.dtype}, mask_dtype={self.mask_dtype}, tasks=[{tasks}], "
                f"active={self.active_task}, mode={self.mode}")


def soft_layers(model: nn.Module) -> dict[str, SoftLinear]:
    """Every ``SoftLinear`` in ``model``, by dotted name, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, SoftLinear)}
