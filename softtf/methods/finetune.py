"""Sequential fine-tuning of the layers Soft-TF would mask, plus the shared head: no protection
against forgetting (the floor). Task inference: ``none`` (class-incremental) or ``oracle``."""
from __future__ import annotations

from ..core.files import restore_tensor
from .base import ContinualMethod, target_layer_names
from .registry import register

__all__ = ["FinetuneMethod"]


@register
class FinetuneMethod(ContinualMethod):
    name = "finetune"
    task_id_modes = ("none", "oracle")
    default_task_id = "none"

    def __init__(self, classifier, options):
        super().__init__(classifier, options)
        backbone = classifier.backbone
        self.names = target_layer_names(backbone, options.soft_config)
        backbone.requires_grad_(False)
        self.params = {}
        for n in self.names:
            for pn, p in backbone.get_submodule(n).named_parameters():
                p.requires_grad_(True)
                self.params[f"{n}.{pn}"] = p

    def begin_task(self, t, name):
        return list(self.params.values())

    def info(self):
        return {"params_per_task": sum(p.numel() for p in self.params.values()), "note": "one network shared by every task"}

    def forward_tasks(self, inputs, task_index, tasks):
        return self.clf(inputs)  # one network for every task; the runner restricts the head if asked

    def state(self):
        return {f"finetune::{k}": v for k, v in self.params.items()}, {"method": "finetune"}

    def load_state(self, tensors, path, tasks):
        for k, p in self.params.items():
            restore_tensor(tensors, f"finetune::{k}", p, path)
