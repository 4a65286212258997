"""Evaluation after a task: predictions on every seen task's test set, with the run's task inference.

Task inference at test time (``RunConfig.task_id``):

* ``none``            class-incremental prediction over every seen class (no task inference);
* ``oracle``          the true task is given (task-incremental upper bound);
* ``prompt``          Prompt ID (:mod:`softtf.inference.prompt_id`);
* ``gradient``        Gradient ID, the paper's batch rule: scores from the first ``k_shot`` samples
                      of a test batch applied to the whole batch (test batches hold one task);
* ``gradient-sample`` Gradient ID per sample (no leak of the test-set grouping);
* ``gradient-binary`` SupSup's binary search (keep tasks with g <= median, repeat), per sample.

With task inference the head is restricted to the inferred task's classes (``restrict_head``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..core.batch import batch_size, to_device
from ..inference.prompt_id import PromptID
from ..methods.base import ContinualMethod
from .config import GRADIENT_RULES, RunConfig
from .loaders import make_loader, progress_bar
from .results import Tallies
from .scenario import ClassIncrementalScenario

__all__ = ["predict", "evaluate_after_task", "classifier_features"]


def classifier_features(model, inputs) -> Tensor:
    """Prompt-ID feature of the run's classifier (its backbone's feature, head excluded)."""
    return model.features(inputs)


def predict(method: ContinualMethod, pid: PromptID | None, scenario: ClassIncrementalScenario, cfg: RunConfig,
            x, j: int, tasks: list[str], seen: Tensor) -> tuple[Tensor, Tensor | None]:
    """Predicted class ids [B] (global) and inferred task indices [B] (or None) for a batch of task j."""
    clf = method.clf
    B = batch_size(x)
    mode = cfg.task_id
    seen_list = seen.tolist()

    def seen_logits(inputs):
        return clf(inputs)[:, seen]

    tidx = None
    with torch.no_grad():
        if mode == "oracle":
            tidx = torch.full((B,), j, dtype=torch.long)
        elif mode == "prompt":
            tidx = pid.predict(pid.query(clf, x, classifier_features, method.pretrained), tasks).cpu()
    if mode in GRADIENT_RULES:
        tidx = method.infer_tasks(x, tasks, seen_logits, GRADIENT_RULES[mode]).cpu()
    with torch.no_grad():
        logits = method.forward_tasks(x, None if tidx is None else tidx.to(seen.device), tasks)[:, seen]
        if tidx is not None and cfg.restrict_head:
            task_of = torch.as_tensor(scenario.task_of_class[seen_list], device=logits.device)
            allowed = task_of[None, :] == tidx.to(logits.device)[:, None]
            logits = logits.masked_fill(~allowed, float("-inf"))
        pred = seen[logits.argmax(dim=-1)]
    return pred, (None if mode == "oracle" else tidx)  # the oracle's task ids are given, not inferred


def evaluate_after_task(method: ContinualMethod, pid: PromptID | None, scenario: ClassIncrementalScenario,
                        test_set, cfg: RunConfig, t: int, tallies: Tallies) -> None:
    """Fill row ``t`` of the tallies: accuracy (and task-id counts) on every task seen so far."""
    device = torch.device(cfg.device)
    method.clf.eval()
    tasks = [scenario.task_name(j) for j in range(t + 1)]
    seen = torch.tensor(scenario.seen_classes(t), device=device)
    for j in range(t + 1):
        correct = total = 0
        loader = make_loader(scenario.subset(test_set, j), cfg.eval_batch_size, False, 0)
        for x, y in progress_bar(loader, cfg.progress, desc=f"eval after task {t + 1}: task {j + 1}"):
            x, y = to_device(x, device), y.to(device)
            pred, tidx = predict(method, pid, scenario, cfg, x, j, tasks, seen)
            correct += int((pred == y).sum())
            total += int(y.numel())
            if tidx is not None:
                tallies.tid_correct[t, j] += int((tidx.cpu() == j).sum())
                tallies.tid_total[t, j] += int(y.numel())
        tallies.A[t, j] = 100.0 * correct / max(total, 1)
