"""Seeded data loaders and optional progress bars shared by pre-training, training and evaluation."""
from __future__ import annotations

from typing import Iterable

import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["make_loader", "progress_bar"]


def make_loader(ds: Dataset, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    """A single-process loader whose shuffle order depends only on ``seed``."""
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g, num_workers=0)


def progress_bar(it: Iterable, enabled: bool, **kw) -> Iterable:
    if not enabled:
        return it
    from tqdm.auto import tqdm  # display only; imported when a bar is shown

    return tqdm(it, leave=False, **kw)
