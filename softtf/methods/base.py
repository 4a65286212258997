"""The protocol every continual-learning method implements; the runner knows nothing more.

A method adapts a :class:`~softtf.cl.classifier.ContinualClassifier`-like model (``backbone``,
``head``, ``features``) task after task. The runner owns the data, the shared head, the optimizer,
Prompt-ID keys and evaluation; it calls, per task::

    params = method.begin_task(t, name)      # parameters to train besides the head and keys
    loss = method.loss(method.forward(x) ⊙ class mask, y)
    method.end_task(t, name)

and at test time ``method.forward_tasks(x, task_index, tasks)`` (logits with sample b run as task
``tasks[task_index[b]]``), ``method.infer_tasks(...)`` for Gradient ID and ``method.pretrained()``
for the Prompt-ID query. ``save`` / ``load`` checkpoint the method's state after a task; ``info()``
says what the method trains (parameters per task), for results and same-budget comparisons.

Adding a method: one module in this package with a :func:`~softtf.methods.registry.register`-ed
subclass, imported in ``softtf/methods/__init__.py``.
"""
from __future__ import annotations

import contextlib
from typing import Callable, ClassVar, ContextManager, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.batch import take_rows
from ..core.config import SoftConfig, resolve_config
from ..core.files import load_tensors, save_tensors
from ..core.model import SoftModel, load_masks

__all__ = ["ContinualMethod", "MethodOptions", "grouped_forward", "checkpoint_extras", "load_mask_checkpoint", "target_layer_names", "target_linears",
           "EXTRA_PREFIX", "MATCHED"]

EXTRA_PREFIX = "extra::"  # checkpoint keys of tensors the runner owns (head, Prompt-ID keys)
MATCHED = "matched"  # a size option: as many trainable parameters per task as Soft-TF's masks


class MethodOptions(Protocol):
    """The run options methods read (``softtf.cl.RunConfig`` provides them)."""

    seed: int
    soft_config: dict | None
    lora_r: int | str  # an int or MATCHED
    lora_alpha: float
    adapter_bottleneck: int | str  # an int or MATCHED
    task_id: str  # the run's task inference (methods that combine parts per task read it)
    masks: bool  # prompt methods: add Soft-TF masks (``soft_config``'s layers)
    prompt_activation: str  # NoRGa's gate activation


