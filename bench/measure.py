"""Time and memory of a callable, for the bench/ scripts (the same accounting as `softtf bench`).

Time: the median wall time over repeats after a warm-up (callers interleave candidates).
Memory: softtf.bench's measurement: CUDA max_memory_allocated, or on the CPU the profiler's
allocation records replayed in time order (including allocations inside C++ kernels).
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from softtf.bench import cpu_allocation_profile, measure_peak_bytes


def timeit(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of fn() in ms after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def largest_allocation_bytes(fn: Callable[[], object]) -> int:
    """Largest single CPU allocation fn() makes (to show no out x in temporary is created)."""
    return cpu_allocation_profile(fn)[1]


def peak_extra_bytes(fn: Callable[[], object], device: str | torch.device = "cpu") -> int:
    return measure_peak_bytes(fn, torch.device(device))
