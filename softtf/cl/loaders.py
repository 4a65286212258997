"""Seeded data loaders and optional progress bars shared by pre-training, training and evaluation.

The order of a loader depends on its seed alone. A ``DataLoader`` given a ``generator`` draws from
it each time an iterator is made (its base seed, then the sampler's permutation), so anything that
makes an extra iterator -- tqdm's asyncio bar calls ``iter()`` in its constructor -- used to shift
the order of every epoch. :class:`SeededOrder` re-seeds on every ``iter()`` instead.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["SeededOrder", "make_loader", "progress_bar"]


class SeededOrder(Sampler[int]):
    """The indices ``0..n-1``, shuffled by ``seed`` (the same order on every ``iter()``) or in order.

    The permutation is the one a ``DataLoader(shuffle=True, generator=torch.Generator().manual_seed(seed))``
    gives on its first iterator (one draw for the loader's base seed, then ``randperm``), so runs
    recorded before this class existed keep their numbers."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle = int(n), int(seed), bool(shuffle)

    def __len__(self) -> int:
        return self.n

    def indices(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator()
        g.manual_seed(self.seed)
        torch.empty((), dtype=torch.int64).random_(generator=g)  # the DataLoader's base-seed draw
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices())


def make_loader(ds: Dataset, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    """A single-process loader whose order depends only on ``seed`` (not on how often it is iterated).
    Its own generator takes the base-seed draw each iterator makes, so the global RNG is untouched."""
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, sampler=SeededOrder(len(ds), seed, shuffle), num_workers=0, generator=g)


def progress_bar(it: Iterable, enabled: bool, **kw) -> Iterable:
    """``it`` behind a tqdm bar when ``enabled``; display only: it never changes what ``it`` yields."""
    if not enabled:
        return it
    from tqdm.auto import tqdm  # display only; imported when a bar is shown

    return tqdm(it, leave=False, **kw)
