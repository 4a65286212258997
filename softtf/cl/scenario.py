"""Class-incremental scenarios: which classes make up each task, and the tasks' names.

:class:`ClassIncrementalScenario` splits the classes of one dataset into disjoint tasks after a
seeded shuffle (tasks ``task0``, ``task1``, ...). :class:`TaskPerDatasetScenario` holds explicit
tasks, one dataset each (``LabelledData.tasks`` of a ``textdir:`` folder): its own names and class
lists. :func:`scenario_for` picks the one the data calls for (the runner's default). Both offer
what the runner and the evaluation use: ``n_tasks``, ``num_classes``, ``task_classes``,
``task_of_class``, ``task_name(t)``, ``indices``, ``subset``, ``seen_classes``, ``to_dict``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from torch.utils.data import Dataset, Subset

from ..core.tasks import TASK_NAME
from .labelled import LabelledData, targets_of

__all__ = ["ClassIncrementalScenario", "TaskPerDatasetScenario", "scenario_for"]


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
        self._set_task_classes([list(map(int, c)) for c in np.array_split(np.asarray(order), n_tasks)])

    def _set_task_classes(self, task_classes: list[list[int]]) -> None:
        self.task_classes: list[list[int]] = task_classes
        self.task_of_class = np.empty(self.num_classes, dtype=np.int64)
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



class TaskPerDatasetScenario(ClassIncrementalScenario):
    """Explicit tasks, each with its own name and classes (one dataset per task).

    Args:
        tasks: ``[(name, [class ids]), ...]`` in task order (``LabelledData.tasks``). Names must be
            distinct valid task names (letters, digits, ``_``, ``-``: they name masks and keys);
            the class lists must be non-empty, disjoint and together cover ``range(num_classes)``.
        num_classes: the number of classes of the data (default: the number the tasks hold).
    """

    def __init__(self, tasks, num_classes: int | None = None):
        who = "TaskPerDatasetScenario"
        if isinstance(tasks, (str, bytes)) or not isinstance(tasks, Sequence) or not tasks:
            raise ValueError(f"{who}: tasks must be a non-empty list of (name, class ids), got {tasks!r}")
        names, task_classes = [], []
        for item in tasks:
            if not isinstance(item, Sequence) or isinstance(item, str) or len(item) != 2:
                raise ValueError(f"{who}: every task must be a (name, class ids) pair, got {item!r}")
            name, classes = item
            if not isinstance(name, str) or not TASK_NAME.match(name):
                raise ValueError(f"{who}: task name {name!r} is not a valid task name (letters, digits, '_' and '-' only)")
            if name in names:
                raise ValueError(f"{who}: task name {name!r} is given twice")
            ids = [int(c) for c in classes]
            if not ids:
                raise ValueError(f"{who}: task {name!r} has no classes")
            names.append(name)
            task_classes.append(ids)
        order = [c for cs in task_classes for c in cs]
        n = len(order) if num_classes is None else num_classes
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"{who}: num_classes must be a positive int, got {num_classes!r}")
        if sorted(order) != list(range(n)):
            raise ValueError(
                f"{who}: the tasks' classes must be disjoint and cover range({n}) (num_classes) exactly, "
                f"got {dict(zip(names, task_classes))}"
            )
        self.num_classes, self.n_tasks, self.class_order = n, len(names), order
        self.task_names = names
        self._set_task_classes(task_classes)

    def task_name(self, t: int) -> str:
        return self.task_names[t]

    def to_dict(self) -> dict:
        return {**super().to_dict(), "task_names": list(self.task_names)}


def scenario_for(data: LabelledData, n_tasks: int, seed: int | None = 0) -> ClassIncrementalScenario:
    """The default scenario of ``data``: its own tasks when it has a task structure (then ``n_tasks``
    must equal their number), else ``n_tasks`` seeded class-incremental tasks."""
    if data.tasks is None:
        return ClassIncrementalScenario(data.num_classes, n_tasks, seed=seed)
    names = [name for name, _ in data.tasks]
    if n_tasks != len(names):
        raise ValueError(
            f"the data {data.info.get('source', '')!r} has {len(names)} tasks, one per dataset ({', '.join(names)}), "
            f"but n_tasks={n_tasks} was asked; set n_tasks={len(names)} (softtf train: --tasks {len(names)} or leave "
            "--tasks out), or choose tasks with a task order"
        )
    return TaskPerDatasetScenario(data.tasks, data.num_classes)
