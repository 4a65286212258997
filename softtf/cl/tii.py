"""The run's task-identity classifier (``task_id="classifier"``): built from the RunConfig, fitted
after each task on the pretrained model's features of the task's training set, checkpointed with
the run (extras ``task_classifier.*``) and restored on resume.

The features are the Prompt-ID query (:func:`softtf.cl.evaluate.pretrained_features`: the
classifier's feature under ``method.pretrained()``, no grad), computed with the classifier in eval
mode; the classifier itself is :class:`softtf.inference.TaskClassifier`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..core.batch import to_device
from ..inference.task_classifier import TaskClassifier
from ..methods.base import ContinualMethod
from .config import RunConfig
from .evaluate import pretrained_features
from .loaders import make_loader, progress_bar

__all__ = ["PREFIX", "make_task_classifier", "task_features", "fit_task_classifier", "task_classifier_extras",
           "restore_task_classifier"]

PREFIX = "task_classifier."  # checkpoint extras of the classifier's state


def make_task_classifier(cfg: RunConfig, dim: int, num_classes: int) -> TaskClassifier:
    """The run's classifier: ``cfg.tii_*`` and the run's batch size (HiDe-Prompt trains it with the run's batch)."""
    return TaskClassifier(dim, num_classes, epochs=cfg.tii_epochs, ca_epochs=cfg.tii_ca_epochs, batch_size=cfg.batch_size,
                          lr=cfg.tii_lr, ca_lr=cfg.tii_ca_lr, samples_per_class=cfg.tii_samples_per_class,
                          covariance=cfg.tii_covariance, grad_clip=cfg.grad_clip, seed=cfg.seed)


def task_features(method: ContinualMethod, dataset, cfg: RunConfig, desc: str = "features") -> tuple[Tensor, Tensor]:
    """``(features [N, dim], labels [N])`` of ``dataset`` as the pretrained network sees it (eval mode, no grad)."""
    clf, device = method.clf, torch.device(cfg.device)
    was_training = clf.training
    clf.eval()
    feats, labels = [], []
    try:
        for x, y in progress_bar(make_loader(dataset, cfg.eval_batch_size, False, 0), cfg.progress, desc=desc):
            feats.append(pretrained_features(method, to_device(x, device)))
            labels.append(torch.as_tensor(y))
    finally:
        clf.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def fit_task_classifier(tii: TaskClassifier, method: ContinualMethod, dataset, cfg: RunConfig, t: int, name: str) -> None:
    """Learn task ``t`` (``name``) from ``dataset``, its training set; seeded by the run's seed and ``t``."""
    feats, labels = task_features(method, dataset, cfg, desc=f"task-id classifier features, task {t + 1}")
    tii.add_task(name, feats, labels, seed=cfg.seed * 1000 + t)


def task_classifier_extras(tii: TaskClassifier) -> dict[str, Tensor]:
    """The classifier's state as checkpoint extras."""
    return {PREFIX + k: v for k, v in tii.state_dict().items()}


def restore_task_classifier(tii: TaskClassifier, extras: dict[str, Tensor], tasks: list[str], path: str) -> None:
    """Load the classifier's state from a checkpoint's extras; it must have learned exactly ``tasks``."""
    state = {k[len(PREFIX):]: v for k, v in extras.items() if k.startswith(PREFIX)}
    if not state:
        raise ValueError(f"resume: checkpoint {path!r} has no task-identity classifier state ({PREFIX}*)")
    try:
        tii.load_state_dict(state)
    except ValueError as exc:
        raise ValueError(f"resume: checkpoint {path!r}: {exc}") from None
    if tii.tasks != tasks:
        raise ValueError(f"resume: checkpoint {path!r} holds a task-identity classifier of tasks {tii.tasks}, expected {tasks}")
