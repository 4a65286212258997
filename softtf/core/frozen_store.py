"""The frozen masks of a SoftLinear (issue 15, many tasks), in one of two forms:

* stacked (the default): the buffer ``frozen_masks`` [T, out, in] in ``mask_dtype``, every task
  in RAM (or device memory), one tensor the mixture kernels take as it is;
* rows: one tensor per frozen task, when some of them are views of a memory-mapped mask file
  (``load_masks(..., mmap=True)``). Their bytes stay in the file and the OS reads the pages a
  forward touches, so a model with many frozen tasks holds only what its calls use. Tasks frozen
  later join as ordinary rows; the registered buffer is then an empty [0, out, in] placeholder and
  ``frozen_masks`` stacks the rows on every read (a copy: the forward never reads it, it takes
  the rows of the tasks a call uses). ``state_dict`` holds the stacked masks either way; a device
  move or ``load_state_dict`` goes back to the stacked form; a copy (``copy.deepcopy``, pickle)
  reads every row into memory.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

__all__ = ["FrozenStore", "StoreState"]


class StoreState(NamedTuple):
    """A frozen store, whole: the stacked buffer (or the placeholder), the rows (or None), the
    names of the rows that are file-backed."""

    stacked: Tensor
    rows: dict[str, Tensor] | None
    mapped: frozenset[str]


class FrozenStore(nn.Module):
    """Mixin of SoftLinear holding the frozen store; ``_frozen`` (the names, in order) is the
    layer's. The methods starting with ``_`` expect the layer's lock to be held."""

    _frozen: list[str]

    def _init_store(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> None:
        self.register_buffer("frozen_masks", torch.empty(0, *shape, dtype=dtype, device=device))
        self._rows: dict[str, Tensor] | None = None
        self._mapped: frozenset[str] = frozenset()

    def __getstate__(self) -> dict:  # a copy or pickle holds the masks' bytes itself: nothing mapped
        state = super().__getstate__()
        state["_mapped"] = frozenset()
        return state

    @property
    def frozen_masks(self) -> Tensor:
        """Every frozen mask stacked, [T, out, in] in ``mask_dtype`` (with file-backed tasks: a
        stacked copy made on each read; ``mask(name)`` gives one task's without copying)."""
        rows = self.__dict__.get("_rows")
        if rows:
            return torch.stack([rows[n] for n in self._frozen])
        buffers = self.__dict__.get("_buffers", {})
        if "frozen_masks" not in buffers:
            raise AttributeError("frozen_masks")
        return buffers["frozen_masks"]

    @property
    def mapped_tasks(self) -> list[str]:
        """The frozen tasks whose masks are views of a memory-mapped file, in order."""
        return [n for n in self._frozen if n in self._mapped]

    def frozen_numel(self) -> int:
        """Elements of the frozen masks (without stacking file-backed ones)."""
        if self._rows is not None:
            return sum(m.numel() for m in self._rows.values())
        return self._buffers["frozen_masks"].numel()

    # ------------------------------------------------------------------ reads
    def _frozen_mask(self, name: str) -> Tensor:
        if self._rows is not None:
            return self._rows[name]
        return self._buffers["frozen_masks"][self._frozen.index(name)]

    def _whole_store(self, names: list[str]) -> Tensor | None:
        """The stacked buffer itself when ``names`` are exactly its rows (no stacking), else None."""
        return self._buffers["frozen_masks"] if self._rows is None and names == self._frozen else None

    def _store_state(self) -> StoreState:
        return StoreState(self._buffers["frozen_masks"], None if self._rows is None else dict(self._rows), self._mapped)

    # ------------------------------------------------------------------ changes
    def _staged_store(self, state: StoreState, names: list[str], new: dict[str, Tensor], mapped: bool) -> StoreState:
        """``state`` (whose tasks are ``names``) with the frozen masks ``new`` appended, built
        without touching the layer. ``mapped``: ``new`` are file-backed and are kept as rows, never
        copied into the stack."""
        stacked, rows, was_mapped = state
        if not mapped and rows is None:
            if new:
                stacked = torch.cat([stacked, torch.stack(list(new.values()))], 0)
            return StoreState(stacked, None, frozenset())
        if rows is None:  # views of the stacked buffer: no copy, the buffer's memory stays in use
            rows = {n: stacked[i] for i, n in enumerate(names)}
        rows = {**rows, **(new if mapped else {n: m.clone() for n, m in new.items()})}  # as torch.cat would copy
        placeholder = torch.empty((0, *stacked.shape[1:]), dtype=stacked.dtype, device=stacked.device)
        return StoreState(placeholder, rows, was_mapped | (frozenset(new) if mapped else frozenset()))

    def _set_store(self, state: StoreState) -> None:
        self.frozen_masks, self._rows, self._mapped = state.stacked, state.rows, state.mapped

    def _drop_frozen(self, name: str) -> None:
        if self._rows is None:
            store, i = self._buffers["frozen_masks"], self._frozen.index(name)
            self.frozen_masks = torch.cat([store[:i], store[i + 1:]], 0)
        else:
            self._rows = {n: m for n, m in self._rows.items() if n != name}
            self._mapped = self._mapped - {name}

    def _restack(self, device: torch.device, dtype: torch.dtype) -> None:
        """Back to the stacked form on ``device`` (a device move; ``load_state_dict``)."""
        if self._rows is not None:
            rows = [self._rows[n].to(device, dtype) for n in self._frozen]
            placeholder = self._buffers["frozen_masks"]
            self.frozen_masks = torch.stack(rows) if rows else placeholder.to(device, dtype)
            self._rows, self._mapped = None, frozenset()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._rows is not None and prefix + "frozen_masks" in destination:
            destination[prefix + "frozen_masks"] = self.frozen_masks  # the stacked masks, as ever
