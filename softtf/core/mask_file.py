"""Saving and loading soft masks (only the masks, + config and task names) with safetensors.

File layout (one ``.safetensors`` file):

* tensor ``"{layer}::{task}"`` for every masked layer and task: the mask, in the dtype it has in
  memory (frozen tasks: the layer's ``mask_dtype``; trainable tasks: fp32);
* tensor ``"extra::{key}"`` for caller-supplied extras (Prompt-ID keys, ...); a SoftModel also stores
  the state of its ``modules_to_save`` (the classifier head) as ``"extra::modules_to_save/{name}"``;
* metadata (strings): ``format = "softtf.masks"``, ``version``, ``config`` (SoftConfig JSON),
  ``layers`` / ``tasks`` / ``frozen`` (JSON lists), ``active_task``, ``mask_dtype`` and any
  caller metadata under ``"user."`` keys.

Writes are atomic: the file goes to a temporary name in the target directory, is fsynced, then
``os.replace``-d over the destination, so a crash never leaves a half-written checkpoint.

A load with ``mmap=True`` keeps the frozen tasks' masks in the file, memory-mapped
(:mod:`softtf.core.mapped_file`): nothing is read until a forward uses a task.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Sequence

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from .config import SoftConfig
from .files import atomic_write
from .layer import MASK_DTYPES, TASK_NAME, SoftLinear, train_dtype
from .tasks import stored_shape
from .mapped_file import map_safetensors
from .saved_modules import SavedModulesLoad
from .serving import ServingGuard, exclusive, refuse_if_serving

__all__ = ["write_mask_file", "read_mask_file", "read_mask_info", "read_extras", "add_tasks_from_file", "FORMAT", "VERSION"]

FORMAT = "softtf.masks"
VERSION = "1"
_SEP = "::"


def _task_state(layers: dict[str, SoftLinear]) -> tuple[list[str], list[str], str | None]:
    first_name, first = next(iter(layers.items()))
    for name, layer in layers.items():
        if layer.tasks != first.tasks or layer.frozen_tasks != first.frozen_tasks:
            raise ValueError(
                f"save_masks: layers disagree on tasks: {first_name!r} has {first.tasks} (frozen {first.frozen_tasks}), "
                f"{name!r} has {layer.tasks} (frozen {layer.frozen_tasks})"
            )
    return first.tasks, first.frozen_tasks, first.active_task


def write_mask_file(
    layers: dict[str, SoftLinear],
    config: SoftConfig | None,
    path: str | os.PathLike,
    extra: dict[str, Tensor] | None = None,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write every task's masks of ``layers`` (+ ``config``, task names, optional extras) to ``path``.

    Args:
        layers: the masked layers by name (all holding the same tasks).
        config: the :class:`SoftConfig` they were wrapped with (``None`` for a bare module).
        path: destination ``.safetensors`` file (its directory must exist); replaced atomically.
        extra: additional named tensors to store (e.g. ``{"head.weight": ...}``).
        metadata: additional string metadata (stored under ``"user."`` keys).
    """
    tasks, frozen, active = _task_state(layers)
    tensors: dict[str, Tensor] = {}
    for lname, layer in layers.items():
        for t in tasks:
            tensors[f"{lname}{_SEP}{t}"] = layer.mask(t).detach().contiguous().cpu()
    for key, value in (extra or {}).items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"save_masks: extra keys must be non-empty strings, got {key!r}")
        if not isinstance(value, Tensor):
            raise TypeError(f"save_masks: extra[{key!r}] must be a Tensor, got {type(value).__name__}")
        tensors[f"extra{_SEP}{key}"] = value.detach().contiguous().cpu()
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "config": json.dumps(config.to_dict()) if config is not None else "null",
        "layers": json.dumps(list(layers)),
        "tasks": json.dumps(tasks),
        "frozen": json.dumps(frozen),
        "active_task": json.dumps(active),
        "mask_dtype": json.dumps({n: str(layer.mask_dtype).removeprefix("torch.") for n, layer in layers.items()}),
    }
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"save_masks: metadata must map str to str, got {key!r}: {type(value).__name__}")
        meta["user." + key] = value
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def read_mask_file(path: str | os.PathLike, mmap: bool = False) -> tuple[dict[str, Tensor], dict]:
    """Read a mask file: ``(tensors, info)`` where ``info`` has the decoded metadata
    (``config`` as a :class:`SoftConfig` or ``None``, ``layers``, ``tasks``, ``frozen``,
    ``active_task``, ``mask_dtype``, ``user``). ``mmap=True``: the tensors are views of a
    memory-mapped copy-on-write mapping of the file (:func:`~softtf.core.mapped_file.map_safetensors`),
    read from disk only when used."""
    if not isinstance(mmap, bool):
        raise TypeError(f"load_masks: mmap must be True or False, got {mmap!r}")
    return _read(path, "mmap" if mmap else "tensors")


