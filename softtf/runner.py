"""Class-incremental continual-learning runner: Soft-TF and baselines under one protocol.

Protocol (METHOD.md): the classes of a labelled dataset are split into ``n_tasks`` disjoint tasks
(seeded class order). One shared linear head covers every class. While training task ``t`` the
logits of classes outside task ``t`` are set to ``-inf``. After each task, every seen task's test
set is evaluated, giving the accuracy matrix ``A[i, j]``; ACC / Forgetting / BWT / task-id accuracy
follow :mod:`softtf.metrics`.

Task inference at test time (``task_id``):

* ``none``            class-incremental prediction over every seen class (no task inference);
* ``oracle``          the true task is given (task-incremental upper bound);
* ``prompt``          Prompt ID (:mod:`softtf.prompt_id`);
* ``gradient``        Gradient ID, the paper's batch rule: scores from the first ``k_shot`` samples
                      of a test batch applied to the whole batch (test batches hold one task);
* ``gradient-sample`` Gradient ID per sample (no leak of the test-set grouping);
* ``gradient-binary`` SupSup's binary search (keep tasks with g <= median, repeat), per sample.

With task inference the head is restricted to the inferred task's classes (``restrict_head``).

Run directory: ``run_config.json``, ``progress.json`` (updated atomically after every task),
``checkpoints/task_XXX.safetensors`` (the learner's state after task ``XXX``), ``results.json``,
``accuracy_matrix.png``, ``accuracy_curve.png``. Running again on the same directory with the same
configuration resumes after the last finished task; a different configuration is refused.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from . import metrics
from .config import SoftConfig, resolve_config
from .data import ClassIncrementalScenario, LabelledData
from .io import atomic_write, load_masks, load_tensors, save_masks, save_tensors
from .model import SoftModel, wrap
from .prompt_id import PromptID

__all__ = [
    "RunConfig",
    "ContinualClassifier",
    "Learner",
    "SoftTFLearner",
    "run_continual",
    "pretrain",
    "make_learner",
    "METHODS",
    "TASK_ID_MODES",
]

METHODS = ("softtf", "finetune", "lora")
TASK_ID_MODES = ("none", "oracle", "prompt", "gradient", "gradient-sample", "gradient-binary")
_GRADIENT_RULES = {"gradient": "batch", "gradient-sample": "sample", "gradient-binary": "binary-sample"}


# ---------------------------------------------------------------------- configuration
@dataclass
class RunConfig:
    """Hyper-parameters of a continual-learning run (defaults: the public code, METHOD.md).

    ``lr=None`` means ``0.03 * batch_size / 256``. ``task_id=None`` means the method's default
    (softtf/lora: ``prompt``; finetune: ``none``).
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
    soft_config: dict | None = None  # SoftConfig.to_dict(); None: architecture defaults
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"RunConfig: method must be one of {METHODS}, got {self.method!r}")
        if self.task_id is None:
            self.task_id = "none" if self.method == "finetune" else "prompt"
        if self.task_id not in TASK_ID_MODES:
            raise ValueError(f"RunConfig: task_id must be one of {TASK_ID_MODES}, got {self.task_id!r}")
        allowed = {
            "softtf": TASK_ID_MODES[1:],
            "finetune": ("none", "oracle"),
            "lora": ("oracle", "prompt"),
        }[self.method]
        if self.task_id not in allowed:
            raise ValueError(f"RunConfig: method {self.method!r} supports task_id in {allowed}, got {self.task_id!r}")
        for name in ("n_tasks", "epochs", "batch_size", "eval_batch_size", "k_shot", "lora_r"):
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

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    # fields that may change between a run and its resumption
    RESUME_FREE = ("progress", "device", "eval_batch_size")


