"""Selections held for a while on many layers at once: :func:`preserve_modes` and
:class:`MaskSwitch` (the layers' ``mode_state`` / ``restore_mode`` / ``disable_masks``)."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

__all__ = ["MaskSwitch", "preserve_modes"]


@contextlib.contextmanager
def preserve_modes(layers: Sequence[Any]) -> Iterator[None]:
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

    def __init__(self, layers: Sequence[Any]):
        self._layers = list(layers)
        self._saved = [layer.mode_state() for layer in self._layers]
        for layer in self._layers:
            layer.disable_masks()

    def __enter__(self) -> "MaskSwitch":
        return self

    def __exit__(self, *exc) -> None:
        for layer, state in zip(self._layers, self._saved):
            layer.restore_mode(state)
