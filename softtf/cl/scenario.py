"""Class-incremental scenarios: the classes of a dataset split into disjoint, seeded tasks."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from torch.utils.data import Dataset, Subset

from .data import targets_of

__all__ = ["ClassIncrementalScenario"]


class ClassIncrementalScenario:
    """Split ``num_classes`` classes into ``n_tasks`` disjoint tasks after a seeded shuffle.

    Args:
        num_classes: number of classes of the dataset.
        n_tasks: number of tasks; ``num_classes`` must be divisible by it unless ``allow_uneven``.
        seed: seeds the class order (``None`` keeps 0..C-1).
        class_order: an explicit permutation of ``range(num_classes)`` (overrides ``seed``).
    """

    def __init__(self, num_classes: int, n_tasks: int, seed: int | None = 0, class_order: Sequence[int] | None = None, allow_uneven: bool = False):
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"ClassIncrementalScenario: num_classes must be a positive int, got {num_classes!r}")
        if not isinstance(n_tasks, int) or isinstance(n_tasks, bool) or not 1 <= n_tasks <= num_classes:
            raise ValueError(f"ClassIncrementalScenario: n_tasks must be an int in [1, {num_classes}] (num_classes), got {n_tasks!r}")
        if num_classes % n_tasks and not allow_uneven:
            raise ValueError(
                f"ClassIncrementalScenario: num_classes={num_classes} is not divisible by n_tasks={n_tasks} "
                "(pass allow_uneven=True to split unevenly)"
            )
        if class_order is not None:
            order = [int(c) for c in class_order]
            if sorted(order) != list(range(num_classes)):
                raise ValueError(f"ClassIncrementalScenario: class_order must be a permutation of range({num_classes}), got {list(class_order)[:10]}")
        elif seed is None:
            order = list(range(num_classes))
        else:
            order = np.random.default_rng(seed).permutation(num_classes).tolist()
        self.num_classes, self.n_tasks, self.class_order = num_classes, n_tasks, order
        self.task_classes: list[list[int]] = [list(map(int, c)) for c in np.array_split(np.asarray(order), n_tasks)]
        self.task_of_class = np.empty(num_classes, dtype=np.int64)
        for t, cs in enumerate(self.task_classes):
            self.task_of_class[cs] = t

    def task_name(self, t: int) -> str:
        return f"task{t}"

    def indices(self, dataset: Dataset, t: int) -> np.ndarray:
        """Indices of ``dataset``'s samples whose class belongs to task ``t``."""
        if not 0 <= t < self.n_tasks:
            raise ValueError(f"task index must be in [0, {self.n_tasks - 1}], got {t}")
        return np.flatnonzero(np.isin(targets_of(dataset), self.task_classes[t]))

    def subset(self, dataset: Dataset, t: int) -> Subset:
        return Subset(dataset, self.indices(dataset, t).tolist())

    def seen_classes(self, t: int) -> list[int]:
        return [c for cs in self.task_classes[: t + 1] for c in cs]

    def to_dict(self) -> dict:
        return {"num_classes": self.num_classes, "n_tasks": self.n_tasks, "class_order": self.class_order, "task_classes": self.task_classes}
