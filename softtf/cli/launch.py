"""``softtf train --nproc N``: start N worker processes on this machine, as torchrun would.

Each worker is ``python -m softtf.cli`` with the same flags and torchrun's environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` on a free
local port). When a worker fails or is killed, the others are stopped (SIGTERM, then SIGKILL) and
its exit status is returned; the run directory then holds the tasks finished before, and the same
command resumes after them. Ctrl-C stops every worker.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from typing import Sequence

__all__ = ["launch_workers", "worker_threads", "free_port"]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the rendezvous of the workers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_threads(local_world: int) -> int:
    """torch threads per worker when ``--threads`` is not given: this machine's cores shared out."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(local_world, 1))


def _stop(procs: list[subprocess.Popen], grace_s: float = 5.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def launch_workers(argv: Sequence[str], nproc: int) -> int:
    """Run ``softtf <argv>`` in ``nproc`` workers; 0 when all succeed, else the first failure's status."""
    port = free_port()
    procs = []
    for rank in range(nproc):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-m", "softtf.cli", *argv], env=env))
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                _stop(procs)
                code = failed[0]
                return code if code > 0 else 128 - code  # killed by signal s: 128 + s, as a shell reports it
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.1)
    except KeyboardInterrupt:
        _stop(procs)
        return 130
