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
    """Accuracy ``A[head][i, j]`` (after task i, on task j, under each head) and task-id counts,
    filled task by task. ``heads``: ``("full", "task")``, or ``("full",)`` without task inference."""

    n_tasks: int
    heads: tuple[str, ...] = ("full", "task")
    A: dict[str, np.ndarray] = field(init=False)
    tid_correct: np.ndarray = field(init=False)
    tid_total: np.ndarray = field(init=False)
    timings: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = self.n_tasks
        self.A = {head: np.full((n, n), np.nan) for head in self.heads}
        self.tid_correct = np.zeros((n, n))
        self.tid_total = np.zeros((n, n))

    def _matrices(self) -> dict[str, np.ndarray]:
        return {**{f"A_{head}": a for head, a in self.A.items()}, "task_id": self.tid_correct, "task_id_total": self.tid_total}

    def progress(self, finished: int) -> dict:
        """The ``progress.json`` record after ``finished`` tasks."""
        return json_safe({
            "finished_tasks": finished,
            **{name: arr[:finished].tolist() for name, arr in self._matrices().items()},
            "timings": self.timings,
        })

    def restore(self, prog: dict) -> None:
        """Fill the rows a ``progress.json`` record holds."""
        for name, arr in self._matrices().items():
            rows = np.asarray([[np.nan if v is None else v for v in r] for r in prog[name]], dtype=np.float64).reshape(-1, self.n_tasks)
            arr[: rows.shape[0]] = rows if name.startswith("A_") else np.nan_to_num(rows)
        self.timings = prog.get("timings", [])

    def matrix_names(self) -> tuple[str, ...]:
        """The matrices of a ``progress.json`` record (what :meth:`restore` reads)."""
        return tuple(self._matrices())

    def record(self, head: str, labels: dict, run_info: dict) -> dict:
        """The ``results.json`` record: ``labels`` (method, modes), the summary of ``head``, every
        head's summary under ``heads``, task-id accuracies, definitions, ``run_info``. Every accuracy,
        task-id accuracies included, is in percent (``metrics.UNITS``; the tallies hold counts). Each summary
        carries SAPT's AP / F.Ra / FWT / BWT under ``sapt`` (FWT against ``run_config.reference_acc``,
        the variant ``run_config.transfer_metrics``)."""
        cfg = run_info.get("run_config", {})
        per_head = {h: {**metrics.summarize(a),
                        "sapt": metrics.transfer_summary(a, cfg.get("reference_acc"), cfg.get("transfer_metrics", "paper"))}
                    for h, a in self.A.items()}
        out = {
            **labels,
            "head": head,
            **per_head[head],
            "heads": per_head,
            "task_id_accuracy": None,
            "task_id_accuracy_per_task": None,
            "task_id_matrix": None,
            "metric_definitions": {**metrics.DEFINITIONS, **HEAD_DEFINITIONS},
            "timings": self.timings,
            **run_info,
        }
        last_c, last_n = self.tid_correct[-1], self.tid_total[-1]
        if self.tid_total.sum() > 0:
            if last_n.sum() > 0:
                out["task_id_accuracy"] = float(100.0 * last_c.sum() / last_n.sum())
                out["task_id_accuracy_per_task"] = metrics.task_id_accuracy_per_task(last_c, last_n)
            with np.errstate(invalid="ignore", divide="ignore"):
                mat = np.where(self.tid_total > 0, 100.0 * self.tid_correct / np.maximum(self.tid_total, 1), np.nan)
            out["task_id_matrix"] = json_safe(mat.tolist())
        return json_safe(out)


HEAD_DEFINITIONS = {
    "heads.full": "prediction = argmax over every class seen so far (the class-incremental standard)",
    "heads.task": "prediction = argmax over the classes of the inferred task (a wrong task inference is a wrong answer)",
}


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
