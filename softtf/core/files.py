"""Atomic file writes and plain safetensors checkpoints (no knowledge of masks or models)."""
from __future__ import annotations

import json
import os
import tempfile
import threading
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

__all__ = ["atomic_write", "write_json", "save_tensors", "load_tensors", "restore_tensor", "current_umask", "new_file_mode"]

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where the OS allows: Linux (>= 4.7) shows it
    in ``/proc/self/status`` ("Umask:"), a read that no other thread can disturb. Elsewhere it is
    read by ``os.umask`` set-and-restore under a lock (other threads creating files in that instant
    could see umask 0o077, never a looser mode)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        old = os.umask(0o077)
        os.umask(old)
    return old


def new_file_mode() -> int:
    """The permission bits a plain ``open(path, "w")`` gives a new file: ``0o666 & ~umask``."""
    return 0o666 & ~current_umask()


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temp file beside ``path``, fsync it, ``os.replace`` it over
    ``path``, then fsync the directory so the rename itself survives a crash.

    The file gets the mode a plain ``open(path, "w")`` would give a new file, ``0o666 & ~umask``
    (``tempfile.mkstemp`` creates it 0o600, readable by its owner alone)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"save: directory {directory!r} of path {path!r} does not exist")
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, new_file_mode())  # after write(): a writer may have replaced the temp file
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a directory: the replace stands, unsynced
        return
    try:
        os.fsync(fd)
    except OSError:  # some platforms and file systems refuse to fsync a directory (EINVAL)
        pass
    finally:
        os.close(fd)


def save_tensors(path: str | os.PathLike, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    """Atomically write plain named tensors (checkpoints of baselines) to a safetensors file."""
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=metadata))


def load_tensors(path: str | os.PathLike) -> dict[str, Tensor]:
    """Every tensor of a safetensors file; a truncated or foreign file is a ValueError naming it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_tensors: no file at {path!r}")
    try:
        with safe_open(path, framework="pt") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # safetensors raises its own error types
        raise ValueError(f"load_tensors: {path!r} is not a readable safetensors file ({exc})") from exc


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON (NaN refused: callers map it to null first)."""

    def write(tmp):
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=2, allow_nan=False)

    atomic_write(path, write)


def restore_tensor(tensors: dict[str, Tensor], key: str, target: Tensor, path: str) -> None:
    """Copy checkpoint tensor ``key`` into ``target`` in place, refusing a missing key or another shape."""
    if key not in tensors:
        raise ValueError(f"resume: checkpoint {path!r} has no {key!r}")
    if tensors[key].shape != target.shape:
        raise ValueError(f"resume: checkpoint {path!r} {key} has shape {tuple(tensors[key].shape)}, expected {tuple(target.shape)}")
    with torch.no_grad():
        target.copy_(tensors[key])
