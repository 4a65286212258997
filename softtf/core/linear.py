"""``LinearWrapper``: the base of every module built around a frozen ``nn.Linear`` (SoftLinear,
the adapters), PEFT-style."""
from __future__ import annotations

from torch import Tensor, nn

__all__ = ["LinearWrapper"]


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
