"""Bottleneck Adapters (Houlsby et al., 2019) on the output of a frozen ``nn.Linear``.

    h = base(x);   y = h + up(act(down(h)))

``down`` [bottleneck, out] and ``up`` [out, bottleneck] (both with bias) are the only trainable
parameters; ``up`` starts at zero so an untrained adapter reproduces the frozen layer exactly.
Parameters per adapted layer: ``bottleneck * (2 * out + 1) + out``.

The Adapter baseline of ``softtf bench`` (one adapter at a parameter count matched to Soft-TF's
``out * in`` mask, :func:`matched_bottleneck`, or at a small bottleneck) and the continual-learning
method ``adapter``: one adapter per task on the layers Soft-TF masks (``adapter_bottleneck``, or
``"matched"``: :func:`matched_bottleneck` per layer), finished adapters frozen; task inference
``oracle``, ``prompt`` or ``prompt-vote`` (queries with adapters off).
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from torch import Tensor, nn

from ..core.files import restore_tensor
from ..core.layer import LinearWrapper
from ..core.model import set_submodule
from .base import MATCHED, ContinualMethod, grouped_forward, target_linears
from .registry import register

__all__ = ["BottleneckAdapter", "AdapterLinear", "AdapterMethod", "adapter_param_count", "matched_bottleneck", "add_adapters"]


def adapter_param_count(out_features: int, bottleneck: int) -> int:
    """Trainable parameters of one adapter on a layer with ``out_features`` outputs."""
    return bottleneck * (2 * out_features + 1) + out_features


def matched_bottleneck(in_features: int, out_features: int) -> int:
    """Bottleneck whose adapter has as many parameters as a Soft-TF mask (``out * in``)."""
    target = in_features * out_features
    return max(1, round((target - out_features) / (2 * out_features + 1)))


class BottleneckAdapter(nn.Module):
    """``h + up(act(down(h)))`` over the last dimension of ``h``."""

    def __init__(self, features: int, bottleneck: int, activation: type[nn.Module] = nn.GELU, device=None, dtype=None):
        super().__init__()
        if not (isinstance(features, int) and features > 0 and isinstance(bottleneck, int) and bottleneck > 0):
            raise ValueError(f"BottleneckAdapter: features and bottleneck must be positive ints, got {features}, {bottleneck}")
        self.down = nn.Linear(features, bottleneck, device=device, dtype=dtype)
        self.act = activation()
        self.up = nn.Linear(bottleneck, features, device=device, dtype=dtype)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.up(self.act(self.down(h)))


class AdapterLinear(LinearWrapper):
    """A frozen ``nn.Linear`` (``base_layer``) followed by one of its named bottleneck adapters.

    ``AdapterLinear(base, bottleneck)`` holds one adapter (``"default"``); a continual-learning
    run adds one per task with :meth:`add_adapter` and picks one with :meth:`set_adapter`."""

    def __init__(self, base_layer: nn.Linear, bottleneck: int | None = None, activation: type[nn.Module] = nn.GELU):
        super().__init__(base_layer)
        self.activation = activation
        self.adapters = nn.ModuleDict()
        self.active: str | None = None  # None: exactly the base layer
        if bottleneck is not None:
            self.add_adapter("default", bottleneck)

    @property
    def adapter(self) -> BottleneckAdapter:
        """The active adapter."""
        if self.active is None:
            raise ValueError("AdapterLinear: no adapter is active")
        return self.adapters[self.active]

    def add_adapter(self, name: str, bottleneck: int) -> BottleneckAdapter:
        """Add adapter ``name`` (an exact identity until trained) and make it active."""
        if name in self.adapters:
            raise ValueError(f"AdapterLinear: adapter {name!r} already exists")
        w = self.base_layer.weight
        self.adapters[name] = BottleneckAdapter(self.out_features, bottleneck, self.activation, device=w.device, dtype=w.dtype)
        self.active = name
        return self.adapters[name]

    def set_adapter(self, name: str | None) -> None:
        if name is not None and name not in self.adapters:
            raise KeyError(f"AdapterLinear: unknown adapter {name!r} (adapters: {list(self.adapters)})")
        self.active = name

    def forward(self, x: Tensor) -> Tensor:
        h = self.base_layer(x)
        return h if self.active is None else self.adapters[self.active](h)

    def extra_repr(self) -> str:
        sizes = {n: a.down.out_features for n, a in self.adapters.items()}
        return f"bottleneck={sizes}, active={self.active}"


def add_adapters(model: nn.Module, names: Iterable[str], bottleneck: int | None = None) -> dict[str, AdapterLinear]:
    """Replace the ``nn.Linear`` modules ``names`` of ``model`` in place by ``AdapterLinear``.

    ``bottleneck=None`` uses :func:`matched_bottleneck` per layer. Returns the new modules by name.
    """
    out = {}
    for name in names:
        base = model.get_submodule(name)
        if not isinstance(base, nn.Linear):
            raise TypeError(f"add_adapters: {name!r} is a {type(base).__name__}, expected nn.Linear")
        m = matched_bottleneck(base.in_features, base.out_features) if bottleneck is None else bottleneck
        new = AdapterLinear(base, m)
        set_submodule(model, name, new)
        out[name] = new
    return out


@register
class AdapterMethod(ContinualMethod):
    """One bottleneck adapter per task on every Soft-TF target layer; old adapters frozen."""

    name = "adapter"
    task_id_modes = ("oracle", "prompt", "prompt-vote", "classifier")

    def __init__(self, classifier, options):
        super().__init__(classifier, options)
        backbone = classifier.backbone
        linears = target_linears(backbone, options.soft_config)
        backbone.requires_grad_(False)
        self.layers: dict[str, AdapterLinear] = {}
        self.bottleneck: dict[str, int] = {}
        for n, base in linears.items():
            self.layers[n] = AdapterLinear(base)
            set_submodule(backbone, n, self.layers[n])
            size = options.adapter_bottleneck
            self.bottleneck[n] = matched_bottleneck(base.in_features, base.out_features) if size == MATCHED else size

    def _select(self, name: str | None) -> None:
        for layer in self.layers.values():
            layer.set_adapter(name)

    def _add(self, name: str) -> list[nn.Parameter]:
        params = []
        for lname, layer in self.layers.items():
            params.extend(layer.add_adapter(name, self.bottleneck[lname]).parameters())
        return params

    def begin_task(self, t, name):
        torch.manual_seed(self.options.seed * 1000 + t)
        return self._add(name)

    def end_task(self, t, name):
        for layer in self.layers.values():
            layer.adapters[name].requires_grad_(False)
        super().end_task(t, name)

    def forward_tasks(self, inputs, task_index, tasks):
        if task_index is None:
            raise ValueError("adapter needs a task per sample (task_id 'none' is not supported)")
        return grouped_forward(self.clf, inputs, task_index, lambda i: self._select(tasks[i]))

    def info(self):
        per_task = sum(adapter_param_count(layer.out_features, self.bottleneck[n]) for n, layer in self.layers.items())
        return {"adapter_bottleneck": dict(self.bottleneck), "params_per_task": per_task}

    @contextlib.contextmanager
    def pretrained(self) -> Iterator[None]:
        active = {n: layer.active for n, layer in self.layers.items()}
        self._select(None)
        try:
            yield
        finally:
            for n, layer in self.layers.items():
                layer.set_adapter(active[n])

    def state(self):
        tensors = {
            f"adapter::{task}::{lname}.{k}": v
            for task in self.trained
            for lname, layer in self.layers.items()
            for k, v in layer.adapters[task].state_dict().items()
        }
        return tensors, {"method": "adapter"}

    def load_state(self, tensors, path, tasks):
        for task in tasks:
            self._add(task)
            for lname, layer in self.layers.items():
                for k, v in layer.adapters[task].state_dict(keep_vars=True).items():
                    restore_tensor(tensors, f"adapter::{task}::{lname}.{k}", v, path)
                layer.adapters[task].requires_grad_(False)
