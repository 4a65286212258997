"""RunConfig: the hyper-parameters of a continual-learning run, validated against the methods."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from ..core.config import SoftConfig
from ..methods import method_class, method_names

__all__ = ["RunConfig", "TASK_ID_MODES", "GRADIENT_RULES"]

TASK_ID_MODES = ("none", "oracle", "prompt", "gradient", "gradient-sample", "gradient-binary")
GRADIENT_RULES = {"gradient": "batch", "gradient-sample": "sample", "gradient-binary": "binary-sample"}


@dataclass
class RunConfig:
    """Hyper-parameters of a continual-learning run (defaults: the public code, METHOD.md).

    ``lr=None`` means ``0.03 * batch_size / 256``. ``task_id=None`` means the method's default
    (``prompt``; finetune: ``none``). It also carries the options methods read
    (:class:`softtf.methods.MethodOptions`).
    """

    method: str = "softtf"
    n_tasks: int = 5
    task_id: str | None = None
    epochs: int = 20
    batch_size: int = 24
    lr: float | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    seed: int = 0
    eval_batch_size: int = 64
    restrict_head: bool = True
    k_shot: int = 7
    gradient_topk: int | None = None
    prompt_lambda: float = 1.0
    lora_r: int = 8
    lora_alpha: float = 16.0
    adapter_bottleneck: int = 16
    soft_config: dict | None = None  # SoftConfig.to_dict(); None: architecture defaults
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.method not in method_names():
            raise ValueError(f"RunConfig: method must be one of {method_names()}, got {self.method!r}")
        method = method_class(self.method)
        if self.task_id is None:
            self.task_id = method.default_task_id
        if self.task_id not in TASK_ID_MODES:
            raise ValueError(f"RunConfig: task_id must be one of {TASK_ID_MODES}, got {self.task_id!r}")
        allowed = method.task_id_modes
        if self.task_id not in allowed:
            raise ValueError(f"RunConfig: method {self.method!r} supports task_id in {allowed}, got {self.task_id!r}")
        for name in ("n_tasks", "epochs", "batch_size", "eval_batch_size", "k_shot", "lora_r", "adapter_bottleneck"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if name == "epochs" else 1):
                raise ValueError(f"RunConfig: {name} must be an int >= {0 if name == 'epochs' else 1}, got {v!r}")
        if self.lr is None:
            self.lr = 0.03 * self.batch_size / 256
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"RunConfig: lr must be a positive finite number, got {self.lr!r}")
        self.lr = float(self.lr)
        if len(tuple(self.betas)) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"RunConfig: betas must be two numbers in [0, 1), got {self.betas!r}")
        self.betas = tuple(float(b) for b in self.betas)
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"RunConfig: grad_clip must be > 0 or None, got {self.grad_clip!r}")
        if self.weight_decay < 0:
            raise ValueError(f"RunConfig: weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.gradient_topk is not None and (not isinstance(self.gradient_topk, int) or self.gradient_topk < 2):
            raise ValueError(f"RunConfig: gradient_topk must be None or an int >= 2, got {self.gradient_topk!r}")
        if self.soft_config is not None:
            SoftConfig.from_dict(self.soft_config)  # validates
        _check_device(self.device)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    # fields that may change between a run and its resumption
    RESUME_FREE = ("progress", "device", "eval_batch_size")


def _check_device(device: str) -> None:
    """A device this machine has: refused now, not after data and model are built."""
    try:
        dev = torch.device(device) if isinstance(device, str) else None
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type == "meta":
        raise ValueError(f"RunConfig: device must be a torch device such as 'cpu', 'cuda' or 'cuda:1', got {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"RunConfig: device {device!r} but no CUDA GPU is available (torch.cuda.is_available() is False); use 'cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"RunConfig: device {device!r} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        try:
            torch.empty(0, device=dev)
        except (RuntimeError, AssertionError) as exc:
            raise ValueError(f"RunConfig: device {device!r} is not usable on this machine ({type(exc).__name__} allocating a tensor there)") from None
