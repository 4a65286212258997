"""Timing harness: warm-up, one profiled call for peak memory, then timed calls with the candidates
of a task interleaved round-robin (rotating start), so load from other processes hits all alike."""
from __future__ import annotations

import statistics
import time
from typing import Protocol

import torch
from torch import Tensor

from .candidates import Candidate, failure, install
from .cases import Case
from .config import FLOOR, TASKS, BenchConfig
from .memory import measure_peak_bytes

__all__ = ["Progress", "measure_case"]


class Progress(Protocol):
    """What the harness needs of a progress bar (tqdm has it)."""

    def update(self, n: int = 1) -> object: ...

    def set_description(self, desc: str) -> object: ...


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def set_description(self, desc: str) -> None:
        pass


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_case(case: Case, cands: list[Candidate], config: BenchConfig, device: torch.device,
                 progress: Progress | None = None) -> None:
    """Fill ``cand.results[task]`` of every runnable candidate x task: times (ms), tokens/s, peak bytes,
    or the failure. Ends with the floor installed and every optimizer state freed (counted as static bytes)."""
    pbar = progress or _NoProgress()
    warmup, repeats = config.timing(case.level)
    for task in TASKS:
        runnable = [c for c in cands if task in c.fns and task not in c.results]
        _warm_up(case, runnable, task, warmup, pbar)
        peaks = _peak_memory(case, runnable, task, device, pbar)
        times = _timed_rounds(case, runnable, task, repeats, device, pbar)
        for c in runnable:
            if task in c.results:
                continue
            ts = times[c.key]
            med = statistics.median(ts)
            c.results[task] = {"status": "ok", "median_ms": med, "min_ms": min(ts), "times_ms": ts,
                               "tokens_per_s": case.tokens / (med / 1e3), "peak_bytes": peaks.get(c.key)}
    install(case, next(c for c in cands if c.key == FLOOR))
    for c in cands:
        if c.train_step is not None:
            c.static_bytes += c.train_step.release()  # free optimizer state before the next case


def _warm_up(case: Case, runnable: list[Candidate], task: str, warmup: int, pbar: Progress) -> None:
    """The first call also compiles, creates optimizer state, primes oneDNN."""
    for c in runnable:
        for _ in range(warmup):
            if task in c.results:
                break
            pbar.set_description(f"{case.name} {task} warmup {c.key}")
            try:
                install(case, c)
                c.fns[task]()
            except Exception as exc:
                c.results[task] = failure(exc)
            pbar.update(1)


def _peak_memory(case: Case, runnable: list[Candidate], task: str, device: torch.device, pbar: Progress) -> dict:
    """{key: peak bytes} of one profiled call each."""
    peaks = {}
    for c in runnable:
        if task in c.results:
            pbar.update(1)
            continue
        pbar.set_description(f"{case.name} {task} memory {c.key}")
        try:
            install(case, c)
            # gradients of the previous step are dropped before, not inside, the measured call
            if c.train_step is not None:
                c.train_step.zero_grad()
            if isinstance(case.train_inputs, Tensor):
                case.train_inputs.grad = None
            peaks[c.key] = measure_peak_bytes(c.fns[task], device)
        except Exception as exc:
            c.results[task] = failure(exc)
        pbar.update(1)
    return peaks


def _timed_rounds(case: Case, runnable: list[Candidate], task: str, repeats: int, device: torch.device,
                  pbar: Progress) -> dict[str, list[float]]:
    """{key: wall times in ms}, candidates interleaved round-robin with a rotating start."""
    times: dict[str, list[float]] = {c.key: [] for c in runnable}
    for r in range(repeats):
        alive = [c for c in runnable if task not in c.results]
        k = r % max(1, len(alive))
        for c in alive[k:] + alive[:k]:
            pbar.set_description(f"{case.name} {task} round {r + 1}/{repeats}")
            try:
                install(case, c)
                _sync(device)
                t0 = time.perf_counter()
                c.fns[task]()
                _sync(device)
                times[c.key].append((time.perf_counter() - t0) * 1e3)
            except Exception as exc:
                c.results[task] = failure(exc)
            pbar.update(1)
        pbar.update(len(runnable) - len(alive))
    return times
