"""The run's metadata: device, versions, load average, configuration (``meta`` of the JSON)."""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib
import os
import platform

import torch

import softtf
import softtf_kernels
from softtf_kernels import available_backends

from .config import BenchConfig

__all__ = ["busy_warning", "device_name", "loadavg", "package_version", "run_metadata"]


def package_version(name: str) -> str | None:
    """``name.__version__`` ("?" without one), None if it cannot be imported."""
    try:
        return getattr(importlib.import_module(name), "__version__", "?")
    except Exception:
        return None


def loadavg() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:  # pragma: no cover
        return "?"


def busy_warning(load_text: str, cores: int | None = None) -> str | None:
    """A warning when other work was keeping the CPU busy as the run began (the 1-minute load average
    above a quarter of the cores): the timings then include waits for descheduled threads, and the
    ratios are unreliable. The end-of-run load is not used: the bench itself raises it."""
    cores = cores or os.cpu_count() or 1
    try:
        one_minute = float(load_text.split()[0])
    except (ValueError, IndexError):
        return None
    if one_minute <= 0.25 * cores:
        return None
    return (f"WARNING: the machine was busy when the run began (1-minute load average {one_minute:.2f} on "
            f"{cores} cores): timings include waits for descheduled threads, so the ratios are unreliable. "
            "Re-run on a quiet machine.")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"CPU {cpu} ({os.cpu_count()} cores visible, {torch.get_num_threads()} torch threads)"


def run_metadata(config: BenchConfig, device: torch.device) -> dict:
    versions = {"softtf": softtf.__version__, "torch": torch.__version__, "python": platform.python_version()}
    for m in ("timm", "transformers", "peft", "numpy", "triton"):
        versions[m] = package_version(m)
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": str(device), "device_name": device_name(device), "threads": torch.get_num_threads(),
        "platform": platform.platform(), "versions": versions, "loadavg_start": (start := loadavg()),
        "busy_warning": busy_warning(start),
        "default_backend": softtf_kernels.backend.resolve("masked_linear", device)[0]
        if softtf_kernels.get_backend() == "auto" else softtf_kernels.get_backend(),
        "available_backends": available_backends(device),
        "args": dataclasses.asdict(config),
        "timing": "warmup, then the median of repeats; candidates interleaved round-robin per task",
        "memory": ("cuda max_memory_allocated - allocated before the call" if device.type == "cuda" else
                   "CPU: peak running sum of torch.profiler allocation events (profile_memory=True) during one call"),
    }
