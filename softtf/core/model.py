"""SoftModel: a pretrained model whose targeted ``nn.Linear`` layers became ``SoftLinear`` (PEFT-like).

    >>> import timm, softtf
    >>> vit = timm.create_model("vit_base_patch16_224", pretrained=False)
    >>> model = softtf.wrap(vit)                  # qkv + proj of blocks 9, 10, 11
    >>> model.add_task("task0")                   # all-ones mask: outputs equal the pretrained model
    >>> model.print_trainable_parameters()
    >>> ...train...; model.freeze_task("task0")
    >>> with model.disable_masks():               # the pretrained model, e.g. for Prompt-ID queries
    ...     q = model.forward_features(x)
    >>> model.save_masks("masks.safetensors")
    >>> vit = model.unwrap()                      # the original nn.Linear modules are back
    >>> # or: vit = model.merge_and_unload("task0")  # plain nn.Linear weights W ⊙ M_task0, for deployment

Every lifecycle method applies to every ``SoftLinear`` of the model, so all layers always hold
the same tasks in the same order. While other threads' calls into the model are in flight
(``model(x)``, or a method of the wrapped model such as ``model.forward_features``), structural
changes (add, freeze, delete, load, merge, unwrap) raise ``RuntimeError`` before changing anything
(:mod:`softtf.core.serving`).
"""
from __future__ import annotations

import functools
import inspect
import json
import os
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from .batch import call_batch_size
from .config import SoftConfig, config_with, resolve_config
from .layer import MaskSwitch, SoftLinear, soft_layers, use_task, use_tasks
from .files import atomic_write
from .mask_file import add_tasks_from_file, read_mask_info, write_mask_file
from .merge import merge_layer
from .optimizer_check import unwatch, watch
from .saved_modules import SAVED_PREFIX, SavedModulesLoad
from .serving import ServingGuard, counted, exclusive, refuse_if_serving

__all__ = ["SAVED_PREFIX", "SoftModel", "wrap", "set_submodule", "save_masks", "load_masks", "load_soft_model",
           "layers_of"]

