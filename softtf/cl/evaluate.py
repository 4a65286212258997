"""Evaluation after a task: predictions on every seen task's test set, with the run's task inference.

Task inference at test time (``RunConfig.task_id``; :data:`~softtf.cl.config.TASK_ID_INFO` says
which modes decide per sample and which use the test set's grouping by task):

* ``none``            no task inference (class-incremental prediction over every seen class);
* ``oracle``          the true task is given (task-incremental upper bound);
* ``prompt``          Prompt ID per sample (:mod:`softtf.inference.prompt_id`);
* ``prompt-vote``     Prompt ID, majority vote of the per-sample choices over each test batch
                      (the official code; batch-grouped);
* ``gradient``        Gradient ID, the paper's k-shot rule: scores from the first ``k_shot`` samples
                      of a test batch applied to the whole batch (batch-grouped);
* ``gradient-sample`` Gradient ID per sample;
* ``gradient-binary`` SupSup's binary search (keep tasks with g <= median, repeat), per sample;
* ``classifier``      the task-identity classifier (HiDe-Prompt / NoRGa) on the pretrained model's
                      feature, per sample (:mod:`softtf.inference.task_classifier`; the run fits it
                      after each task, :mod:`softtf.cl.tii`).

Both heads are scored in the same pass: ``full`` (argmax over every class seen so far) and, with
task inference, ``task`` (argmax over the inferred task's classes). With a Prompt-ID pool
(``prompt_pool``) a sample may pick the key of a task not learned yet, as in the official code:
it is then predicted by the pretrained network (the method's ``pretrained()`` context; the
official code runs that task's freshly initialised U(0.99, 1) masks instead) and counts as a task-id
miss; the ``task`` head has no learned class for it and counts it wrong.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from ..core.batch import batch_size, take_rows, to_device
from ..inference.prompt_id import PromptID
from ..inference.task_classifier import TaskClassifier
from ..methods.base import ContinualMethod
from .config import CLASSES_PER_TASK, GRADIENT_RULES, RunConfig
from .distributed import Ranks, whole_batches
from .loaders import progress_bar
from .results import Tallies
from .scenario import ClassIncrementalScenario

__all__ = ["Prediction", "predict", "infer_task_index", "evaluate_after_task", "classifier_features", "pretrained_features",
           "gradient_topk", "TaskModel"]

TaskModel = PromptID | TaskClassifier | None  # what a run's task inference holds: Prompt-ID keys, the TII classifier or nothing


def classifier_features(model, inputs) -> Tensor:
    """Prompt-ID feature of the run's classifier (its backbone's feature, head excluded)."""
    return model.features(inputs)


def pretrained_features(method: ContinualMethod, inputs) -> Tensor:
    """The Prompt-ID query feature without grad: the classifier's feature as the pretrained network
    (``method.pretrained()``), the input of the task-identity classifier."""
    with torch.no_grad(), method.pretrained():
        return classifier_features(method.clf, inputs).detach()


@dataclass
class Prediction:
    """Class predictions of one batch under both heads, and the inferred tasks."""

    full: Tensor  # [B] class ids, argmax over every seen class
    task: Tensor | None  # [B] class ids, argmax over the inferred task's classes (-1: no learned class); None without task inference
    task_index: Tensor | None  # [B] inferred task indices (scenario order); None for "none" and "oracle"


def gradient_topk(cfg: RunConfig, scenario: ClassIncrementalScenario, n_logits: int) -> int | None:
    """The top-k of Gradient ID's entropy: None (all logits), an int, or C/T; at most ``n_logits``."""
    k = cfg.gradient_topk
    if k == CLASSES_PER_TASK:
        k = max(2, scenario.num_classes // scenario.n_tasks)
    return None if k is None else min(k, n_logits)


def infer_task_index(method: ContinualMethod, pid: TaskModel, scenario: ClassIncrementalScenario, cfg: RunConfig,
                     x, j: int, tasks: list[str], seen: Tensor) -> Tensor | None:
    """Task indices [B] (CPU, scenario order) for a test batch of task ``j``; None for ``none``.

    ``pid``: the run's Prompt-ID keys (prompt modes) or its :class:`TaskClassifier` (``classifier``).
    With a Prompt-ID pool the indices may point past ``tasks`` (a key of a task not learned yet)."""
    mode, n = cfg.task_id, batch_size(x)
    if mode == "none":
        return None
    if mode == "oracle":
        return torch.full((n,), j, dtype=torch.long)
    if mode in GRADIENT_RULES:
        head = slice(None) if cfg.gradient_logits == "all" else seen
        n_logits = method.clf.num_classes if cfg.gradient_logits == "all" else len(seen)
        return method.infer_tasks(x, tasks, lambda inputs: method.clf(inputs)[:, head], GRADIENT_RULES[mode],
                                  cfg.k_shot, gradient_topk(cfg, scenario, n_logits)).cpu()
    if mode == "classifier":
        if pid.tasks != tasks:
            raise ValueError(f"task_id 'classifier': the classifier learned tasks {pid.tasks}, evaluation expects {tasks}")
        return pid.predict(pretrained_features(method, x)).cpu()
    with torch.no_grad():
        candidates = pid.tasks if cfg.prompt_pool else tasks
        choice = pid.predict(pid.query(method.clf, x, classifier_features, method.pretrained), candidates).cpu()
    if mode == "prompt-vote":  # one task for the whole batch: the most frequent choice (ties: lowest index)
        choice = torch.bincount(choice, minlength=len(candidates)).argmax().expand(n).clone()
    return choice


def predict(method: ContinualMethod, pid: TaskModel, scenario: ClassIncrementalScenario, cfg: RunConfig,
            x, j: int, tasks: list[str], seen: Tensor) -> Prediction:
    """Predictions for a test batch of task ``j`` after learning ``tasks`` (``seen``: their classes)."""
    tidx = infer_task_index(method, pid, scenario, cfg, x, j, tasks, seen)
    with torch.no_grad():
        if tidx is None:
            logits = method.forward_tasks(x, None, tasks)
        else:
            logits = _task_logits(method, x, tidx.to(seen.device), tasks)
        logits = logits[:, seen]
        full = seen[logits.argmax(dim=-1)]
        task = None
        if tidx is not None:
            task_of = torch.as_tensor(scenario.task_of_class[seen.tolist()], device=logits.device)
            allowed = task_of[None, :] == tidx.to(logits.device)[:, None]
            restricted = logits.masked_fill(~allowed, float("-inf"))
            task = torch.where(allowed.any(1), seen[restricted.argmax(dim=-1)], -1)
    return Prediction(full, task, None if cfg.task_id == "oracle" else tidx)  # the oracle's tasks are given, not inferred


def _task_logits(method: ContinualMethod, x, tidx: Tensor, tasks: list[str]) -> Tensor:
    """Logits [B, C], sample b run as task ``tidx[b]``; a task not learned yet: the pretrained network."""
    known = tidx < len(tasks)
    if bool(known.all()):
        return method.forward_tasks(x, tidx, tasks)
    out = None
    for rows, learned in ((known.nonzero().squeeze(1), True), ((~known).nonzero().squeeze(1), False)):
        if rows.numel() == 0:
            continue
        sub = take_rows(x, rows)
        if learned:
            logits = method.forward_tasks(sub, tidx[rows], tasks)
        else:
            with method.pretrained():
                logits = method.clf(sub)
        if out is None:
            out = logits.new_empty(tidx.shape[0], logits.shape[1])
        out[rows] = logits
    return out


def evaluate_after_task(method: ContinualMethod, pid: TaskModel, scenario: ClassIncrementalScenario,
                        test_set, cfg: RunConfig, t: int, tallies: Tallies, ranks: Ranks | None = None) -> None:
    """Fill row ``t`` of the tallies: accuracy under both heads (and task-id counts) on every seen task.

    On several processes (``ranks``) rank r scores test batches r, r+W, ... whole (batch-grouped
    task inference sees the batches a one-process run sees) and the counts are summed over ranks."""
    ranks = ranks or Ranks()
    device = torch.device(cfg.device)
    method.clf.eval()
    tasks = [scenario.task_name(j) for j in range(t + 1)]
    seen = torch.tensor(scenario.seen_classes(t), device=device)
    heads = list(tallies.A)
    for j in range(t + 1):
        correct = {head: 0 for head in heads}
        total = tid_correct = tid_total = 0
        subset = scenario.subset(test_set, j)
        loader = DataLoader(subset, batch_sampler=whole_batches(len(subset), cfg.eval_batch_size, ranks), num_workers=0)
        for x, y in progress_bar(loader, cfg.progress and ranks.is_main, desc=f"eval after task {t + 1}: task {j + 1}"):
            x, y = to_device(x, device), y.to(device)
            pred = predict(method, pid, scenario, cfg, x, j, tasks, seen)
            for head in correct:
                correct[head] += int((getattr(pred, head) == y).sum())
            total += int(y.numel())
            if pred.task_index is not None:
                tid_correct += int((pred.task_index.cpu() == j).sum())
                tid_total += int(y.numel())
        if ranks.distributed:
            *counts, total, tid_correct, tid_total = (int(v) for v in ranks.sum([*correct.values(), total, tid_correct, tid_total]))
            correct = dict(zip(heads, counts))
        tallies.tid_correct[t, j] += tid_correct
        tallies.tid_total[t, j] += tid_total
        for head, c in correct.items():
            tallies.A[head][t, j] = 100.0 * c / max(total, 1)
