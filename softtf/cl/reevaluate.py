"""Score a finished run again with other evaluation settings, without training (``softtf eval``).

A run directory keeps the checkpoint of every task (``checkpoints/task_XXX.safetensors``). Each is
restored in turn into a fresh copy of the pretrained backbone and evaluated as the run evaluated
it after that task, so the accuracy matrix, forgetting and task-id accuracy come out as a run with
the new settings would have given them. Only evaluation settings may differ from the trained run
(:data:`EVAL_FIELDS`); task inference that needs parts trained with the run is refused when the
run did not train them: Prompt-ID keys (``prompt`` modes) and the task-identity classifier
(``classifier``).
"""
from __future__ import annotations

import copy
import os

import torch
from torch import nn

from .config import PROMPT_MODES, RunConfig
from .data import LabelledData
from .distributed import Ranks
from .results import RunResult, Tallies
from .run_dir import RunDirectory
from .runner import ContinualRun, fingerprint
from .scenario import scenario_for

__all__ = ["evaluate_saved", "EVAL_FIELDS"]

# RunConfig fields that only change how a trained model is scored
EVAL_FIELDS = ("task_id", "head", "eval_batch_size", "k_shot", "gradient_topk", "gradient_logits", "protocol")


def _needs(task_id: str) -> str | None:
    """What a task inference needs from training, or None."""
    if task_id in PROMPT_MODES:
        return "prompt"
    return "classifier" if task_id == "classifier" else None


def evaluate_saved(backbone: nn.Module, data: LabelledData, cfg: RunConfig, trained_dir: str | os.PathLike,
                   output_dir: str | os.PathLike | None = None, extra_info: dict | None = None,
                   ranks: Ranks | None = None) -> RunResult:
    """Evaluate the checkpoints of the run in ``trained_dir`` with ``cfg``'s evaluation settings.

    ``backbone`` and ``data`` are what the run was trained from (the backbone is checked by its
    fingerprint); ``cfg`` must equal the run's configuration but for :data:`EVAL_FIELDS`. Every
    finished task's checkpoint is scored. With ``output_dir``, ``results.json`` and the plots go
    there (never into ``trained_dir``)."""
    if not os.path.isdir(trained_dir):
        raise FileNotFoundError(f"eval: {os.fspath(trained_dir)!r} is not a run directory")
    if output_dir is not None and os.path.abspath(output_dir) == os.path.abspath(trained_dir):
        raise ValueError("eval: write the new results to another directory than the trained run's")
    trained = RunDirectory(os.fspath(trained_dir))
    record = trained.read_config()
    if record is None:
        raise FileNotFoundError(f"eval: {os.fspath(trained_dir)!r} holds no run (no run_config.json)")
    old = record.get("run_config")
    if not isinstance(old, dict):
        raise ValueError(f"eval: {trained.file('run_config.json')!r} has no run_config section")
    new = cfg.to_dict()
    free = set(EVAL_FIELDS) | set(RunConfig.RESUME_FREE)
    diffs = [f"{k}: {old.get(k)!r} (trained) vs {new.get(k)!r}" for k in sorted(set(old) | set(new))
             if k not in free and old.get(k) != new.get(k)]
    if diffs:
        raise ValueError("eval: the run was trained with other settings; only evaluation settings "
                         f"({', '.join(EVAL_FIELDS)}) may differ: " + "; ".join(diffs[:6]))
    need = _needs(cfg.task_id)
    if need is not None and _needs(old["task_id"]) != need:
        part = "Prompt-ID keys" if need == "prompt" else "a task-identity classifier"
        raise ValueError(f"eval: task_id {cfg.task_id!r} needs {part} trained with the run, and {os.fspath(trained_dir)!r} "
                         f"was trained with task_id {old['task_id']!r}; choose a task inference that needs nothing "
                         "trained (oracle, none or a gradient rule, as the method allows)")
    expected = record.get("backbone", {}).get("fingerprint")
    if expected is not None and fingerprint(backbone) != expected:
        raise ValueError(f"eval: the backbone differs from the one {os.fspath(trained_dir)!r} was trained from "
                         "(same --model, --pretrained and ViT shape flags, and the run's pretrained_backbone.safetensors)")
    scenario = scenario_for(data, cfg.n_tasks, seed=cfg.seed)
    heads = ("full",) if old["task_id"] == "none" else ("full", "task")
    prog, _ = trained.progress(cfg.n_tasks, Tallies(cfg.n_tasks, heads).matrix_names())
    if prog is None:
        raise ValueError(f"eval: {os.fspath(trained_dir)!r} has no finished task to evaluate")
    info = {**(extra_info or {}), "evaluated_from": os.path.abspath(os.fspath(trained_dir))}
    out = None if output_dir is None else RunDirectory(output_dir, RunConfig.RESUME_FREE)
    tallies = None
    for t in range(prog["finished_tasks"]):
        torch.manual_seed(cfg.seed)
        run = ContinualRun(copy.deepcopy(backbone), data, cfg, scenario, out, info, ranks)
        run.tallies = tallies = tallies or run.tallies
        run.restore(trained.checkpoint(t), t)
        tallies.timings.append({"task": t, "eval_s": run.evaluate(t)})
    if out is not None and run.ranks.is_main:
        out.claim(run.run_info)
    return run.result()