def read_mask_info(path: str | os.PathLike) -> dict:
    """The ``info`` of :func:`read_mask_file` (the decoded, checked metadata) without reading a tensor."""
    return _read(path, "header")[1]


def read_extras(path: str | os.PathLike) -> dict[str, Tensor]:
    """The extra tensors a caller stored with the masks (``save_masks(..., extra=...)``; keys
    without ``"extra::"``), checked as a load checks the file; the saved modules' state (the head,
    restored by the load itself) is left out. Nothing is loaded into a model."""
    tensors, _ = read_mask_file(path)
    prefix = "extra" + _SEP
    return SavedModulesLoad.callers_extras({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})


def _read(path: str | os.PathLike, what: str) -> tuple[dict[str, Tensor], dict]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_masks: no mask file at {path!r}")
    try:
        if what == "mmap":
            tensors, meta = map_safetensors(path)
        else:
            with safe_open(path, framework="pt") as fh:
                meta = fh.metadata() or {}
                tensors = {k: fh.get_tensor(k) for k in fh.keys()} if what == "tensors" else {}
    except Exception as exc:  # safetensors raises its own error types
        raise ValueError(f"load_masks: {path!r} is not a readable safetensors file ({exc})") from exc
    if meta.get("format") != FORMAT:
        raise ValueError(f"load_masks: {path!r} is not a softtf mask file (metadata format={meta.get('format')!r}, expected {FORMAT!r})")
    if meta.get("version") != VERSION:
        raise ValueError(f"load_masks: {path!r} has format version {meta.get('version')!r}, this softtf reads {VERSION!r}")
    try:
        info = {k: json.loads(meta[k]) for k in ("config", "layers", "tasks", "frozen", "active_task", "mask_dtype")}
    except (KeyError, json.JSONDecodeError) as exc:
        raise ValueError(f"load_masks: {path!r} has corrupt metadata ({exc!r})") from exc
    _check_metadata(info, path)
    info["user"] = {k[5:]: v for k, v in meta.items() if k.startswith("user.")}
    return tensors, info


