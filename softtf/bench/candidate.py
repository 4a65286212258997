"""One row of a case: a candidate's modules, trainable parameters, parameter accounting, timed
calls and results (built by :mod:`softtf.bench.candidates` and :mod:`softtf.bench.prompted`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from .cases import Case
from .config import TASKS
from .steps import TrainStep, infer_step, with_backend

__all__ = ["Candidate"]


@dataclass
class Candidate:
    key: str
    label: str
    kind: str
    modules: dict[str, nn.Module] = field(default_factory=dict)
    trainable: list[nn.Parameter] = field(default_factory=list)
    backend: str | None = None
    config: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    fns: dict[str, Callable[[], Any]] = field(default_factory=dict)  # task -> timed call
    results: dict[str, dict] = field(default_factory=dict)  # task -> status row
    static_bytes: int = 0
    train_step: TrainStep | None = None

    def mark(self, status: str, reason: str, tasks=TASKS) -> None:
        for t in tasks:
            self.results[t] = {"status": status, "reason": reason}

    def use_steps(self, case: Case, backend: str | None = None) -> None:
        """The infer and train calls on this candidate's trainable parameters (under ``backend``)."""
        self.train_step = TrainStep(case, self.trainable)
        train = with_backend(self.train_step, backend) if backend else self.train_step
        self.fns = {"infer": infer_step(case, backend), "train": train}
