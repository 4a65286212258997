"""Continual-learning metrics over the accuracy matrix, exactly as METHOD.md defines them.

``A[i, j]`` is the accuracy on task ``j`` after training task ``i`` (0-based here; METHOD.md
writes tasks 1..n). Entries with ``j > i`` (tasks not seen yet) are ``NaN`` and never used.

* average accuracy after task t: ``mean_{j<=t} A[t, j]``; final ACC = that at ``t = n-1``;
* forgetting after task t: ``mean_{j<t} (max_{i<t} A[i, j] - A[t, j])`` where the max runs over
  the rows in which task j had been seen (``j <= i < t``); undefined (``NaN``) for ``t = 0``;
* BWT: ``mean_{j<n-1} (A[n-1, j] - A[j, j])``; undefined for a single task;
* task-id accuracy: fraction of test samples whose inferred task equals their true task.

All functions take accuracies in whatever unit the matrix uses (the runner uses percent).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = [
    "accuracy_matrix",
    "average_accuracy",
    "forgetting",
    "backward_transfer",
    "task_id_accuracy",
    "summarize",
]


def accuracy_matrix(A) -> np.ndarray:
    """Validate and return ``A`` as a float64 ``[n, n]`` array (NaN above the diagonal allowed)."""
    arr = np.asarray(A, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1] or arr.shape[0] == 0:
        raise ValueError(f"accuracy matrix must be square [n, n] with n >= 1, got shape {arr.shape}")
    low = np.tril(arr)
    if np.isnan(low).any():
        i, j = map(int, np.argwhere(np.isnan(low))[0])
        raise ValueError(f"accuracy matrix: A[{i}, {j}] (task {j} after training task {i}) is missing (NaN)")
    return arr


def _row(A: np.ndarray, t: int | None, fn: str) -> int:
    n = A.shape[0]
    if t is None:
        return n - 1
    if not isinstance(t, (int, np.integer)) or not -n <= t < n:
        raise ValueError(f"{fn}: t must be a task index in [{-n}, {n - 1}], got {t!r}")
    return int(t) % n


def average_accuracy(A, t: int | None = None) -> float:
    """``mean_{j<=t} A[t, j]`` (default ``t``: the last task, i.e. the final ACC)."""
    A = accuracy_matrix(A)
    t = _row(A, t, "average_accuracy")
    return float(np.mean(A[t, : t + 1]))


def forgetting(A, t: int | None = None) -> float:
    """``mean_{j<t} (max_{j<=i<t} A[i, j] - A[t, j])``; ``NaN`` after the first task."""
    A = accuracy_matrix(A)
    t = _row(A, t, "forgetting")
    if t == 0:
        return math.nan
    return float(np.mean([np.max(A[j:t, j]) - A[t, j] for j in range(t)]))


def backward_transfer(A) -> float:
    """``mean_{j<n-1} (A[n-1, j] - A[j, j])``; ``NaN`` for a single task."""
    A = accuracy_matrix(A)
    n = A.shape[0]
    if n == 1:
        return math.nan
    return float(np.mean([A[n - 1, j] - A[j, j] for j in range(n - 1)]))


def task_id_accuracy(predicted: Sequence[int], true: Sequence[int]) -> float:
    """Fraction (0..1) of samples whose inferred task equals the true task."""
    p, y = np.asarray(predicted).reshape(-1), np.asarray(true).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"task_id_accuracy: predicted has {p.size} entries, true has {y.size}")
    if p.size == 0:
        raise ValueError("task_id_accuracy: no samples")
    return float(np.mean(p == y))


def _none_if_nan(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def summarize(A) -> dict:
    """The JSON-ready summary: final ACC, forgetting, BWT and their curves over tasks (NaN -> None)."""
    A = accuracy_matrix(A)
    n = A.shape[0]
    return {
        "acc": average_accuracy(A),
        "forgetting": _none_if_nan(forgetting(A)),
        "bwt": _none_if_nan(backward_transfer(A)),
        "acc_curve": [average_accuracy(A, t) for t in range(n)],
        "forgetting_curve": [_none_if_nan(forgetting(A, t)) for t in range(n)],
    }