def _check_metadata(info: dict, path: str) -> None:
    """Check the type and coherence of every decoded metadata field (in place: ``config`` becomes a
    :class:`SoftConfig`), so a load can refuse a bad file before it touches any layer."""

    def bad(field: str, expected: str) -> ValueError:
        return ValueError(f"load_masks: {path!r} metadata {field!r} must be {expected}, got {info[field]!r}")

    for field, what in (("layers", "layer names"), ("tasks", "task names"), ("frozen", "task names")):
        value = info[field]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise bad(field, f"a list of {what}")
        twice = sorted({v for v in value if value.count(v) > 1})
        if twice:
            raise ValueError(f"load_masks: {path!r} metadata {field!r} lists {twice[0]!r} twice")
    for t in info["tasks"]:
        if not TASK_NAME.match(t):
            raise ValueError(f"load_masks: {path!r} metadata 'tasks': task name {t!r} must match [A-Za-z0-9_-]+")
    if not set(info["frozen"]) <= set(info["tasks"]):
        raise ValueError(f"load_masks: {path!r} lists frozen tasks {info['frozen']} that are not among its tasks {info['tasks']}")
    if info["active_task"] is not None and info["active_task"] not in info["tasks"]:
        raise bad("active_task", f"null or one of its tasks {info['tasks']}")
    names = {str(d).removeprefix("torch.") for d in MASK_DTYPES}
    dtypes = info["mask_dtype"]
    if not isinstance(dtypes, dict) or sorted(dtypes) != sorted(info["layers"]) or not all(v in names for v in dtypes.values()):
        raise bad("mask_dtype", f"a dict mapping each layer to a dtype name in {sorted(names)}")
    try:
        info["config"] = None if info["config"] is None else SoftConfig.from_dict(info["config"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"load_masks: {path!r} metadata 'config' is not a SoftConfig ({exc})") from exc


def add_tasks_from_file(layers: dict[str, SoftLinear], config: SoftConfig | None, path: str | os.PathLike,
                        check_extras: Callable[[dict[str, Tensor]], None] | None = None,
                        commit_extras: Callable[[], None] | None = None,
                        guards: Sequence[ServingGuard] = (), mmap: bool = False) -> dict[str, Tensor]:
    """Add the tasks stored in ``path`` to ``layers`` (same layers, shapes and mask dtypes).

    All or nothing: every check runs before the model is touched (the metadata's fields and
    types; the file's layers must be exactly the model's masked layers, no stored task may
    already exist in the model, every mask must have its layer's weight shape and the dtype it
    was saved with: frozen, the layer's ``mask_dtype``; trainable, the layer's training dtype),
    then every layer's new state is built, and only then committed to all layers. Frozen tasks
    are frozen again in the saved order; the saved active task (else the last loaded task) is
    selected. ``check_extras(extras)``, if given, runs after the mask checks and before anything
    changes (it raises to refuse the file); ``commit_extras()`` runs with the layers' commits.

    While serving: the commits run under :func:`~softtf.core.serving.exclusive` over ``guards`` (the
    owning model's) and every layer's, so the load is refused, before anything changes, while
    another thread's forward call is in flight (checked before the file is read, and again at the
    commit). Returns the extra tensors (keys without ``"extra::"``).

    ``mmap=True`` (CPU layers only): the frozen tasks' masks stay views of the memory-mapped file
    (the file must not be changed in place while the model uses them; see
    :mod:`softtf.core.mapped_file`); trainable masks and extras are read as usual.
    """
    all_guards = [*guards, *(layer.serving_guard for layer in layers.values())]
    operation = f"load_masks({os.fspath(path)!r})"
    refuse_if_serving(all_guards, operation)
    off_cpu = sorted({str(layer.weight.device) for layer in layers.values()} - {"cpu"})
    if mmap and off_cpu:
        raise ValueError(f"load_masks: mmap=True keeps masks in host memory and serves CPU layers only; the masked layers "
                         f"are on {off_cpu} (load with mmap=False, or load on the CPU and move the model)")
    tensors, info = read_mask_file(path, mmap=mmap)
    path = os.fspath(path)
    file_layers, tasks, frozen = info["layers"], info["tasks"], info["frozen"]
    missing = [n for n in layers if n not in file_layers]
    unexpected = [n for n in file_layers if n not in layers]
    if missing or unexpected:
        raise ValueError(
            f"load_masks: {path!r} does not match the model's masked layers: missing in file {missing[:6]}, "
            f"not in model {unexpected[:6]} (file config: {info['config'] and info['config'].to_dict()}, "
            f"model config: {config and config.to_dict()})"
        )
    existing = next(iter(layers.values())).tasks
    clash = [t for t in tasks if t in existing]
    if clash:
        raise ValueError(f"load_masks: tasks {clash} from {path!r} already exist in the model (tasks: {existing}); delete them first")
    for lname, layer in layers.items():
        w = layer.weight
        trainable_dtype = train_dtype(w.dtype)
        for t in tasks:
            key = f"{lname}{_SEP}{t}"
            if key not in tensors:
                raise ValueError(f"load_masks: {path!r} has no mask for layer {lname!r} task {t!r} (key {key!r})")
            m = tensors[key]
            want = layer.mask_dtype if t in frozen else trainable_dtype
            shape = stored_shape(w.shape, want)  # int8 masks: 8 more bytes per row (scale, offset)
            if tuple(m.shape) != shape:
                raise ValueError(
                    f"load_masks: layer {lname!r} task {t!r}: expected mask shape {shape}, got {tuple(m.shape)}"
                )
            if m.dtype != want:
                raise ValueError(
                    f"load_masks: layer {lname!r} task {t!r}: expected mask dtype {want} "
                    f"({'frozen' if t in frozen else 'trainable'}), got {m.dtype}"
                )
    mask_keys = {f"{l}{_SEP}{t}" for l in file_layers for t in tasks}
    stray = [k for k in tensors if k not in mask_keys and not k.startswith("extra" + _SEP)]
    if stray:
        raise ValueError(f"load_masks: {path!r} has tensors that are neither masks nor extras: {stray[:6]}")

    extras = {k[len("extra" + _SEP):]: v.clone() if mmap else v for k, v in tensors.items() if k.startswith("extra" + _SEP)}
    if check_extras is not None:
        check_extras(extras)
    commits = [  # build every layer's new state first: a failure here leaves the model as it was
        layer.stage_tasks({t: tensors[f"{lname}{_SEP}{t}"] for t in tasks}, frozen, info["active_task"], mapped=mmap)
        for lname, layer in layers.items()
    ]
    with exclusive(all_guards, operation):  # every layer checked, then every layer changed
        for commit in commits:
            commit()
        if commit_extras is not None:
            commit_extras()
    return extras


