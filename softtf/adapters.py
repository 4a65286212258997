"""Bottleneck Adapters (Houlsby et al., 2019) on the output of a frozen ``nn.Linear``.

    h = base(x);   y = h + up(act(down(h)))

``down`` [bottleneck, out] and ``up`` [out, bottleneck] (both with bias) are the only trainable
parameters; ``up`` starts at zero so an untrained adapter reproduces the frozen layer exactly.
Parameters per adapted layer: ``bottleneck * (2 * out + 1) + out``.

Used as the Adapter baseline of ``softtf bench`` (and available to the runner): applied to the
same layers Soft-TF masks, at a parameter count matched to Soft-TF's ``out * in`` mask
(:func:`matched_bottleneck`) or at a small bottleneck.
"""
from __future__ import annotations

from typing import Iterable

from torch import Tensor, nn

__all__ = ["BottleneckAdapter", "AdapterLinear", "adapter_param_count", "matched_bottleneck", "add_adapters"]


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


class AdapterLinear(nn.Module):
    """A frozen ``nn.Linear`` (``base_layer``) followed by a trainable bottleneck adapter."""

    def __init__(self, base_layer: nn.Linear, bottleneck: int, activation: type[nn.Module] = nn.GELU):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"AdapterLinear: base_layer must be an nn.Linear, got {type(base_layer).__name__}")
        base_layer.requires_grad_(False)
        self.base_layer = base_layer
        w = base_layer.weight
        self.adapter = BottleneckAdapter(base_layer.out_features, bottleneck, activation, device=w.device, dtype=w.dtype)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: Tensor) -> Tensor:
        return self.adapter(self.base_layer(x))

    def extra_repr(self) -> str:
        return f"bottleneck={self.adapter.down.out_features}"


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
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        out[name] = new
    return out
