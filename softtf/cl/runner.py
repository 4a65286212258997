"""Class-incremental continual learning: any registered method under one protocol.

Protocol (METHOD.md): the classes of a labelled dataset are split into ``n_tasks`` disjoint tasks
(seeded class order), or, for data made of one dataset per task (``LabelledData.tasks``, the
``textdir:`` source), each dataset is a task (:func:`softtf.cl.scenario.scenario_for`). One
shared linear head covers every class. While training task ``t`` the logits of classes outside
task ``t`` are set to ``-inf``. After each task, every seen task's test
set is evaluated, giving the accuracy matrix ``A[i, j]``; ACC / Forgetting / BWT / task-id accuracy
follow :mod:`softtf.cl.metrics`; task inference: :mod:`softtf.cl.evaluate`.

A run is four named steps, each a method of :class:`ContinualRun`: ``resume`` (from the run
directory), ``train_task``, ``evaluate`` and ``checkpoint``; :func:`run_continual` strings them
together and returns a :class:`~softtf.cl.results.RunResult`. Running again on the same directory
with the same configuration resumes after the last finished task (:mod:`softtf.cl.run_dir`).
"""
from __future__ import annotations

import hashlib
import math
import os
import time
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..core.batch import to_device
from ..core.files import restore_tensor
from ..core.model import SoftModel
from ..inference.prompt_id import PromptID
from ..methods import method_class
from ..methods.base import ContinualMethod
from .classifier import ContinualClassifier
from .config import PROMPT_MODES, TASK_ID_INFO, RunConfig, task_id_label
from .data import LabelledData
from .distributed import Ranks, TrainStep, batch_shares, current_ranks, data_parallel, shard_frozen_blocks
from .evaluate import classifier_features, evaluate_after_task
from .loaders import progress_bar
from .results import RunResult, Tallies, json_safe
from .run_dir import RunDirectory
from .scenario import ClassIncrementalScenario, scenario_for
from .tii import fit_task_classifier, make_task_classifier, restore_task_classifier, task_classifier_extras

__all__ = ["ContinualRun", "run_continual", "fingerprint"]


def fingerprint(module: nn.Module) -> str:
    """A cheap hash of a module's floating-point state (to recognise the same backbone on resume)."""
    h = hashlib.sha1()
    for n, t in sorted(module.state_dict().items()):
        if isinstance(t, Tensor) and t.is_floating_point():
            h.update(n.encode())
            h.update(np.float64(t.detach().double().sum().item()).tobytes())
            h.update(np.float64(t.detach().double().abs().sum().item()).tobytes())
    return h.hexdigest()


