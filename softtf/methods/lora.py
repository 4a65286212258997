"""One PEFT LoRA adapter per task on the Soft-TF target layers (``peft.LoraConfig`` with rank
``lora_r`` and ``lora_alpha``); finished adapters are frozen. Task inference: ``oracle`` or
``prompt`` / ``prompt-vote`` (Prompt-ID queries run with the adapters disabled).

``lora_r="matched"``: one rank for every layer, ``round(Σ out·in / Σ (in + out))`` over the target
layers, so a task trains as many parameters as Soft-TF's masks (the paper's same-budget LoRA:
r = 512 for ViT-B/16 qkv + proj, which the paper rounds to 500)."""
from __future__ import annotations

import contextlib

import torch

from .base import MATCHED, ContinualMethod, grouped_forward, target_linears
from .registry import register

__all__ = ["LoRAMethod"]


@register
class LoRAMethod(ContinualMethod):
    name = "lora"
    task_id_modes = ("oracle", "prompt", "prompt-vote", "classifier")

    def __init__(self, classifier, options):
        super().__init__(classifier, options)
        import peft  # optional dependency: only this method needs it

        self.peft = peft
        linears = target_linears(classifier.backbone, options.soft_config)
        self.names = list(linears)
        io = sum(m.in_features + m.out_features for m in linears.values())
        masks = sum(m.in_features * m.out_features for m in linears.values())
        self.rank = max(1, round(masks / io)) if options.lora_r == MATCHED else options.lora_r
        self.params_per_task = self.rank * io
        self.lora_config = peft.LoraConfig(r=self.rank, lora_alpha=options.lora_alpha, lora_dropout=0.0, target_modules=self.names)
        classifier.backbone.requires_grad_(False)
        self.model = None  # the PeftModel, created with the first adapter

    def _add(self, name: str) -> None:
        if self.model is None:
            self.model = self.peft.get_peft_model(self.clf.backbone, self.lora_config, adapter_name=name)
            self.clf.backbone = self.model
        else:
            self.model.add_adapter(name, self.lora_config)
        self.model.set_adapter(name)

    def _freeze(self, name: str) -> None:
        for n, p in self.model.named_parameters():
            if f".{name}." in n:
                p.requires_grad_(False)

    def begin_task(self, t, name):
        torch.manual_seed(self.options.seed * 1000 + t)
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

    def end_task(self, t, name):
        self._freeze(name)
        super().end_task(t, name)

    def forward_tasks(self, inputs, task_index, tasks):
        if task_index is None:
            raise ValueError("lora needs a task per sample (task_id 'none' is not supported)")
        return grouped_forward(self.clf, inputs, task_index, lambda i: self.model.set_adapter(tasks[i]))

    def pretrained(self):
        return contextlib.nullcontext() if self.model is None else self.model.disable_adapter()

    def info(self):
        return {"lora_r": self.rank, "lora_alpha": self.options.lora_alpha, "params_per_task": self.params_per_task}

    def state(self):
        tensors = {}
        for name in self.trained:
            sd = self.peft.get_peft_model_state_dict(self.model, adapter_name=name)
            tensors.update({f"lora::{name}::{k}": v for k, v in sd.items()})
        return tensors, {"method": "lora"}

    def load_state(self, tensors, path, tasks):
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
            self._freeze(name)
