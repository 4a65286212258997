"""What every data source returns: :class:`LabelledData` (a train/test pair, its classes and, for
data made of several datasets, its task structure), the in-memory :class:`TensorDataset`, and the
helpers that split by class (:func:`targets_of`, :func:`stratified_split`).

The sources themselves live in :mod:`softtf.cl.data` (images, ``load_data``) and
:mod:`softtf.cl.text_data` (CSV text, a folder of text tasks); both build on this module.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
from torch import Tensor
from torch.utils.data import Dataset, Subset

__all__ = ["LabelledData", "TensorDataset", "stratified_split", "targets_of"]


@dataclass
class LabelledData:
    """A train/test pair of datasets over ``num_classes`` classes (``kind``: "image" or "text").

    ``tasks`` is ``None`` for a single dataset (the runner splits its classes into seeded tasks),
    or, for data made of one dataset per task (:func:`softtf.cl.text_data.load_text_tasks`), the
    tasks in order as ``[(name, [class ids]), ...]``: the runner then builds a
    :class:`~softtf.cl.scenario.TaskPerDatasetScenario` from it.
    """

    train: Dataset
    test: Dataset
    num_classes: int
    class_names: list[str]
    kind: str
    info: dict = field(default_factory=dict)
    tasks: list[tuple[str, list[int]]] | None = None

    @property
    def display_name(self) -> str:
        """A short name for titles (the plots'): ``info["source"]`` with a path cut to its last part
        (``sklearn digits``, ``cifar100:cifar-100-python``, ``folder:imagenet-r``, ``textdir:text5``),
        else the kind and the class count (``image data, 10 classes``)."""
        source = self.info.get("source") if isinstance(self.info, dict) else None
        if not isinstance(source, str) or not source.strip():
            return f"{self.kind} data, {self.num_classes} classes"
        scheme, sep, path = source.partition(":")
        if sep and path and scheme.isidentifier():
            return f"{scheme}:{os.path.basename(os.path.normpath(path)) or path}"
        return source


def targets_of(ds: Dataset) -> np.ndarray:
    if isinstance(ds, Subset):
        return targets_of(ds.dataset)[np.asarray(ds.indices)]
    t = getattr(ds, "targets", None)
    if t is None:
        raise TypeError(f"dataset {type(ds).__name__} has no `targets` attribute (needed to split classes into tasks)")
    return np.asarray(t, dtype=np.int64)


class TensorDataset(Dataset):
    """In-memory dataset: ``inputs`` a tensor [N, ...] or a dict of tensors [N, ...]; ``targets`` [N]."""

    def __init__(self, inputs: Tensor | dict[str, Tensor], targets):
        self.targets = np.asarray(targets, dtype=np.int64)
        n = len(self.targets)
        items = inputs.values() if isinstance(inputs, dict) else [inputs]
        for v in items:
            if not isinstance(v, Tensor) or v.shape[0] != n:
                raise ValueError(f"TensorDataset: every input must be a tensor with {n} rows (one per target), got {getattr(v, 'shape', type(v))}")
        self.inputs = inputs

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        x = {k: v[i] for k, v in self.inputs.items()} if isinstance(self.inputs, dict) else self.inputs[i]
        return x, int(self.targets[i])


def stratified_split(targets, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class split: ``(train_idx, test_idx)``; every class keeps >= 1 train sample."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    targets = np.asarray(targets)
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(targets):
        idx = rng.permutation(np.flatnonzero(targets == c))
        k = min(int(round(len(idx) * test_fraction)), len(idx) - 1)
        test.extend(idx[:k].tolist())
        train.extend(idx[k:].tolist())
    return np.sort(np.asarray(train, dtype=np.int64)), np.sort(np.asarray(test, dtype=np.int64))
