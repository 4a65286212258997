"""A warning when an optimizer steps a SoftModel but misses the masks of a task added after it was built.

A ``torch.optim`` optimizer holds the parameters it was given: the mask that ``add_task`` creates
later is not among them, gets gradients and silently never trains. The library cannot see
optimizers being built, but it can see them step: every :class:`SoftModel` is watched (weakly; a
deleted model is forgotten), and one global step pre-hook
(``torch.optim.optimizer.register_optimizer_step_pre_hook``, installed by the first ``wrap``)
warns with :class:`MissedMaskWarning`, once per optimizer and task, when at a step of an optimizer

1. a trainable mask of a watched model has a gradient and the optimizer does not hold it;
2. the optimizer holds other parameters of that model (any current parameter, or the mask of an
   earlier task), so it is meant to train that model (an unrelated optimizer stays silent);
3. the mask was already missing at the optimizer's previous step, and no optimizer seen stepping
   holds it (a separate optimizer for the masks beside one for the head is fine, whichever steps first).

So a stale optimizer is reported at its second step after ``add_task``. Cost per step: one pass over
the optimizer's parameters and the watched models' masks; nothing under ``torch.compile``.
Silence it with ``warnings.filterwarnings("ignore", category=softtf.MissedMaskWarning)``.
"""
from __future__ import annotations

import os
import sys
import threading
import warnings
import weakref

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["MissedMaskWarning", "watch", "unwatch", "check_step"]


class MissedMaskWarning(UserWarning):
    """An optimizer that trains a SoftModel does not hold the trainable masks of its current task."""


_LOCK = threading.Lock()
_MODELS: weakref.WeakSet = weakref.WeakSet()
_LAYERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its SoftLinear layers by name
_HISTORY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> every mask Parameter seen (-> True)
_LAST: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> ids of the masks seen last (history is current)
_OPTIMIZERS: weakref.WeakSet = weakref.WeakSet()  # every optimizer seen stepping
_PENDING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> masks missing at its last step
_SETTLED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> masks warned about or trained elsewhere
_HOOK: list = []  # the hook's handle, once installed
_TORCH_DIR = os.path.dirname(torch.__file__)


def watch(model: nn.Module, layers: dict[str, nn.Module]) -> None:
    """Check the masks of ``model``'s ``layers`` (its SoftLinear modules by name) at every optimizer step."""
    with _LOCK:
        _MODELS.add(model)
        _LAYERS[model] = dict(layers)
        _HISTORY.setdefault(model, WeakIdKeyDictionary())
        if not _HOOK:
            _HOOK.append(register_optimizer_step_pre_hook(check_step))


def unwatch(model: nn.Module) -> None:
    """Stop checking ``model`` (it was unwrapped or merged)."""
    with _LOCK:
        _MODELS.discard(model)


def held_ids(optimizer: torch.optim.Optimizer) -> set[int]:
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


def check_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """The step pre-hook: see the module's docstring for the rule."""
    if torch.compiler.is_compiling() or not _MODELS:
        return
    with _LOCK:
        missed = _missed(optimizer)
    for task, names in missed.items():
        warnings.warn(
            f"{type(optimizer).__name__} trains a SoftModel but does not hold the trainable masks of task {task!r} "
            f"({len(names)} mask parameter{'s' if len(names) > 1 else ''}, e.g. {names[0]!r}): they get gradients and never train. It was probably "
            f"built before add_task({task!r}): build the optimizer after add_task, or add the masks with "
            "optimizer.add_param_group({'params': model.mask_parameters()})",
            MissedMaskWarning, stacklevel=_caller_level())


def _missed(optimizer: torch.optim.Optimizer) -> dict[str, list[str]]:
    """task -> names of its masks to warn about now (called under the lock)."""
    found = []  # (model, task, name, mask) of trainable masks with a gradient
    for model in list(_MODELS):
        masks = [(name, task, p) for name, layer in _LAYERS[model].items() for task, p in layer.masks.items()]
        ids = tuple(id(p) for _, _, p in masks)
        if _LAST.get(model) != ids:  # tasks were added (or loaded): remember their masks
            _LAST[model] = ids
            for _, _, p in masks:
                _HISTORY[model][p] = True
        found += [(model, task, f"{name}.masks.{task}", p) for name, task, p in masks if p.requires_grad and p.grad is not None]
    _OPTIMIZERS.add(optimizer)
    if not found:
        _PENDING.pop(optimizer, None)
        return {}
    held = held_ids(optimizer)
    pending = _PENDING.get(optimizer, {})
    settled = _SETTLED.setdefault(optimizer, WeakIdKeyDictionary())
    now_pending, meant, report = WeakIdKeyDictionary(), {}, {}
    for model, task, name, p in found:
        if id(p) in held or p in settled:
            continue
        if model not in meant:
            meant[model] = any(id(q) in held for q in model.parameters()) or any(id(q) in held for q in _HISTORY[model])
        if not meant[model]:
            continue
        if p not in pending:
            now_pending[p] = True
            continue
        settled[p] = True
        if not any(id(p) in held_ids(o) for o in list(_OPTIMIZERS) if o is not optimizer):
            report.setdefault(task, []).append(name)
    _PENDING[optimizer] = now_pending
    return report


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside this module and torch: the user's ``step()`` call."""
    frame, level = sys._getframe(1), 1
    while frame is not None and (frame.f_code.co_filename == __file__ or frame.f_code.co_filename.startswith(_TORCH_DIR)):
        frame, level = frame.f_back, level + 1
    return level
