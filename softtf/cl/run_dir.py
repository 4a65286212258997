"""The run directory: configuration, progress, per-task checkpoints, results and plots.

``run_config.json`` (what the run is), ``progress.json`` (rewritten atomically after every task),
``checkpoints/task_XXX.safetensors`` (the method's state after task XXX), ``results.json``,
``accuracy_matrix.png``, ``accuracy_curve.png``. A directory holding another run's configuration
is refused, naming the differences; a corrupt ``run_config.json`` or ``progress.json`` is a
ValueError naming the file.
"""
from __future__ import annotations

import json
import os

from ..core.files import write_json
from .plots import plot_accuracy_curve, plot_accuracy_matrix

__all__ = ["RunDirectory"]


class RunDirectory:
    def __init__(self, path: str | os.PathLike, resume_free: tuple[str, ...] = ()):
        self.path = os.fspath(path)
        self.checkpoints = os.path.join(self.path, "checkpoints")
        self.resume_free = set(resume_free)  # run_config fields that may change on resumption
        os.makedirs(self.path, exist_ok=True)
        os.makedirs(self.checkpoints, exist_ok=True)

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def checkpoint(self, t: int) -> str:
        return os.path.join(self.checkpoints, f"task_{t:03d}.safetensors")

    def read_config(self) -> dict | None:
        """The ``run_config.json`` record (None when the directory holds no run)."""
        path = self.file("run_config.json")
        if not os.path.isfile(path):
            return None
        record = _read_json(path)
        if not isinstance(record, dict):
            raise ValueError(f"{path!r} holds a {type(record).__name__}, expected a JSON object")
        return record

    def claim(self, run_info: dict) -> None:
        """Write ``run_config.json``, or check that the one there describes the same run."""
        path = self.file("run_config.json")
        if not os.path.isfile(path):
            write_json(path, run_info)
            return
        old = _read_json(path)
        if not isinstance(old, dict):
            raise ValueError(f"resume: {path!r} holds a {type(old).__name__}, expected a JSON object; delete the run directory to start over")
        self._check_same(old, json.loads(json.dumps(run_info)), path)

    def _check_same(self, old: dict, new: dict, path: str) -> None:
        diffs = []
        for section in sorted(set(old) | set(new)):
            a, b = old.get(section), new.get(section)
            if section == "run_config" and isinstance(a, dict) and isinstance(b, dict):
                for k in sorted(set(a) | set(b)):
                    if k not in self.resume_free and a.get(k) != b.get(k):
                        diffs.append(f"run_config.{k}: {a.get(k)!r} -> {b.get(k)!r}")
            elif a != b:
                diffs.append(f"{section}: {json.dumps(a)[:120]} -> {json.dumps(b)[:120]}")
        if diffs:
            raise ValueError(f"resume: {path!r} belongs to a different run; differences: " + "; ".join(diffs[:6]) + " (use a new output directory)")

    def progress(self, n_tasks: int, matrices: tuple[str, ...]) -> tuple[dict | None, str | None]:
        """``(progress record, checkpoint of its last finished task)``, or ``(None, None)``.
        ``matrices``: the per-task tallies the record must hold."""
        path = self.file("progress.json")
        if not os.path.isfile(path):
            return None, None
        prog = _read_json(path)
        problem = _progress_problem(prog, n_tasks, matrices)
        if problem:
            raise ValueError(f"resume: {path!r} is corrupt ({problem}); delete it and the checkpoints to start the run over")
        done = prog["finished_tasks"]
        if done <= 0:
            return None, None
        ck = self.checkpoint(done - 1)
        if not os.path.isfile(ck):
            raise FileNotFoundError(f"resume: {path!r} says {done} tasks finished but {ck!r} is missing")
        return prog, ck

    def write_progress(self, record: dict) -> None:
        write_json(self.file("progress.json"), record)

    def write_results(self, record: dict, matrices: dict, head: str, title: str) -> None:
        """``results.json``, the heat map of ``matrices[head]`` and the curves of every head."""
        write_json(self.file("results.json"), record)
        plot_accuracy_matrix(matrices[head], self.file("accuracy_matrix.png"), title=f"{title}\nhead {head}")
        plot_accuracy_curve(matrices, self.file("accuracy_curve.png"), title=title, main=head)


def _read_json(path: str):
    try:
        with open(path) as fh:
            return json.load(fh)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"resume: {path!r} is not valid JSON ({exc}); delete it to start the run over") from None


def _progress_problem(prog, n_tasks: int, matrices: tuple[str, ...]) -> str | None:
    """What is wrong with a ``progress.json`` record of a run of ``n_tasks`` tasks, or None."""
    if not isinstance(prog, dict):
        return f"a JSON object expected, got {type(prog).__name__}"
    done = prog.get("finished_tasks")
    if not isinstance(done, int) or isinstance(done, bool) or not 0 <= done <= n_tasks:
        return f"finished_tasks must be an int in [0, {n_tasks}], got {done!r}"
    for key in matrices:
        rows = prog.get(key)
        if not isinstance(rows, list) or len(rows) != done or not all(
            isinstance(r, list) and len(r) == n_tasks and all(v is None or isinstance(v, (int, float)) for v in r) for r in rows
        ):
            return f"{key} must hold {done} rows of {n_tasks} numbers"
    if not isinstance(prog.get("timings", []), list):
        return "timings must be a list"
    return None