# ---------------------------------------------------------------------- model
class ContinualClassifier(nn.Module):
    """A backbone producing a feature vector per input + one shared linear head over all classes.

    ``backbone``: a timm ``VisionTransformer`` (its own head is removed; features are the pooled
    pre-logits, the [CLS] token for ``global_pool="token"``) or an HF ``BertModel`` (features: the
    [CLS] token of the last hidden state; a ``Bert*`` task model is reduced to its ``.bert``).
    Inputs: an image tensor for ViT, a dict of token tensors for BERT.
    """

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        from .config import detect_architecture

        arch = detect_architecture(backbone)
        if arch is None:
            raise TypeError(
                f"ContinualClassifier: backbone must be a timm VisionTransformer or an HF BERT model, got {type(backbone).__name__}"
            )
        if arch == "vit":
            backbone.reset_classifier(0)
            dim = backbone.num_features
        else:
            if hasattr(backbone, "bert") and not type(backbone).__name__ == "BertModel":
                backbone = backbone.bert
            dim = backbone.config.hidden_size
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"ContinualClassifier: num_classes must be a positive int, got {num_classes!r}")
        self.arch, self.feature_dim, self.num_classes = arch, int(dim), num_classes
        self.backbone = backbone
        self.head = nn.Linear(self.feature_dim, num_classes)

    def features(self, inputs) -> Tensor:
        if self.arch == "vit":
            if isinstance(inputs, dict):
                raise TypeError("ContinualClassifier: a ViT backbone takes an image tensor, got a dict (text data?)")
            return self.backbone(inputs)
        if not isinstance(inputs, dict):
            raise TypeError("ContinualClassifier: a BERT backbone takes a dict of token tensors, got a tensor (image data?)")
        return self.backbone(**inputs).last_hidden_state[:, 0]

    def forward(self, inputs) -> Tensor:
        return self.head(self.features(inputs))


def _features(model: nn.Module, inputs) -> Tensor:
    return model.features(inputs)


def _to(inputs, device):
    if isinstance(inputs, dict):
        return {k: v.to(device) for k, v in inputs.items()}
    return inputs.to(device)


def _batch_size(inputs) -> int:
    return next(iter(inputs.values())).shape[0] if isinstance(inputs, dict) else inputs.shape[0]


def _index(inputs, idx):
    return {k: v[idx] for k, v in inputs.items()} if isinstance(inputs, dict) else inputs[idx]


# ---------------------------------------------------------------------- learners
class Learner:
    """What a method does around the shared training/evaluation loop of :func:`run_continual`.

    Subclasses implement: :meth:`begin_task` (returns the parameters to optimise besides the head
    and the Prompt-ID key), :meth:`end_task`, :meth:`forward_tasks` (logits given one task index
    per sample, or ``None`` for no task), :meth:`state` / :meth:`load_state` for checkpoints.
    """

    name = "base"

    def __init__(self, clf: ContinualClassifier, scenario: ClassIncrementalScenario, cfg: RunConfig):
        self.clf, self.scenario, self.cfg = clf, scenario, cfg
        self.trained: list[str] = []

    def begin_task(self, t: int) -> list[nn.Parameter]:
        raise NotImplementedError

    def end_task(self, t: int) -> None:
        raise NotImplementedError

    def train_forward(self, inputs) -> Tensor:
        return self.clf(inputs)

    def forward_tasks(self, inputs, task_index: Tensor | None, tasks: list[str]) -> Tensor:
        raise NotImplementedError

    def infer_gradient(self, inputs, tasks: list[str], forward_fn, rule: str) -> Tensor:
        raise ValueError(f"method {self.name!r} does not support Gradient ID")

    def state(self) -> tuple[dict[str, Tensor], dict[str, str]]:
        raise NotImplementedError

    def save(self, path: str, extra: dict[str, Tensor]) -> None:
        """Checkpoint after a task: the learner's tensors + ``extra`` (head, keys), atomically."""
        tensors, meta = self.state()
        save_tensors(path, {**tensors, **{f"extra::{k}": v for k, v in extra.items()}}, meta)

    def load_state(self, path: str, tasks: list[str]) -> dict[str, Tensor]:
        raise NotImplementedError