class ContinualMethod:
    """Base class of the methods. Subclasses set ``name`` and ``task_id_modes`` and implement
    :meth:`begin_task`, :meth:`forward_tasks`, :meth:`state` and :meth:`load`."""

    name: ClassVar[str] = ""
    task_id_modes: ClassVar[tuple[str, ...]] = ()  # task inference the method supports
    default_task_id: ClassVar[str] = "prompt"
    # Some trainable parameters may get no gradient in a training step (a prompt pool's unselected
    # prompts): data-parallel training must then look for them (DDP's find_unused_parameters).
    may_skip_parameters: ClassVar[bool] = False

    def __init__(self, classifier: nn.Module, options: MethodOptions):
        self.clf, self.options = classifier, options
        self.trained: list[str] = []

    @classmethod
    def resolve_task_id(cls, options: MethodOptions) -> str:
        """The task inference a run uses when it names none (``default_task_id`` unless the
        options change what the method needs)."""
        return cls.default_task_id

    @classmethod
    def check_options(cls, options: MethodOptions) -> None:
        """Refuse options the method cannot honour (``ValueError`` naming the option)."""
        if getattr(options, "masks", False):
            raise ValueError(f"RunConfig: masks=True (--masks) adds Soft-TF masks to a prompt method; "
                             f"method {cls.name!r} is not one")

    # ---------------------------------------------------------------- training
    def begin_task(self, t: int, name: str) -> list[nn.Parameter]:
        """Prepare task ``t`` (called ``name``); return the parameters to train besides the head."""
        raise NotImplementedError

    def forward(self, inputs) -> Tensor:
        """Training-time logits [B, C] of the current task."""
        return self.clf(inputs)

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """The training loss on logits already restricted to the task's classes."""
        return F.cross_entropy(logits, targets)

    def end_task(self, t: int, name: str) -> None:
        """Task ``t`` is learned: freeze what must not change any more."""
        self.trained.append(name)

    # ---------------------------------------------------------------- evaluation
    def forward_tasks(self, inputs, task_index: Tensor | None, tasks: list[str]) -> Tensor:
        """Logits [B, C] with sample b run as task ``tasks[task_index[b]]`` (``None``: no task)."""
        raise NotImplementedError

    def infer_tasks(self, inputs, tasks: list[str], forward_fn: Callable, rule: str, k_shot: int, topk: int | None) -> Tensor:
        """Gradient ID (``softtf.gradient_id`` rule, k-shot, entropy top-k): indices into ``tasks``
        [B]. Only methods with task masks support it."""
        raise ValueError(f"method {self.name!r} does not support Gradient ID")

    def info(self) -> dict:
        """JSON-ready facts about the method as configured (e.g. ``params_per_task``)."""
        return {}

    def pretrained(self) -> ContextManager:
        """A context in which the classifier's backbone is the pretrained network (Prompt-ID
        queries). Default: the backbone is never adapted in place."""
        return contextlib.nullcontext()

    # ---------------------------------------------------------------- checkpoints
    def state(self) -> tuple[dict[str, Tensor], dict[str, str]]:
        """The method's tensors and string metadata after the last finished task."""
        raise NotImplementedError

    def save(self, path: str, extra: dict[str, Tensor]) -> None:
        """Checkpoint after a task: the method's tensors + ``extra`` (head, keys), atomically."""
        tensors, meta = self.state()
        save_tensors(path, {**tensors, **{EXTRA_PREFIX + k: v for k, v in extra.items()}}, meta)

    def load(self, path: str, tasks: list[str]) -> dict[str, Tensor]:
        """Restore the state saved after ``tasks``; return the runner's extras."""
        tensors = load_tensors(path)
        self.load_state(tensors, path, tasks)
        self.trained = list(tasks)
        return checkpoint_extras(tensors)

    def load_state(self, tensors: dict[str, Tensor], path: str, tasks: list[str]) -> None:
        raise NotImplementedError


def checkpoint_extras(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The runner's tensors of a checkpoint, keys without the ``extra::`` prefix."""
    return {k[len(EXTRA_PREFIX):]: v for k, v in tensors.items() if k.startswith(EXTRA_PREFIX)}


def load_mask_checkpoint(soft: SoftModel, path: str, tasks: list[str],
                         prefix: str | None = None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Restore ``soft``'s masks from a mask-file checkpoint that must hold exactly ``tasks``; returns
    (the method's own extras, keys starting with ``prefix``, none without one; the runner's extras)."""
    extras = load_masks(soft, path)
    if soft.tasks != tasks:
        raise ValueError(f"resume: checkpoint {path!r} holds tasks {soft.tasks}, expected {tasks}")
    mine = {k: extras.pop(k) for k in list(extras) if k.startswith(prefix)} if prefix else {}
    return mine, extras


def grouped_forward(clf: nn.Module, inputs, task_index: Tensor, select: Callable[[int], None]) -> Tensor:
    """Logits [B, C] computed task by task: ``select(t)`` then ``clf`` on the samples of task t."""
    out = None
    for t in torch.unique(task_index).tolist():
        rows = (task_index == t).nonzero().squeeze(1)
        select(int(t))
        logits = clf(take_rows(inputs, rows))
        if out is None:
            out = logits.new_empty(task_index.shape[0], logits.shape[1])
        out[rows] = logits
    return out


def target_layer_names(backbone: nn.Module, soft_config: dict | None) -> list[str]:
    """The ``nn.Linear`` modules Soft-TF would mask (baselines adapt the very same layers)."""
    soft_cfg = SoftConfig.from_dict(soft_config) if soft_config else SoftConfig()
    soft_cfg.modules_to_save = soft_cfg.modules_to_save or []
    return resolve_config(backbone, soft_cfg)[1]


def target_linears(backbone: nn.Module, soft_config: dict | None) -> dict[str, nn.Linear]:
    """The modules of :func:`target_layer_names`, by name (Soft-TF trains ``out * in`` mask entries
    per task on each: the budget the ``"matched"`` sizes of the baselines meet)."""
    return {n: backbone.get_submodule(n) for n in target_layer_names(backbone, soft_config)}
