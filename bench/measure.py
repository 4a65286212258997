"""Time and memory of a callable on the current device, for the bench/ scripts.

Time: the median wall time over repeats after a warm-up (callers interleave candidates).

CUDA: torch.cuda.max_memory_allocated around the call. CPU: the profiler's raw allocator records
("[memory]", +bytes on allocation and -bytes on free, including allocations made inside C++
kernels) replayed in time order; the peak of their running sum is the most memory the call held
at once beyond what existed before it.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


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


def memory_profile(fn: Callable[[], object], device: str | torch.device = "cpu") -> tuple[int, int]:
    """(peak extra bytes, largest single allocation in bytes) of one call of fn()."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        out = fn()
        torch.cuda.synchronize(dev)
        del out
        peak = torch.cuda.max_memory_allocated(dev) - base
        return peak, peak  # CUDA stats give no per-allocation sizes; the peak bounds the largest
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = largest = 0
    for _, delta in events:
        live += delta
        peak = max(peak, live)
        largest = max(largest, delta)
    return peak, largest


def peak_extra_bytes(fn: Callable[[], object], device: str | torch.device = "cpu") -> int:
    return memory_profile(fn, device)[0]