class SoftTFLearner(Learner):
    """Soft-TransFormers: one soft mask per task on the targeted layers; frozen after its task."""

    name = "softtf"

    def __init__(self, clf, scenario, cfg):
        super().__init__(clf, scenario, cfg)
        soft_cfg = SoftConfig.from_dict(cfg.soft_config) if cfg.soft_config else SoftConfig()
        soft_cfg.modules_to_save = soft_cfg.modules_to_save or []
        self.soft: SoftModel = wrap(clf.backbone, soft_cfg)
        clf.backbone = self.soft

    def begin_task(self, t):
        name = self.scenario.task_name(t)
        self.soft.add_task(name, seed=self.cfg.seed * 1000 + t)
        return self.soft.mask_parameters()

    def end_task(self, t):
        self.soft.freeze_task(self.scenario.task_name(t))
        self.trained.append(self.scenario.task_name(t))

    def forward_tasks(self, inputs, task_index, tasks):
        if task_index is None:
            raise ValueError("softtf needs a task per sample (task_id 'none' is not supported)")
        uniq = torch.unique(task_index)
        if len(uniq) == 1:  # one task in the batch: the plain masked forward (bit-identical to training)
            self.soft.set_task(tasks[int(uniq)])
            return self.clf(inputs)
        from .gradient_id import predict_with_tasks

        return predict_with_tasks(self.clf, inputs, task_index, tasks, forward_fn=self.clf)

    def infer_gradient(self, inputs, tasks, forward_fn, rule):
        from .gradient_id import gradient_id

        res = gradient_id(self.clf, inputs, forward_fn=forward_fn, tasks=tasks, rule=rule, k_shot=self.cfg.k_shot, topk=self.cfg.gradient_topk)
        names = list(res.tasks)
        remap = torch.tensor([tasks.index(n) for n in names], dtype=torch.long)
        return remap[res.task_index.long().cpu()]

    def save(self, path: str, extra: dict[str, Tensor]) -> None:
        save_masks(self.soft, path, extra=extra)  # masks + config + task names (softtf.io format)

    def load_state(self, path, tasks):
        extras = load_masks(self.soft, path)
        if self.soft.tasks != tasks:
            raise ValueError(f"resume: checkpoint {path!r} holds tasks {self.soft.tasks}, expected {tasks}")
        self.trained = list(tasks)
        return extras


def _grouped_forward(clf: nn.Module, inputs, task_index: Tensor, select: Callable[[int], None]) -> Tensor:
    """Logits [B, C] computed task by task: ``select(t)`` then ``clf`` on the samples of task t."""
    out = None
    for t in torch.unique(task_index).tolist():
        rows = (task_index == t).nonzero().squeeze(1)
        select(int(t))
        logits = clf(_index(inputs, rows))
        if out is None:
            out = logits.new_empty(task_index.shape[0], logits.shape[1])
        out[rows] = logits
    return out


def make_learner(clf: ContinualClassifier, scenario: ClassIncrementalScenario, cfg: RunConfig) -> Learner:
    if cfg.method == "softtf":
        return SoftTFLearner(clf, scenario, cfg)
    from .baselines import FinetuneLearner, LoRALearner

    return {"finetune": FinetuneLearner, "lora": LoRALearner}[cfg.method](clf, scenario, cfg)


# ---------------------------------------------------------------------- helpers
def _fingerprint(module: nn.Module) -> str:
    h = hashlib.sha1()
    for n, t in sorted(module.state_dict().items()):
        if isinstance(t, Tensor) and t.is_floating_point():
            h.update(n.encode())
            h.update(np.float64(t.detach().double().sum().item()).tobytes())
            h.update(np.float64(t.detach().double().abs().sum().item()).tobytes())
    return h.hexdigest()


def _write_json(path: str, obj: Any) -> None:
    def write(tmp):
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=2, allow_nan=False)

    atomic_write(path, write)


def _json_safe(x):
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    return x


def _loader(ds: Dataset, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g, num_workers=0)


def _tqdm(it, enabled: bool, **kw):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, leave=False, **kw)


