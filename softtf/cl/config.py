"""RunConfig: the hyper-parameters of a continual-learning run, validated against the methods."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from ..core.config import SoftConfig
from ..inference.task_classifier import COVARIANCES
from ..methods import method_class, method_names

__all__ = ["RunConfig", "TASK_ID_MODES", "GRADIENT_RULES", "TASK_ID_INFO", "HEAD_MODES", "PROTOCOLS", "PROMPT_MODES", "PROMPT_ACTIVATIONS", "CLASSES_PER_TASK", "TII_COVARIANCES", "TRANSFER_METRICS",
           "protocol_settings",
           "task_id_label"]

GROUPED = "batch-grouped: uses the test set's grouping by task"

# mode -> (how it decides, what it is). Modes marked GROUPED decide for a whole test batch from
# the batch's samples together; that is only right because test batches hold one task each, which
# a deployed model cannot know. Results and plots carry the label.
TASK_ID_INFO = {
    "none": ("no task inference", "class-incremental prediction over every seen class"),
    "oracle": ("oracle: true task given", "task-incremental upper bound"),
    "prompt": ("per sample", "Prompt ID: argmax_t cos(q(x), k_t) for each sample"),
    "prompt-vote": (GROUPED, "Prompt ID, majority vote of the per-sample choices over each test batch (official code)"),
    "gradient": (GROUPED, "Gradient ID, k-shot: scores of the first k_shot samples of each test batch applied to the whole "
                          "batch (the paper's rule)"),
    "gradient-sample": ("per sample", "Gradient ID, each sample its own scores"),
    "gradient-binary": ("per sample", "Gradient ID, SupSup's binary search per sample"),
    "classifier": ("per sample", "task-identity classifier (HiDe-Prompt / NoRGa): an MLP on the pretrained model's feature "
                                 "predicts the class among every seen class, trained per task with old classes drawn from "
                                 "Gaussian class statistics; the task is that class's task"),
}
TASK_ID_MODES = tuple(TASK_ID_INFO)
GRADIENT_RULES = {"gradient": "batch", "gradient-sample": "sample", "gradient-binary": "binary-sample"}
PROMPT_MODES = ("prompt", "prompt-vote")
HEAD_MODES = ("full", "task")  # argmax over every seen class | over the inferred task's classes
CLASSES_PER_TASK = "classes-per-task"  # gradient_topk: C/T, the official code's top-k
PROTOCOLS = ("default", "official")
PROMPT_ACTIVATIONS = ("sigmoid", "tanh", "gelu")  # NoRGa's gate (softtf.prefix_attention's activations)
TRANSFER_METRICS = ("paper", "official")  # FWT / BWT as SAPT's paper defines them | as its score.py computes them
TII_COVARIANCES = COVARIANCES  # class statistics of task_id "classifier" (softtf.inference.TaskClassifier)


def task_id_label(mode: str) -> str:
    """``mode (how it decides)``, the honest label results and plots carry."""
    return f"{mode} ({TASK_ID_INFO[mode][0]})"


def protocol_settings(protocol: str, task_id: str) -> dict:
    """RunConfig fields of an evaluation protocol for a run whose task inference is ``task_id``.

    ``"official"`` reproduces the evaluation of the official Soft-TF code (ihaeyong/Soft-TF,
    engine.py / prompt.py): test batches of 24, argmax over the whole head, Prompt ID by majority
    vote over each batch against every pool key (untrained ones included, keys initialised U(-1, 1)),
    Gradient ID from the first 7 samples of each batch with the entropy over the top C/T logits of
    the whole head. Its task inference is batch-grouped: it uses the test set's grouping by task.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if protocol == "default":
        return {"protocol": "default"}
    if task_id not in TASK_ID_MODES:
        raise ValueError(f"task_id must be one of {TASK_ID_MODES}, got {task_id!r}")
    official_mode = {"prompt": "prompt-vote", "gradient-sample": "gradient", "gradient-binary": "gradient"}
    out = {"protocol": "official", "task_id": official_mode.get(task_id, task_id), "eval_batch_size": 24, "head": "full"}
    if out["task_id"] in GRADIENT_RULES:
        out.update(k_shot=7, gradient_topk=CLASSES_PER_TASK, gradient_logits="all")
    if out["task_id"] in PROMPT_MODES:
        out.update(prompt_key_init="uniform", prompt_pool=True)
    return out


