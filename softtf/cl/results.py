"""What a run produces: the accuracy and task-id tallies as it goes, and the final result."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from ..methods.base import ContinualMethod
from . import metrics

__all__ = ["Tallies", "RunResult", "json_safe"]


def json_safe(x):
    """NaN -> None, tuples -> lists, recursively (JSON has no NaN)."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    return x


@dataclass
class Tallies:
    """Accuracy ``A[i, j]`` (after task i, on task j) and task-id counts, filled task by task."""

    n_tasks: int
    A: np.ndarray = field(init=False)
    tid_correct: np.ndarray = field(init=False)
    tid_total: np.ndarray = field(init=False)
    timings: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = self.n_tasks
        self.A = np.full((n, n), np.nan)
        self.tid_correct = np.zeros((n, n))
        self.tid_total = np.zeros((n, n))

    def progress(self, finished: int) -> dict:
        """The ``progress.json`` record after ``finished`` tasks."""
        return json_safe({
            "finished_tasks": finished,
            "A": self.A[:finished].tolist(),
            "task_id": self.tid_correct[:finished].tolist(),
            "task_id_total": self.tid_total[:finished].tolist(),
            "timings": self.timings,
        })

    def restore(self, prog: dict) -> None:
        """Fill the rows a ``progress.json`` record holds."""
        for name, arr in (("A", self.A), ("task_id", self.tid_correct), ("task_id_total", self.tid_total)):
            rows = np.asarray(prog[name], dtype=np.float64)
            arr[: rows.shape[0]] = np.where(np.isnan(rows), np.nan, rows) if name == "A" else np.nan_to_num(rows)
        self.timings = prog.get("timings", [])

    def record(self, head: dict, run_info: dict) -> dict:
        """The ``results.json`` record: ``head`` (method, modes), metrics, matrices, ``run_info``."""
        out = {
            **head,
            **metrics.summarize(self.A),
            "accuracy_matrix": json_safe(self.A.tolist()),
            "task_id_accuracy": None,
            "task_id_matrix": None,
            "timings": self.timings,
            **run_info,
        }
        if self.tid_total.sum() > 0:
            last = self.tid_total[-1]
            out["task_id_accuracy"] = float(self.tid_correct[-1].sum() / last.sum()) if last.sum() > 0 else None
            with np.errstate(invalid="ignore", divide="ignore"):
                mat = np.where(self.tid_total > 0, self.tid_correct / np.maximum(self.tid_total, 1), np.nan)
            out["task_id_matrix"] = json_safe(mat.tolist())
        return json_safe(out)


@dataclass
class RunResult:
    """The outcome of :func:`~softtf.cl.runner.run_continual`.

    ``record`` is exactly what ``results.json`` holds (``result["acc"]`` reads it); ``method``
    and ``classifier`` are the trained live objects, for callers that inspect or reuse them."""

    record: dict[str, Any]
    method: ContinualMethod
    classifier: nn.Module

    def __getitem__(self, key: str) -> Any:
        return self.record[key]