def pretrain(
    model: nn.Module,
    dataset: Dataset,
    num_classes: int,
    *,
    epochs: int = 5,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = False,
    warmup_steps: int = 20,
) -> nn.Module:
    """Supervised warm-up of a random-init backbone on ``dataset`` (a stand-in for pretrained
    weights in offline demos and tests; it sees every class, so it is not part of a CL protocol).
    The backbone's own classifier is removed (``reset_classifier(0)`` for a ViT); a temporary
    head is trained with it and discarded; AdamW with linear warm-up. Returns ``model``
    (trained in place, left in eval mode)."""
    torch.manual_seed(seed)
    clf = ContinualClassifier(model, num_classes).to(device)
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=0.01)
    clf.train()
    step = 0
    for ep in range(epochs):
        for x, y in _tqdm(_loader(dataset, batch_size, True, seed + ep), progress, desc=f"pretrain {ep}"):
            for group in opt.param_groups:  # linear warm-up: ViTs trained from scratch diverge without it
                group["lr"] = lr * min(1.0, (step + 1) / max(warmup_steps, 1))
            step += 1
            loss = F.cross_entropy(clf(_to(x, device)), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    clf.eval()
    return clf.backbone


# ---------------------------------------------------------------------- the run
def run_continual(
    backbone: nn.Module,
    data: LabelledData,
    cfg: RunConfig,
    output_dir: str | os.PathLike | None = None,
    scenario: ClassIncrementalScenario | None = None,
    extra_info: dict | None = None,
) -> dict:
    """Train ``cfg.method`` over the tasks of ``data`` and evaluate after every task.

    ``backbone`` is modified in place (wrapped / adapted). With ``output_dir``, results, plots and
    per-task checkpoints go there, and an existing run with the same configuration resumes after
    its last finished task. Returns the results dict (also written to ``results.json``) plus two
    in-memory entries that are not serialised: ``"_learner"`` and ``"_classifier"`` (the trained
    model), for callers that want to inspect or reuse it.
    """
    if not isinstance(cfg, RunConfig):
        raise TypeError(f"run_continual: cfg must be a RunConfig, got {type(cfg).__name__}")
    if not isinstance(data, LabelledData):
        raise TypeError(f"run_continual: data must be a LabelledData, got {type(data).__name__}")
    scenario = scenario or ClassIncrementalScenario(data.num_classes, cfg.n_tasks, seed=cfg.seed)
    if scenario.n_tasks != cfg.n_tasks or scenario.num_classes != data.num_classes:
        raise ValueError(
            f"run_continual: scenario has {scenario.n_tasks} tasks over {scenario.num_classes} classes, "
            f"config/data say {cfg.n_tasks} tasks over {data.num_classes} classes"
        )
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    clf = ContinualClassifier(backbone, data.num_classes)
    fingerprint = _fingerprint(clf.backbone)
    learner = make_learner(clf, scenario, cfg)
    pid = PromptID(clf.feature_dim, lam=cfg.prompt_lambda) if cfg.task_id == "prompt" else None
    clf.to(device)
    if pid is not None:
        pid.to(device)

    n = cfg.n_tasks
    A = np.full((n, n), np.nan)
    T = np.full((n, n), np.nan)  # task-id accuracy per (after task i, on task j)
    tid_correct = np.zeros((n, n))
    tid_total = np.zeros((n, n))
    timings: list[dict] = []
    start_task = 0
    run_info = {
        "run_config": cfg.to_dict(),
        "scenario": scenario.to_dict(),
        "data": {"num_classes": data.num_classes, "kind": data.kind, **{k: v for k, v in data.info.items()}},
        "backbone": {"class": type(clf.backbone.model if isinstance(clf.backbone, SoftModel) else clf.backbone).__name__, "fingerprint": fingerprint},
        **(extra_info or {}),
    }
    ckpt_dir = None
    if output_dir is not None:
        output_dir = os.fspath(output_dir)
        os.makedirs(output_dir, exist_ok=True)
        ckpt_dir = os.path.join(output_dir, "checkpoints")
        os.makedirs(ckpt_dir, exist_ok=True)
        cfg_path = os.path.join(output_dir, "run_config.json")
        if os.path.isfile(cfg_path):
            with open(cfg_path) as fh:
                old = json.load(fh)
            _check_resume(old, json.loads(json.dumps(_json_safe(run_info))), cfg_path)
        else:
            _write_json(cfg_path, _json_safe(run_info))
        prog_path = os.path.join(output_dir, "progress.json")
        if os.path.isfile(prog_path):
            with open(prog_path) as fh:
                prog = json.load(fh)
            done = int(prog["finished_tasks"])
            if done > 0:
                ck = os.path.join(ckpt_dir, f"task_{done - 1:03d}.safetensors")
                if not os.path.isfile(ck):
                    raise FileNotFoundError(f"resume: {prog_path!r} says {done} tasks finished but {ck!r} is missing")
                tasks = [scenario.task_name(t) for t in range(done)]
                extras = learner.load_state(ck, tasks)
                _load_extras(clf, pid, extras, tasks, ck, device)
                for name, arr in (("A", A), ("task_id", tid_correct), ("task_id_total", tid_total)):
                    rows = np.asarray(prog[name], dtype=np.float64)
                    arr[: rows.shape[0]] = np.where(np.isnan(rows), np.nan, rows) if name == "A" else np.nan_to_num(rows)
                timings = prog.get("timings", [])
                start_task = done

    seen_cls_all: list[int] = []
    for t in range(n):
        seen_cls_all = scenario.seen_classes(t)
        if t < start_task:
            continue
        t0 = time.perf_counter()
        name = scenario.task_name(t)
        torch.manual_seed(cfg.seed * 1000 + t)
        params = list(learner.begin_task(t)) + list(clf.head.parameters())
        if pid is not None:
            params.append(pid.add_key(name, device=device))
        opt = torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        cls = torch.tensor(scenario.task_classes[t], device=device)
        outside = torch.ones(data.num_classes, dtype=torch.bool, device=device)
        outside[cls] = False
        train_set = scenario.subset(data.train, t)
        clf.train()
        losses = []
        for ep in range(cfg.epochs):
            loader = _loader(train_set, cfg.batch_size, True, cfg.seed * 1000 + t * 100 + ep)
            for x, y in _tqdm(loader, cfg.progress, desc=f"{cfg.method} task {t + 1}/{n} epoch {ep + 1}/{cfg.epochs}"):
                x, y = _to(x, device), y.to(device)
                logits = learner.train_forward(x).masked_fill(outside, float("-inf"))
                loss = F.cross_entropy(logits, y)
                if pid is not None:
                    q = pid.query(clf, x, _features)
                    loss = loss + pid.pull_loss(q, name)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
                losses.append(float(loss.detach()))
        learner.end_task(t)
        if pid is not None:
            pid.freeze_key(name)
        t_train = time.perf_counter() - t0

        # ---- evaluation on every seen task
        t1 = time.perf_counter()
        clf.eval()
        tasks = [scenario.task_name(j) for j in range(t + 1)]
        seen = torch.tensor(scenario.seen_classes(t), device=device)
        for j in range(t + 1):
            correct = total = 0
            loader = _loader(scenario.subset(data.test, j), cfg.eval_batch_size, False, 0)
            for x, y in _tqdm(loader, cfg.progress, desc=f"eval after task {t + 1}: task {j + 1}"):
                x, y = _to(x, device), y.to(device)
                pred, tidx = _predict(learner, clf, pid, scenario, cfg, x, j, tasks, seen)
                correct += int((pred == y).sum())
                total += int(y.numel())
                if tidx is not None:
                    tid_correct[t, j] += int((tidx.cpu() == j).sum())
                    tid_total[t, j] += int(y.numel())
            A[t, j] = 100.0 * correct / max(total, 1)
        timings.append({"task": t, "train_s": t_train, "eval_s": time.perf_counter() - t1, "final_loss": float(np.mean(losses[-10:])) if losses else None})

        if output_dir is not None:
            ck = os.path.join(ckpt_dir, f"task_{t:03d}.safetensors")
            extra = {"head.weight": clf.head.weight, "head.bias": clf.head.bias}
            if pid is not None:
                extra.update({f"prompt_key.{k}": v for k, v in pid.keys.items()})
            learner.save(ck, extra)
            _write_json(
                os.path.join(output_dir, "progress.json"),
                _json_safe({
                    "finished_tasks": t + 1,
                    "A": A[: t + 1].tolist(),
                    "task_id": tid_correct[: t + 1].tolist(),
                    "task_id_total": tid_total[: t + 1].tolist(),
                    "timings": timings,
                }),
            )

    results = _results(A, tid_correct, tid_total, cfg, scenario, run_info, timings)
    if output_dir is not None:
        _write_json(os.path.join(output_dir, "results.json"), results)
        from .plots import plot_accuracy_curve, plot_accuracy_matrix

        title = f"{cfg.method} / task-id {cfg.task_id}"
        plot_accuracy_matrix(A, os.path.join(output_dir, "accuracy_matrix.png"), title=title)
        plot_accuracy_curve(A, os.path.join(output_dir, "accuracy_curve.png"), title=title)
    results["_learner"] = learner  # not serialised: lets callers inspect the trained model
    results["_classifier"] = clf
    return results


def _predict(learner, clf, pid, scenario, cfg, x, j, tasks, seen) -> tuple[Tensor, Tensor | None]:
    """Predicted class ids [B] (global) and inferred task indices [B] (or None) for one test batch."""
    B = _batch_size(x)
    mode = cfg.task_id
    seen_list = seen.tolist()

    def seen_logits(inputs):
        return clf(inputs)[:, seen]

    tidx = None
    with torch.no_grad():
        if mode == "oracle":
            tidx = torch.full((B,), j, dtype=torch.long)
        elif mode == "prompt":
            tidx = pid.predict(pid.query(clf, x, _features), tasks).cpu()
    if mode in _GRADIENT_RULES:
        tidx = learner.infer_gradient(x, tasks, seen_logits, _GRADIENT_RULES[mode]).cpu()
    with torch.no_grad():
        logits = learner.forward_tasks(x, None if tidx is None else tidx.to(seen.device), tasks)[:, seen]
        if tidx is not None and cfg.restrict_head:
            task_of = torch.as_tensor(scenario.task_of_class[seen_list], device=logits.device)
            allowed = task_of[None, :] == tidx.to(logits.device)[:, None]
            logits = logits.masked_fill(~allowed, float("-inf"))
        pred = seen[logits.argmax(dim=-1)]
    return pred, (None if mode == "oracle" else tidx)  # the oracle's task ids are given, not inferred


def _restore(tensors: dict[str, Tensor], key: str, param: Tensor, path: str) -> None:
    """Copy checkpoint tensor ``key`` into ``param``, refusing a missing key or another shape."""
    if key not in tensors:
        raise ValueError(f"resume: checkpoint {path!r} has no {key!r}")
    if tensors[key].shape != param.shape:
        raise ValueError(f"resume: checkpoint {path!r} {key} has shape {tuple(tensors[key].shape)}, expected {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(tensors[key])


def _load_extras(clf, pid, extras, tasks, path, device) -> None:
    for key, p in (("head.weight", clf.head.weight), ("head.bias", clf.head.bias)):
        _restore(extras, key, p, path)
    if pid is not None:
        for t in tasks:
            k = f"prompt_key.{t}"
            if k not in extras:
                raise ValueError(f"resume: checkpoint {path!r} has no Prompt-ID key for task {t!r}")
            pid.add_key(t, device=device)
            with torch.no_grad():
                pid.keys[t].copy_(extras[k])
            pid.freeze_key(t)


def _check_resume(old: dict, new: dict, path: str) -> None:
    free = set(RunConfig.RESUME_FREE)
    diffs = []
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section), new.get(section)
        if section == "run_config" and isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                if k not in free and a.get(k) != b.get(k):
                    diffs.append(f"run_config.{k}: {a.get(k)!r} -> {b.get(k)!r}")
        elif a != b:
            diffs.append(f"{section}: {json.dumps(a)[:120]} -> {json.dumps(b)[:120]}")
    if diffs:
        raise ValueError(f"resume: {path!r} belongs to a different run; differences: " + "; ".join(diffs[:6]) + " (use a new output directory)")


def _results(A, tid_correct, tid_total, cfg, scenario, run_info, timings) -> dict:
    summary = metrics.summarize(A)
    out = {
        "method": cfg.method,
        "task_id_mode": cfg.task_id,
        "n_tasks": cfg.n_tasks,
        **summary,
        "accuracy_matrix": _json_safe(A.tolist()),
        "task_id_accuracy": None,
        "task_id_matrix": None,
        "timings": timings,
        **run_info,
    }
    if tid_total.sum() > 0:
        last = tid_total[-1]
        out["task_id_accuracy"] = float(tid_correct[-1].sum() / last.sum()) if last.sum() > 0 else None
        with np.errstate(invalid="ignore", divide="ignore"):
            mat = np.where(tid_total > 0, tid_correct / np.maximum(tid_total, 1), np.nan)
        out["task_id_matrix"] = _json_safe(mat.tolist())
    return _json_safe(out)