class ContinualRun:
    """One run: the classifier, the method, Prompt-ID keys or the task-identity classifier (when
    used: ``pid``, ``tii``) and the tallies."""

    def __init__(self, backbone: nn.Module, data: LabelledData, cfg: RunConfig,
                 scenario: ClassIncrementalScenario, directory: RunDirectory | None, extra_info: dict | None,
                 ranks: Ranks | None = None):
        self.data, self.cfg, self.scenario, self.directory = data, cfg, scenario, directory
        self.ranks = ranks or current_ranks()
        self.resumed_from: str | None = None  # the checkpoint resume() restored, if any
        self.device = torch.device(cfg.device)
        torch.manual_seed(cfg.seed)
        self.clf = ContinualClassifier(backbone, data.num_classes)
        backbone_print = fingerprint(self.clf.backbone)
        self.method: ContinualMethod = method_class(cfg.method)(self.clf, cfg)
        self.pid = None
        if cfg.task_id in PROMPT_MODES:
            self.pid = PromptID(self.clf.feature_dim, lam=cfg.prompt_lambda, init=cfg.prompt_key_init)
            for t in range(cfg.n_tasks if cfg.prompt_pool else 0):  # the official pool: every key up front
                self.pid.add_key(scenario.task_name(t), trainable=False)
        self.tii = make_task_classifier(cfg, self.clf.feature_dim, data.num_classes) if cfg.task_id == "classifier" else None
        self.clf.to(self.device)
        if cfg.fsdp:  # after the method adapted the backbone: what trains now stays whole
            shard_frozen_blocks(self.clf.backbone, self.ranks)
        for part in (self.pid, self.tii):
            if part is not None:
                part.to(self.device)
        self.tallies = Tallies(cfg.n_tasks, ("full",) if cfg.task_id == "none" else ("full", "task"))
        base = self.clf.backbone.model if isinstance(self.clf.backbone, SoftModel) else self.clf.backbone
        self.run_info = json_safe({
            "run_config": cfg.to_dict(),
            "scenario": scenario.to_dict(),
            "data": {"num_classes": data.num_classes, "kind": data.kind, **dict(data.info)},
            "backbone": {"class": type(base).__name__, "fingerprint": backbone_print},
            "method_info": self.method.info(),
            **(extra_info or {}),
        })

    # ---------------------------------------------------------------- steps
    def resume(self) -> int:
        """Claim the run directory and restore the last finished task; returns the next task."""
        if self.directory is None:
            return 0
        if self.ranks.is_main:
            self.directory.claim(self.run_info)
        self.ranks.barrier()  # the other ranks read what rank 0 checked
        prog, ck = self.directory.progress(self.cfg.n_tasks, self.tallies.matrix_names())
        if prog is None:
            return 0
        done = prog["finished_tasks"]
        self.restore(ck, done - 1)
        self.tallies.restore(prog)
        self.resumed_from = ck
        return done

    def restore(self, path: str, t: int) -> None:
        """Load the checkpoint ``path`` saved after task ``t``: the method's state, head, keys, classifier."""
        tasks = [self.scenario.task_name(j) for j in range(t + 1)]
        extras = self.method.load(path, tasks)
        self._restore_extras(extras, tasks, path)

    def train_task(self, t: int) -> tuple[float, float | None]:
        """Train task ``t``; returns its seconds and its final loss (mean of the last 10 steps).
        On several processes each rank trains on its share of every batch under DDP
        (:mod:`softtf.cl.distributed`); the losses are the global batches'."""
        cfg, clf, pid, ranks = self.cfg, self.clf, self.pid, self.ranks
        t0 = time.perf_counter()
        name = self.scenario.task_name(t)
        torch.manual_seed(cfg.seed * 1000 + t)
        params = list(self.method.begin_task(t, name)) + list(clf.head.parameters())
        if pid is not None:
            params.append(pid.train_key(name) if cfg.prompt_pool else pid.add_key(name, device=self.device))
        opt = torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        outside = torch.ones(self.data.num_classes, dtype=torch.bool, device=self.device)
        outside[torch.tensor(self.scenario.task_classes[t], device=self.device)] = False

        def step(x, y, weight: float) -> Tensor:
            loss = self.method.loss(self.method.forward(x).masked_fill(outside, float("-inf")), y)
            if pid is not None:
                loss = loss + pid.pull_loss(pid.query(clf, x, classifier_features, self.method.pretrained), name)
            return loss if weight == 1.0 else loss * weight

        model = data_parallel(TrainStep(params, step), ranks, self.method.may_skip_parameters)
        train_set = self.scenario.subset(self.data.train, t)
        clf.train()
        losses = []
        for ep in range(cfg.epochs):
            seed = cfg.seed * 1000 + t * 100 + ep
            # one process: its share is every batch whole, weight 1 (the order make_loader gives)
            shares = batch_shares(len(train_set), cfg.batch_size, seed, ranks)
            batches = zip(DataLoader(train_set, batch_sampler=[i for i, _ in shares]), (w for _, w in shares))
            desc = f"{cfg.method} task {t + 1}/{cfg.n_tasks} epoch {ep + 1}/{cfg.epochs}"
            for (x, y), weight in progress_bar(batches, cfg.progress and ranks.is_main, desc=desc,
                                               total=math.ceil(len(train_set) / cfg.batch_size)):
                x, y = to_device(x, self.device), y.to(self.device)
                loss = model(x, y, weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
                losses.append(float(loss.detach()) / ranks.world)  # summed over ranks below: the global batch's loss
        losses = ranks.sum(losses).tolist() if ranks.distributed else losses
        self.method.end_task(t, name)
        if pid is not None:
            pid.freeze_key(name)
        if self.tii is not None:  # HiDe-Prompt's task-identity classifier learns the task from the frozen features
            fit_task_classifier(self.tii, self.method, train_set, cfg, t, name)
        return time.perf_counter() - t0, (float(np.mean(losses[-10:])) if losses else None)

    def evaluate(self, t: int) -> float:
        """Evaluate every seen task after task ``t``; returns the seconds it took."""
        t1 = time.perf_counter()
        task_model = self.pid if self.tii is None else self.tii
        # FSDP gathers weights collectively, so every rank must run the same forwards: each scores every batch
        ranks = Ranks() if self.cfg.fsdp else self.ranks
        evaluate_after_task(self.method, task_model, self.scenario, self.data.test, self.cfg, t, self.tallies, ranks)
        return time.perf_counter() - t1

    def checkpoint(self, t: int) -> None:
        """Save the state after task ``t`` and the progress so far (atomically; rank 0 only)."""
        if self.directory is None or not self.ranks.is_main:
            return
        extra = {"head.weight": self.clf.head.weight, "head.bias": self.clf.head.bias}
        if self.pid is not None:
            extra.update({f"prompt_key.{k}": v for k, v in self.pid.keys.items()})
        if self.tii is not None:
            extra.update(task_classifier_extras(self.tii))
        self.method.save(self.directory.checkpoint(t), extra)
        self.directory.write_progress(self.tallies.progress(t + 1))

    def result(self) -> RunResult:
        cfg = self.cfg
        labels = {
            "method": cfg.method, "task_id_mode": cfg.task_id, "task_id_label": task_id_label(cfg.task_id),
            "task_id_grouping": TASK_ID_INFO[cfg.task_id][0], "task_id_description": TASK_ID_INFO[cfg.task_id][1],
            "protocol": cfg.protocol, "n_tasks": cfg.n_tasks,
        }
        record = self.tallies.record(cfg.head, labels, self.run_info)
        if self.directory is not None and self.ranks.is_main:
            title = f"{self.data.display_name} ({cfg.n_tasks} tasks) / {cfg.method} / task-id {task_id_label(cfg.task_id)} / protocol {cfg.protocol}"
            self.directory.write_results(record, self.tallies.A, cfg.head, title)
        return RunResult(record, self.method, self.clf)

    def _restore_extras(self, extras: dict[str, Tensor], tasks: list[str], path: str) -> None:
        for key, p in (("head.weight", self.clf.head.weight), ("head.bias", self.clf.head.bias)):
            restore_tensor(extras, key, p, path)
        if self.pid is not None:
            for t in self.pid.tasks if self.cfg.prompt_pool else tasks:  # a pool saves every key, trained or not
                k = f"prompt_key.{t}"
                if k not in extras:
                    raise ValueError(f"resume: checkpoint {path!r} has no Prompt-ID key for task {t!r}")
                if t not in self.pid.keys:
                    self.pid.add_key(t, device=self.device, trainable=False)
                restore_tensor(extras, k, self.pid.keys[t], path)
        if self.tii is not None:
            restore_task_classifier(self.tii, extras, tasks, path)


def run_continual(
    backbone: nn.Module,
    data: LabelledData,
    cfg: RunConfig,
    output_dir: str | os.PathLike | None = None,
    scenario: ClassIncrementalScenario | None = None,
    extra_info: dict | None = None,
    ranks: Ranks | None = None,
    log: Callable[[str], None] | None = None,
) -> RunResult:
    """Train ``cfg.method`` over the tasks of ``data`` and evaluate after every task.

    ``backbone`` is modified in place (wrapped / adapted). With ``output_dir``, results, plots and
    per-task checkpoints go there, and an existing run with the same configuration resumes after
    its last finished task (``log``, when given, receives a line saying so). In a
    torch.distributed process group (torchrun, ``softtf train --nproc``)
    every rank calls this with the same arguments: each trains on its share of every batch under
    DDP and evaluates its share of the test batches; rank 0 alone writes. Returns a :class:`RunResult`: ``result.record`` (also written to
    ``results.json``; ``result["acc"]`` reads it), ``result.method`` and ``result.classifier``.
    """
    if not isinstance(cfg, RunConfig):
        raise TypeError(f"run_continual: cfg must be a RunConfig, got {type(cfg).__name__}")
    if not isinstance(data, LabelledData):
        raise TypeError(f"run_continual: data must be a LabelledData, got {type(data).__name__}")
    scenario = scenario or scenario_for(data, cfg.n_tasks, seed=cfg.seed)
    if scenario.n_tasks != cfg.n_tasks or scenario.num_classes != data.num_classes:
        raise ValueError(
            f"run_continual: scenario has {scenario.n_tasks} tasks over {scenario.num_classes} classes, "
            f"config/data say {cfg.n_tasks} tasks over {data.num_classes} classes"
        )
    directory = None if output_dir is None else RunDirectory(output_dir, RunConfig.RESUME_FREE)
    run = ContinualRun(backbone, data, cfg, scenario, directory, extra_info, ranks)
    start = run.resume()
    if run.resumed_from is not None and log is not None:
        rest = f"continuing with task {start + 1}" if start < cfg.n_tasks else "nothing left to train"
        log(f"resumed from {run.resumed_from}: {start} of {cfg.n_tasks} tasks finished, {rest}")
    for t in range(start, cfg.n_tasks):
        train_s, final_loss = run.train_task(t)
        eval_s = run.evaluate(t)
        run.tallies.timings.append({"task": t, "train_s": train_s, "eval_s": eval_s, "final_loss": final_loss})
        run.checkpoint(t)
    return run.result()
