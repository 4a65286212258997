"""Memory accounting: peak bytes one call allocates (CUDA allocator stats, or the CPU profiler's
allocation records) and the bytes a set of tensors holds."""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.profiler import ProfilerActivity, profile

__all__ = ["cpu_allocation_profile", "measure_peak_bytes", "tensor_bytes"]


@contextlib.contextmanager
def _quiet_stderr():
    """Send file descriptor 2 to /dev/null for the block: Kineto (torch.profiler's C++ backend) logs
    "USDT ... profiler_start/stop" and, with a CUDA build of torch on a machine without a GPU,
    "gpuGetDeviceCount failed" straight to it, past Python. Only the profiler's own start and stop
    run inside; the profiled call's output is untouched."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _allocation_events(prof) -> list[tuple[int, int, int]]:
    """(time ns, signed bytes, pointer) of every CPU allocation and free the profiler recorded."""
    events: list[tuple[int, int, int]] = []
    try:  # raw allocation records: every allocation and free of the CPU allocator
        def walk(nodes):
            for n in nodes:
                if str(n.tag).endswith("Allocation"):
                    ef = n.extra_fields
                    if str(getattr(ef, "device", "cpu")).startswith("cpu"):
                        events.append((n.start_time_ns, int(ef.alloc_size), int(ef.ptr)))
                walk(n.children)

        walk(prof.profiler.kineto_results.experimental_event_tree())
    except Exception:  # pragma: no cover - other profiler layouts: op-level self memory, no pointers
        events = [(e.time_range.start, int(e.self_cpu_memory_usage), -1 - i)
                  for i, e in enumerate(prof.events()) if e.self_cpu_memory_usage]
    return events


def cpu_allocation_profile(fn: Callable[[], Any]) -> tuple[int, int]:
    """(peak, largest single allocation) in bytes of CPU memory allocated by fn(): the peak of
    live bytes the call allocated and has not yet freed (torch.profiler allocation events, in time
    order, including allocations inside C++ kernels). Frees of blocks allocated before the call
    are ignored, so the peak is the high-water mark of what the call itself allocated."""
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():  # Kineto's start/stop log lines (and its CUDA probe's error on a CPU-only machine)
        prof.start()
    try:
        fn()
    finally:
        with _quiet_stderr():
            prof.stop()
    events = sorted(_allocation_events(prof), key=lambda e: e[0])
    live: dict[int, int] = {}
    cur = peak = largest = 0
    for _, b, ptr in events:
        if b > 0:
            live[ptr] = live.get(ptr, 0) + b
            cur += b
            largest = max(largest, b)
        elif ptr in live:  # a free of something this call allocated
            cur -= live.pop(ptr)
        peak = max(peak, cur)
    return peak, largest


def measure_peak_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Bytes fn() allocates above what was live before it, at its peak."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    return cpu_allocation_profile(fn)[0]


def tensor_bytes(tensors: Iterable[Tensor | None], exclude: Iterable[int] = ()) -> int:
    """Bytes of the distinct storages of ``tensors``, not counting storages at the ``exclude`` pointers."""
    seen, total = set(exclude), 0
    for t in tensors:
        if t is None or not isinstance(t, Tensor) or t.numel() == 0:
            continue
        key = t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total
