"""Glue for the pytest-benchmark suites in bench/: the cases and candidates of ``softtf bench``,
one candidate x task per benchmark."""
from __future__ import annotations

from typing import Any

from .candidates import Candidate, build_candidates, install
from .cases import Case, build_case
from .config import BenchConfig

__all__ = ["Suite"]


class Suite:
    """Cases and candidates built with the defaults of ``softtf bench`` (``--quick`` shapes if
    ``quick``) and torch.compile off. One case is alive at a time: asking for another case drops
    the previous one (a full-size model case holds GBs). Hold one per test module (a fixture)."""

    def __init__(self, quick: bool = False):
        self.config = BenchConfig(quick=quick, compile=False, no_progress=True)
        self.device = self.config.torch_device
        self._name: str | None = None
        self._case: Case | None = None
        self._cands: dict[str, Candidate] = {}

    def candidates(self, name: str) -> tuple[Case, dict[str, Candidate]]:
        """(case, {key: candidate}) of case ``name``, built on the first call for it."""
        if name != self._name:
            self._name, self._case, self._cands = None, None, {}  # free the previous case first
            self._case = build_case(name, self.config, self.device)
            self._cands = {c.key: c for c in build_candidates(self._case, self.config, self.device)}
            self._name = name
        return self._case, self._cands

    def run(self, benchmark: Any, name: str, key: str, task: str, rounds: int, warmup: int) -> str | None:
        """Time candidate ``key`` on ``task`` of case ``name`` with a pytest-benchmark fixture (setup
        installs the candidate before every round). Returns a skip reason instead when the row cannot run here."""
        case, cands = self.candidates(name)
        cand = cands[key]
        if task not in cand.fns:
            r = cand.results.get(task, {})
            return f"{key} {task}: {r.get('status', 'n/a')} ({r.get('reason', 'not applicable')})"
        benchmark.group = f"{name} {task}"
        benchmark.extra_info.update({"tokens_per_call": case.tokens, "label": cand.label,
                                     "trainable": cand.params.get("trainable"),
                                     "bytes_per_task": cand.params.get("bytes_per_task")})
        benchmark.pedantic(cand.fns[task], setup=lambda: install(case, cand), rounds=rounds, warmup_rounds=warmup,
                           iterations=1)
        return None