# Library-level persistence of the wrapped model (Hugging Face, timm) never runs through a SoftModel.
_NOT_PASSED_THROUGH = frozenset({"push_to_hub", "save_model", "save_checkpoint"})
PRETRAINED_MASKS, PRETRAINED_CONFIG = "masks.safetensors", "softtf_config.json"


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` of ``root`` by ``module``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


class SoftModel(nn.Module):
    """A model with soft-masked linear layers and a PEFT-like task lifecycle.

    Build it with :func:`wrap`. Calling it calls the wrapped model; attribute look-ups that
    ``SoftModel`` does not define fall through to the wrapped model (``forward_features``,
    ``config``, ...). The wrapped model is ``self.model`` (its modules are modified in place).
    """

    def __init__(self, model: nn.Module, config: SoftConfig | None = None):
        super().__init__()
        self._guard = ServingGuard()  # calls in flight through this model (forward, the wrapped model's methods)
        if not isinstance(model, nn.Module):
            raise TypeError(f"wrap: model must be an nn.Module, got {type(model).__name__}")
        if isinstance(model, SoftModel):
            raise ValueError("wrap: model is already a SoftModel")
        if soft_layers(model):
            raise ValueError(f"wrap: model already contains SoftLinear layers: {list(soft_layers(model))[:4]}")
        resolved, names = resolve_config(model, config)
        # Record the trainability to restore on unwrap(), then freeze everything.
        self._orig_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        model.requires_grad_(False)
        for n in names:
            base = model.get_submodule(n)
            set_submodule(model, n, SoftLinear(base, mask_dtype=resolved.mask_dtype))
            model.get_submodule(n).serve_under(self._guard)
        modules = dict(model.named_modules())
        self._saved_modules = sorted(
            n for n in modules if n and any(n == h or n.endswith("." + h) for h in resolved.modules_to_save)
        )
        for n in self._saved_modules:
            modules[n].requires_grad_(True)
        self.model = model
        self.soft_config = resolved
        self._layer_names = list(names)
        self._unwrapped = False
        watch(self, self.soft_layers)  # warns when an optimizer that trains this model misses a later task's masks

    # ------------------------------------------------------------------ plumbing
    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_guard", ServingGuard())  # pickled by an older softtf (no guard then)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            if name in _NOT_PASSED_THROUGH:  # the wrapped model's would save it without the masks' meaning
                raise AttributeError(f"SoftModel.{name} is not supported: the wrapped model's {name} would persist "
                                     "its SoftLinear layers half-understood. Use save_pretrained(dir) / "
                                     "SoftModel.from_pretrained(base_model, dir), or save_masks / load_soft_model") from None
            value = getattr(self.model, name)
            if inspect.ismethod(value) and value.__self__ is self.model:  # forward_features, generate, ...
                return counted(value, self._guard)  # a call into the model: in flight while it runs
            return value

    def forward(self, *args, task_names: str | Sequence[str] | None = None, **kwargs):
        """Call the wrapped model. ``task_names``: the task of this call, one name for every sample
        or one per sample (PEFT's ``adapter_names``): chosen through :func:`use_tasks`, a
        per-call choice that no other thread sees, rather than by changing the layers."""
        self._check_live()
        with self._guard.call():  # in flight until it returns: structural changes are refused meanwhile
            return self._forward(args, kwargs, task_names)

    def _forward(self, args: tuple, kwargs: dict, task_names: str | Sequence[str] | None):
        if task_names is None:
            return self.model(*args, **kwargs)
        names = [task_names] if isinstance(task_names, str) else list(task_names)
        unknown = sorted(set(names) - set(self.tasks))
        if unknown:
            raise ValueError(f"SoftModel: task_names has unknown tasks {unknown} (tasks: {self.tasks or 'none'})")
        n = call_batch_size(args, kwargs)
        if len(names) > 1 and n is not None and len(names) != n:
            raise ValueError(f"SoftModel: task_names has {len(names)} names for a batch of {n} samples "
                             "(give one name per sample, or one name)")
        with use_tasks(names):
            return self.model(*args, **kwargs)

    @property
    def serving_guard(self) -> ServingGuard:
        """The model's lock and its calls in flight (``serving_guard.in_flight()``: other threads')."""
        return self._guard

    def _exclusive(self, operation: str):
        """Hold the model's lock and every layer's; refuse if another thread's call is in flight."""
        layers = [] if self._unwrapped else self._layers()
        return exclusive([self._guard, *(layer.serving_guard for layer in layers)], f"SoftModel.{operation}")

    def _check_live(self) -> None:
        if self._unwrapped:
            raise RuntimeError("SoftModel: this model was unwrapped; wrap the returned model again to use masks")

    @property
    def soft_layers(self) -> dict[str, SoftLinear]:
        """The ``SoftLinear`` layers by name (relative to the wrapped model), in model order."""
        self._check_live()
        return {n: self.model.get_submodule(n) for n in self._layer_names}

    @property
    def layer_names(self) -> list[str]:
        return list(self._layer_names)

    def _layers(self) -> list[SoftLinear]:
        return list(self.soft_layers.values())

    def _first(self) -> SoftLinear:
        return self._layers()[0]

    # ------------------------------------------------------------------ task lifecycle
    @property
    def tasks(self) -> list[str]:
        """Every task, in the order it was added."""
        return self._first().tasks

    @property
    def frozen_tasks(self) -> list[str]:
        return self._first().frozen_tasks

    @property
    def active_task(self) -> str | None:
        return self._first().active_task

    def add_task(self, name: str, init: Any = None, seed: int | None = None) -> None:
        """Add a task to every masked layer and make it active (its masks train).

        Args:
            name: task name, ``[A-Za-z0-9_-]+``, unique.
            init: ``"ones"`` or ``("uniform", low, high)``; default: ``config.mask_init``.
            seed: seeds the uniform init (one generator, layers in model order).
        """
        self._check_live()
        init = self.soft_config.mask_init if init is None else SoftConfig(mask_init=init).mask_init
        with self._exclusive(f"add_task({name!r})"):
            if name in self.tasks:
                raise ValueError(f"SoftModel.add_task: task {name!r} already exists (tasks: {self.tasks})")
            layers = self._layers()
            gen = None
            if seed is not None:
                gen = torch.Generator(device=layers[0].weight.device)
                gen.manual_seed(int(seed))
            for layer in layers:
                layer.add_task(name, init=init, generator=gen)

    def set_task(self, name: str, train: bool | None = None) -> None:
        """Select ``name`` in every layer (single-task mode); its masks train unless it is frozen."""
        self._check_live()
        self._check_task(name, "set_task")
        for layer in self._layers():
            layer.set_task(name, train=train)

    def freeze_task(self, name: str) -> None:
        """Freeze ``name`` in every layer: its masks move into the frozen store and never train again."""
        self._check_live()
        with self._exclusive(f"freeze_task({name!r})"):
            self._check_task(name, "freeze_task")
            if name in self.frozen_tasks:
                raise ValueError(f"SoftModel.freeze_task: task {name!r} is already frozen")
            for layer in self._layers():
                layer.freeze_task(name)

    def delete_task(self, name: str) -> None:
        """Remove ``name`` from every layer."""
        self._check_live()
        with self._exclusive(f"delete_task({name!r})"):
            self._check_task(name, "delete_task")
            for layer in self._layers():
                layer.delete_task(name)

    def use_task(self, name: str):
        """``with model.use_task("t0"): y = model(x)``: task ``t0`` for the calls made in this
        thread or asyncio task only (a context variable; see :func:`softtf.use_task`), whatever
        task is selected: the way to serve several tasks concurrently from one model."""
        self._check_live()
        self._check_task(name, "use_task")
        return use_task(name)

    def _check_task(self, name: str, where: str) -> None:
        if name not in self.tasks:
            raise KeyError(f"SoftModel.{where}: unknown task {name!r} (tasks: {self.tasks or 'none'})")

    def disable_masks(self) -> MaskSwitch:
        """Run the pretrained model. Use as ``with model.disable_masks(): ...`` to restore the
        previous modes afterwards; called bare it stays disabled until :meth:`enable_masks`."""
        self._check_live()
        return MaskSwitch(self._layers())

    def enable_masks(self) -> None:
        """Back to single-task mode on the active task."""
        self._check_live()
        for layer in self._layers():
            layer.enable_masks()

    def mask_parameters(self) -> list[nn.Parameter]:
        """The trainable mask parameters of the active task (for an optimizer)."""
        return [p for layer in self._layers() for p in layer.masks.values() if p.requires_grad]

    # ------------------------------------------------------------------ parameters
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, total)`` parameter counts; total counts base weights, masks and frozen masks."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters()) + sum(layer.frozen_numel() for layer in self._layers())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        pct = 100.0 * trainable / max(total, 1)
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {pct:.4f}")

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.parameters() if p.requires_grad)

    # ------------------------------------------------------------------ save / load / unwrap
    def saved_module_state(self) -> dict[str, Tensor]:
        """State (parameters and buffers) of the modules kept trainable besides the masks
        (``modules_to_save``), keyed ``"<module>.<name>"``."""
        return {f"{n}.{k}": t for n in self._saved_modules for k, t in self.model.get_submodule(n).state_dict().items()}

    def save_masks(self, path: str | os.PathLike, extra: dict[str, Tensor] | None = None, metadata: dict | None = None) -> None:
        """Write masks + config + task names + the state of ``modules_to_save`` (the head) to ``path``
        (safetensors, atomic). See :mod:`softtf.core.mask_file`."""
        self._check_live()
        extra = dict(extra or {})
        reserved = [k for k in extra if isinstance(k, str) and k.startswith(SAVED_PREFIX)]
        if reserved:
            raise ValueError(f"save_masks: extra keys starting with {SAVED_PREFIX!r} are reserved for modules_to_save, "
                             f"got {reserved[:4]}")
        extra.update({SAVED_PREFIX + k: v for k, v in self.saved_module_state().items()})
        write_mask_file(self.soft_layers, self.soft_config, path, extra=extra, metadata=metadata)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """PEFT-style: write ``masks.safetensors`` (masks, config, tasks, head; atomic) and a readable
        ``softtf_config.json`` into ``directory`` (created if missing). The base model is not saved."""
        self._check_live()
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        self.save_masks(os.path.join(directory, PRETRAINED_MASKS))
        info = {"softtf_config": self.soft_config.to_dict(), "tasks": self.tasks, "frozen": self.frozen_tasks,
                "modules_to_save": self._saved_modules, "base_model": type(self.model).__name__}
        atomic_write(os.path.join(directory, PRETRAINED_CONFIG), functools.partial(_write_json, info))

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, directory: str | os.PathLike, mmap: bool = False) -> "SoftModel":
        """Wrap ``base_model`` (the same pretrained weights) as saved by :meth:`save_pretrained`
        (``mmap``: as in :func:`load_soft_model`)."""
        path = os.path.join(os.fspath(directory), PRETRAINED_MASKS)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"from_pretrained: {path!r} does not exist (write it with save_pretrained)")
        return load_soft_model(base_model, path, mmap=mmap)

    def load_masks(self, path: str | os.PathLike, mmap: bool = False) -> dict[str, Tensor]:
        """Add the tasks stored at ``path`` to this model and restore the saved state of its
        ``modules_to_save``; returns the caller's extra tensors stored with them. Everything is
        checked before anything changes. ``mmap=True`` (CPU): frozen tasks' masks stay in the
        file, memory-mapped, read when a forward uses them; do not change the file in place while
        the model lives (replacing it, as ``save_masks`` does, is safe)."""
        self._check_live()
        load = SavedModulesLoad(self.saved_module_state(), self._saved_modules, path)
        extras = add_tasks_from_file(self.soft_layers, self.soft_config, path, check_extras=load.check,
                                     commit_extras=load.commit, guards=[self._guard], mmap=mmap)
        return load.callers_extras(extras)

    def load_state_dict(self, state_dict, *args, **kwargs):
        """``nn.Module.load_state_dict``, refused while another thread's call is in flight."""
        with self._exclusive("load_state_dict()"):
            return super().load_state_dict(state_dict, *args, **kwargs)

    def get_base_model(self) -> nn.Module:
        """The wrapped model (PEFT's ``get_base_model``), its targeted layers being ``SoftLinear``."""
        return self.model

    def unwrap(self) -> nn.Module:
        """Put the original ``nn.Linear`` modules back, restore every parameter's original
        ``requires_grad`` and return the wrapped model. This SoftModel is unusable afterwards."""
        self._check_live()
        with self._exclusive("unwrap()"):
            return self._release({n: layer.base_layer for n, layer in self.soft_layers.items()})

    def merge_and_unload(self, task: str) -> nn.Module:
        """Bake ``task``'s masks into the weights and return the plain model, for deployment (PEFT's
        ``merge_and_unload``). In place, as PEFT does: every SoftLinear becomes its base ``nn.Linear``
        again, with weight ``W ⊙ M_task`` (formed as the forward forms it: in fp32, then stored in the
        weight's dtype; see :mod:`softtf.core.merge`) and its bias; other tasks' masks are dropped,
        ``requires_grad`` is restored as by :meth:`unwrap`, and this SoftModel is unusable afterwards.
        An unknown ``task`` raises KeyError before anything changes."""
        self._check_live()
        with self._exclusive(f"merge_and_unload({task!r})"):
            self._check_task(task, "merge_and_unload")
            return self._release({n: merge_layer(layer, task) for n, layer in self.soft_layers.items()})

    def _release(self, linears: dict[str, nn.Module]) -> nn.Module:
        unwatch(self)
        for layer in self._layers():
            layer.serve_under(None)
        for n, module in linears.items():
            set_submodule(self.model, n, module)
        for n, p in self.model.named_parameters():
            if n in self._orig_requires_grad:
                p.requires_grad_(self._orig_requires_grad[n])
        self._unwrapped = True
        return self.model

    def extra_repr(self) -> str:
        if self._unwrapped:
            return "unwrapped"
        return f"layers={len(self._layer_names)}, tasks={self.tasks}, active={self.active_task}"


def _write_json(info: dict, path: str) -> None:
    with open(path, "w") as fh:
        json.dump(info, fh, indent=1, default=str)


def wrap(model: nn.Module, config: SoftConfig | None = None, **fields: Any) -> SoftModel:
    """Swap the targeted ``nn.Linear`` modules of ``model`` for ``SoftLinear`` and freeze the rest.

    ``SoftConfig``'s fields may be given as keywords, PEFT-style: ``wrap(model, target_modules=
    ["attn.qkv"], mask_init=("uniform", 0.99, 1.0))``; with ``config`` too they override its fields
    in a copy (``config`` itself is not changed). An unknown keyword raises TypeError.

    ``model`` is modified in place (its targeted submodules are replaced); :meth:`SoftModel.unwrap`
    undoes it. With ``config=None`` (or ``None`` fields) the defaults of the architecture apply:
    timm ViT -> ``attn.qkv`` + ``attn.proj`` of the last 3 blocks; HF BERT -> ``attention.self.
    {query,key,value}`` of the last 3 layers; the classifier head (``head`` / ``classifier``) stays
    trainable when it has parameters. No task exists yet: call :meth:`SoftModel.add_task`.
    """
    return SoftModel(model, config_with(config, fields))


def layers_of(model: nn.Module) -> tuple[dict[str, SoftLinear], SoftConfig | None]:
    """The masked layers of a :class:`SoftModel` (with its config) or of any module (config ``None``)."""
    if isinstance(model, SoftModel):
        return model.soft_layers, model.soft_config
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a SoftModel or an nn.Module with SoftLinear layers, got {type(model).__name__}")
    layers = soft_layers(model)
    if not layers:
        raise ValueError(f"model ({type(model).__name__}) has no SoftLinear layers")
    return layers, None


def save_masks(
    model: nn.Module,
    path: str | os.PathLike,
    extra: dict[str, Tensor] | None = None,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write every task's masks of ``model`` (a SoftModel or any module with ``SoftLinear`` layers),
    + config, task names and optional extras, to ``path`` (see :mod:`softtf.core.mask_file`)."""
    if isinstance(model, SoftModel):  # stores its modules_to_save (the head) too
        return model.save_masks(path, extra=extra, metadata=metadata)
    layers, config = layers_of(model)
    write_mask_file(layers, config, path, extra=extra, metadata=metadata)


def load_masks(model: nn.Module, path: str | os.PathLike, mmap: bool = False) -> dict[str, Tensor]:
    """Add the tasks stored in ``path`` to ``model``; returns the extra tensors stored with them.
    ``mmap=True``: frozen masks stay in the memory-mapped file (see :meth:`SoftModel.load_masks`)."""
    if isinstance(model, SoftModel):  # restores its modules_to_save (the head) too
        return model.load_masks(path, mmap=mmap)
    layers, config = layers_of(model)
    return add_tasks_from_file(layers, config, path, mmap=mmap)


def load_soft_model(model: nn.Module, path: str | os.PathLike, mmap: bool = False) -> SoftModel:
    """Wrap a fresh base ``model`` with the config stored in ``path`` and load its masks and saved
    modules (``mmap=True``: frozen masks stay in the memory-mapped file, see
    :meth:`SoftModel.load_masks`). Returns the model, as PEFT's ``from_pretrained`` does; the extra
    tensors stored beside the masks are read by :func:`softtf.read_extras`."""
    info = read_mask_info(path)
    if info["config"] is None:
        raise ValueError(f"load: {os.fspath(path)!r} stores no SoftConfig (it was saved from a bare module); wrap the model yourself and call load_masks")
    soft = wrap(model, info["config"])
    try:
        load_masks(soft, path, mmap=mmap)
    except Exception:
        soft.unwrap()
        raise
    return soft
