"""Soft-TransFormers: one soft mask per task on the targeted layers, frozen after its task."""
from __future__ import annotations

import torch
from torch import Tensor

from ..core.config import SoftConfig
from ..core.model import SoftModel, save_masks, wrap
from ..inference.gradient_id import gradient_id, predict_with_tasks
from .base import ContinualMethod, load_mask_checkpoint
from .registry import register

__all__ = ["SoftTFMethod"]


@register
class SoftTFMethod(ContinualMethod):
    name = "softtf"
    task_id_modes = ("oracle", "prompt", "prompt-vote", "gradient", "gradient-sample", "gradient-binary", "classifier")

    def __init__(self, classifier, options):
        super().__init__(classifier, options)
        soft_cfg = SoftConfig.from_dict(options.soft_config) if options.soft_config else SoftConfig()
        soft_cfg.modules_to_save = soft_cfg.modules_to_save or []  # the runner trains the head itself
        self.soft: SoftModel = wrap(classifier.backbone, soft_cfg)
        classifier.backbone = self.soft

    def begin_task(self, t, name):
        self.soft.add_task(name, seed=self.options.seed * 1000 + t)
        return self.soft.mask_parameters()

    def end_task(self, t, name):
        self.soft.freeze_task(name)
        super().end_task(t, name)

    def forward_tasks(self, inputs, task_index, tasks):
        if task_index is None:
            raise ValueError("softtf needs a task per sample (task_id 'none' is not supported)")
        # a per-call choice; one task in the batch runs the plain masked forward (bit-identical to training)
        return predict_with_tasks(self.clf, inputs, task_index, tasks, forward_fn=self.clf)

    def infer_tasks(self, inputs, tasks, forward_fn, rule, k_shot, topk):
        res = gradient_id(self.clf, inputs, forward_fn=forward_fn, tasks=tasks, rule=rule, k_shot=k_shot, topk=topk)
        remap = torch.tensor([tasks.index(n) for n in res.tasks], dtype=torch.long)
        return remap[res.task_index.long().cpu()]

    def pretrained(self):
        return self.soft.disable_masks()

    def info(self):
        return {"params_per_task": sum(layer.weight.numel() for layer in self.soft.soft_layers.values())}

    def save(self, path: str, extra: dict[str, Tensor]) -> None:
        save_masks(self.soft, path, extra=extra)  # masks + config + task names (the mask-file format)

    def load(self, path, tasks):
        _, extras = load_mask_checkpoint(self.soft, path, tasks)
        self.trained = list(tasks)
        return extras
