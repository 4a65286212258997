"""Baseline learners for :func:`softtf.runner.run_continual`, on the same layers as Soft-TF.

* :class:`FinetuneLearner` — sequential fine-tuning of the weights (and biases) of the very
  layers Soft-TF would mask, plus the shared head; no protection against forgetting (the floor).
  Task inference: ``none`` (class-incremental) or ``oracle`` (head restricted to the true task).
* :class:`LoRALearner` — one PEFT LoRA adapter per task (``peft.LoraConfig`` with
  ``target_modules`` = the Soft-TF layers, rank ``lora_r``, ``lora_alpha``); finished adapters are
  frozen. Task inference: ``oracle`` or ``prompt`` (Prompt-ID queries with adapters disabled).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import SoftConfig, resolve_config
from .io import load_tensors
from .runner import Learner, _grouped_forward, _restore

__all__ = ["FinetuneLearner", "LoRALearner"]


def _target_names(backbone: nn.Module, cfg) -> list[str]:
    soft_cfg = SoftConfig.from_dict(cfg.soft_config) if cfg.soft_config else SoftConfig()
    soft_cfg.modules_to_save = soft_cfg.modules_to_save or []
    return resolve_config(backbone, soft_cfg)[1]


def _check_extras(path: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k[len("extra::"):]: v for k, v in tensors.items() if k.startswith("extra::")}


class FinetuneLearner(Learner):
    """Sequential fine-tuning of the target layers' weights (the forgetting floor)."""

    name = "finetune"

    def __init__(self, clf, scenario, cfg):
        super().__init__(clf, scenario, cfg)
        self.names = _target_names(clf.backbone, cfg)
        clf.backbone.requires_grad_(False)
        self._params = {}
        for n in self.names:
            for pn, p in clf.backbone.get_submodule(n).named_parameters():
                p.requires_grad_(True)
                self._params[f"{n}.{pn}"] = p

    def begin_task(self, t):
        return list(self._params.values())

    def end_task(self, t):
        self.trained.append(self.scenario.task_name(t))

    def forward_tasks(self, inputs, task_index, tasks):
        return self.clf(inputs)  # one network for every task; the runner restricts the head if asked

    def state(self):
        return {f"finetune::{k}": v for k, v in self._params.items()}, {"method": "finetune"}

    def load_state(self, path, tasks):
        tensors = load_tensors(path)
        for k, p in self._params.items():
            _restore(tensors, f"finetune::{k}", p, path)
        self.trained = list(tasks)
        return _check_extras(path, tensors)


class LoRALearner(Learner):
    """One LoRA adapter (PEFT) per task on the Soft-TF target layers."""

    name = "lora"

    def __init__(self, clf, scenario, cfg):
        super().__init__(clf, scenario, cfg)
        import peft

        self.peft = peft
        self.names = _target_names(clf.backbone, cfg)
        self.lora_config = peft.LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=self.names)
        clf.backbone.requires_grad_(False)
        self.model = None  # the PeftModel, created with the first adapter

    def _add(self, name: str) -> None:
        if self.model is None:
            self.model = self.peft.get_peft_model(self.clf.backbone, self.lora_config, adapter_name=name)
            self.clf.backbone = self.model
        else:
            self.model.add_adapter(name, self.lora_config)
        self.model.set_adapter(name)

    def begin_task(self, t):
        name = self.scenario.task_name(t)
        torch.manual_seed(self.cfg.seed * 1000 + t)
        self._add(name)
        # set_adapter may mark an old adapter trainable again (e.g. after per-task evaluation):
        # train exactly this task's adapter.
        params = []
        for n, p in self.model.named_parameters():
            mine = f".{name}." in n and "lora_" in n
            p.requires_grad_(mine)
            if mine:
                params.append(p)
        if not params:
            raise RuntimeError(f"LoRA: adapter {name!r} has no trainable parameters")
        return params

    def end_task(self, t):
        name = self.scenario.task_name(t)
        for n, p in self.model.named_parameters():
            if f".{name}." in n:
                p.requires_grad_(False)
        self.trained.append(name)

    def forward_tasks(self, inputs, task_index, tasks):
        if task_index is None:
            raise ValueError("lora needs a task per sample (task_id 'none' is not supported)")
        return _grouped_forward(self.clf, inputs, task_index, lambda i: self.model.set_adapter(tasks[i]))

    def state(self):
        tensors = {}
        for name in self.trained:
            sd = self.peft.get_peft_model_state_dict(self.model, adapter_name=name)
            tensors.update({f"lora::{name}::{k}": v for k, v in sd.items()})
        return tensors, {"method": "lora"}

    def load_state(self, path, tasks):
        tensors = load_tensors(path)
        for name in tasks:
            prefix = f"lora::{name}::"
            sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            if not sd:
                raise ValueError(f"resume: checkpoint {path!r} has no LoRA adapter for task {name!r}")
            self._add(name)
            result = self.peft.set_peft_model_state_dict(self.model, sd, adapter_name=name)
            bad = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
            if bad:
                raise ValueError(f"resume: checkpoint {path!r} adapter {name!r} has unexpected keys {bad[:4]}")
            for n, p in self.model.named_parameters():
                if f".{name}." in n:
                    p.requires_grad_(False)
        self.trained = list(tasks)
        return _check_extras(path, tensors)