@dataclass
class RunConfig:
    """Hyper-parameters of a continual-learning run (defaults: the public code, METHOD.md).

    ``lr=None`` means ``0.03 * batch_size / 256``. ``task_id=None`` means the method's default
    (``prompt``; finetune: ``none``). It also carries the options methods read
    (:class:`softtf.methods.MethodOptions`).

    Evaluation: every run scores both heads (``full``: argmax over every class seen so far;
    ``task``: over the inferred task's classes); ``head`` says which one the summary (``acc`` ...)
    shows. ``gradient_logits`` (``seen`` | ``all`` head classes) and ``gradient_topk`` (None, an
    int, or ``"classes-per-task"`` = C/T) choose the logits of Gradient ID's entropy.
    ``prompt_key_init`` (``normal``: N(0, 0.02^2) | ``uniform``: U(-1, 1)) and ``prompt_pool``
    (one key per task of the run created up front, untrained ones matched too) shape Prompt ID.
    ``protocol`` labels the preset the evaluation follows (:func:`protocol_settings`).
    ``lora_r`` / ``adapter_bottleneck`` may be ``"matched"``: the size at which the method trains
    as many parameters per task as Soft-TF's masks (the paper's same-budget comparison).
    ``masks`` adds Soft-TF masks to a prompt method (l2p, dualprompt, norga) on ``soft_config``'s
    layers (default: qkv + proj of the last 3 blocks, 9-11 of ViT-B); ``prompt_activation`` is
    NoRGa's gate activation.
    ``tii_*`` configure ``task_id="classifier"`` (:class:`softtf.inference.TaskClassifier`, HiDe-Prompt's
    defaults): ``tii_epochs`` on the task's features, ``tii_ca_epochs`` of alignment on Gaussian samples,
    ``tii_lr`` (None: ``0.0005 * batch_size / 256``), ``tii_ca_lr`` (None: ``0.005 * batch_size / 256``),
    ``tii_samples_per_class`` (None: ``batch_size``), ``tii_covariance`` (``full`` | ``diagonal``).
    ``sapt_*`` configure ``method="sapt"`` (the official SAPT code's defaults): LoRA rank ``sapt_r`` and
    ``sapt_alpha`` (scaling alpha/r) on q and v, ``sapt_kl_ratio`` of the attentive reflection, and
    ``sapt_replay_size`` stored training inputs per task replayed for it (0: no buffer).
    ``reference_acc``: single-task accuracy of each task (task order, the unit of the accuracy matrix),
    for SAPT's FWT; ``transfer_metrics`` (``paper`` | ``official``): FWT / BWT as the SAPT paper
    defines them or as its score.py computes them (:func:`softtf.cl.metrics.transfer_summary`).
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
    head: str = "full"
    k_shot: int = 7
    gradient_topk: int | str | None = None
    gradient_logits: str = "seen"
    prompt_lambda: float = 1.0
    prompt_key_init: str = "normal"
    prompt_pool: bool = False
    protocol: str = "default"
    lora_r: int | str = 8
    lora_alpha: float = 16.0
    adapter_bottleneck: int | str = 16
    masks: bool = False
    prompt_activation: str = "sigmoid"
    tii_epochs: int = 20
    tii_ca_epochs: int = 30
    tii_lr: float | None = None
    tii_ca_lr: float | None = None
    tii_samples_per_class: int | None = None
    tii_covariance: str = "full"
    sapt_r: int = 4
    sapt_alpha: float = 32.0
    sapt_kl_ratio: float = 0.5
    sapt_replay_size: int = 32
    reference_acc: list | None = None
    transfer_metrics: str = "paper"
    soft_config: dict | None = None  # SoftConfig.to_dict(); None: architecture defaults
    device: str = "cpu"
    progress: bool = True
    # several processes: shard the backbone's frozen blocks with FSDP2 (softtf.cl.distributed.shard_frozen_blocks)
    fsdp: bool = False

    def __post_init__(self) -> None:
        if self.method not in method_names():
            raise ValueError(f"RunConfig: method must be one of {method_names()}, got {self.method!r}")
        method = method_class(self.method)
        if self.task_id is None:
            self.task_id = method.resolve_task_id(self)
        if self.task_id not in TASK_ID_MODES:
            raise ValueError(f"RunConfig: task_id must be one of {TASK_ID_MODES}, got {self.task_id!r}")
        allowed = method.task_id_modes
        if self.task_id not in allowed:
            raise ValueError(f"RunConfig: method {self.method!r} supports task_id in {allowed}, got {self.task_id!r}")
        for name in ("n_tasks", "epochs", "batch_size", "eval_batch_size", "k_shot", "lora_r", "adapter_bottleneck",
                     "tii_epochs", "tii_ca_epochs", "tii_samples_per_class", "sapt_r", "sapt_replay_size"):
            v = getattr(self, name)
            if (name in ("lora_r", "adapter_bottleneck") and v == "matched") or (name == "tii_samples_per_class" and v is None):
                continue
            low = 0 if name in ("epochs", "tii_epochs", "tii_ca_epochs", "sapt_replay_size") else 1
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ValueError(f"RunConfig: {name} must be an int >= {low}, got {v!r}")
        for name in ("tii_lr", "tii_ca_lr"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 and math.isfinite(v))):
                raise ValueError(f"RunConfig: {name} must be None or a positive finite number, got {v!r}")
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
        k = self.gradient_topk
        if k is not None and k != CLASSES_PER_TASK and (not isinstance(k, int) or isinstance(k, bool) or k < 2):
            raise ValueError(f"RunConfig: gradient_topk must be None, an int >= 2 or {CLASSES_PER_TASK!r}, got {k!r}")
        for name, allowed in (("head", HEAD_MODES), ("gradient_logits", ("seen", "all")),
                              ("prompt_key_init", ("normal", "uniform")), ("protocol", PROTOCOLS),
                              ("tii_covariance", TII_COVARIANCES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"RunConfig: {name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.head == "task" and self.task_id == "none":
            raise ValueError("RunConfig: head 'task' needs task inference; task_id 'none' has none (use head 'full')")
        if not isinstance(self.prompt_pool, bool):
            raise ValueError(f"RunConfig: prompt_pool must be a bool, got {self.prompt_pool!r}")
        if self.prompt_pool and self.task_id not in PROMPT_MODES:
            raise ValueError(f"RunConfig: prompt_pool only applies to task_id in {PROMPT_MODES}, got {self.task_id!r}")
        if not isinstance(self.masks, bool):
            raise ValueError(f"RunConfig: masks must be a bool, got {self.masks!r}")
        if self.prompt_activation not in PROMPT_ACTIVATIONS:
            raise ValueError(f"RunConfig: prompt_activation must be one of {PROMPT_ACTIVATIONS}, got {self.prompt_activation!r}")
        self._check_sapt_and_transfer()
        method.check_options(self)
        if self.soft_config is not None:
            SoftConfig.from_dict(self.soft_config)  # validates
        _check_device(self.device)

    def _check_sapt_and_transfer(self) -> None:
        for name, zero_ok in (("sapt_alpha", False), ("sapt_kl_ratio", True)):
            v = getattr(self, name)
            if (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                    or v < 0 or (v == 0 and not zero_ok)):
                raise ValueError(f"RunConfig: {name} must be a finite number {'>= 0' if zero_ok else '> 0'}, got {v!r}")
            setattr(self, name, float(v))
        if self.transfer_metrics not in TRANSFER_METRICS:
            raise ValueError(f"RunConfig: transfer_metrics must be one of {TRANSFER_METRICS}, got {self.transfer_metrics!r}")
        ref = self.reference_acc
        if ref is not None:
            if (isinstance(ref, (str, bytes, dict)) or not hasattr(ref, "__len__") or len(ref) != self.n_tasks
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in ref)):
                raise ValueError(f"RunConfig: reference_acc must be None or {self.n_tasks} finite numbers (single-task "
                                 f"accuracy of each task, in task order), got {ref!r}")
            self.reference_acc = [float(v) for v in ref]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    # fields that may change between a run and its resumption (the transfer metrics only read the
    # accuracy matrix: re-running a finished run with a reference rewrites results.json with FWT)
    RESUME_FREE = ("progress", "device", "reference_acc", "transfer_metrics", "fsdp")


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
