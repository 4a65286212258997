"""SAPT's router choosing among Soft-TF masks (``--method sapt-softtf``; beyond the paper).

The PET block of task t is a Soft-TF mask M_t on each target layer (``soft_config``'s layers,
default qkv + proj of the last 3 blocks of a ViT, q/k/v of the last 3 layers of BERT), frozen after
its task. Sample b runs every masked layer with its own mixture of the masks, weighted by the
router (:mod:`.sapt_router`, the same router, reflection and replay buffers as ``sapt``):

    y_b = x_b (W ⊙ Σ_t w_bt M_t)ᵀ + b  =  Σ_t w_bt x_b (W ⊙ M_t)ᵀ + b        (Σ_t w_bt = 1)

computed without a per-sample masked weight: the layer runs its last task's mask in single-task
mode (``softtf.masked_linear``, which trains that mask), and a forward hook rescales that output by
w_b,last and adds the earlier, frozen masks' share through the per-sample path of
``softtf_kernels.ops.superposed_linear`` (α [B, T-1]: T-1 masked GEMMs over the batch, ∂/∂α per
sample for the router). Training and evaluation use the same formula.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from softtf_kernels.ops import superposed_linear

from ..core.config import SoftConfig
from ..core.model import SoftModel, save_masks, wrap
from .base import load_mask_checkpoint
from .registry import register
from .sapt import PREFIX, SAPTMethod

__all__ = ["SAPTSoftTFMethod"]


@register
class SAPTSoftTFMethod(SAPTMethod):
    name = "sapt-softtf"
    # on the first task one mask runs alone (_mix adds nothing), so the router gets no gradient
    may_skip_parameters = True

    # ---------------------------------------------------------------- the PET blocks: Soft-TF masks
    def install_blocks(self) -> None:
        soft_cfg = SoftConfig.from_dict(self.options.soft_config) if self.options.soft_config else SoftConfig()
        soft_cfg.modules_to_save = soft_cfg.modules_to_save or []  # the runner trains the head itself
        self.soft: SoftModel = wrap(self.clf.backbone, soft_cfg)  # the linears become SoftLinear in place; names stay
        self.hooks = [layer.register_forward_hook(self._mix) for layer in self.soft.soft_layers.values()]

    def _mix(self, layer, args, out: Tensor) -> Tensor:
        """Sample b: w_b,last · (the last mask's output) + Σ_{t<last} w_bt x_b (W ⊙ M_t)ᵀ (+ bias once)."""
        w = self.routing.weights
        if not self.routing.enabled or layer.mode != "single":
            return out
        if w is None:
            raise RuntimeError("sapt-softtf: a masked layer ran without routing weights (run the model through the method)")
        n = w.shape[1]
        if n == 1:
            return out
        x = args[0]
        shape = (w.shape[0],) + (1,) * (out.dim() - 1)
        bias = layer.bias
        last = w[:, n - 1].to(out.dtype).view(shape)
        own = out if bias is None else out - bias
        mixed = last * own + superposed_linear(x, layer.weight, layer.frozen_masks[: n - 1], w[:, : n - 1].to(x.dtype))
        return mixed if bias is None else mixed + bias

    def add_blocks(self, t, name, device):
        self.soft.add_task(name, seed=self.options.seed * 1000 + t)
        return self.soft.mask_parameters()

    def freeze_blocks(self, t, name):
        self.soft.freeze_task(name)

    def run_routed(self, inputs, n):
        tasks = self.soft.tasks
        if len(self.soft.frozen_tasks) < n - 1 or len(tasks) < n:
            raise ValueError(f"sapt-softtf: {n} blocks asked, tasks {tasks} (frozen {self.soft.frozen_tasks})")
        self.soft.set_task(tasks[n - 1])  # its mask in single-task mode; the hooks add the frozen ones
        return self.clf(inputs)

    def pretrained(self):
        stack = contextlib.ExitStack()
        stack.enter_context(self.routing.disabled())
        stack.enter_context(self.soft.disable_masks())
        return stack

    def blocks_info(self):
        masks = sum(layer.weight.numel() for layer in self.soft.soft_layers.values())
        return {"mask_layers": self.soft.layer_names, "mask_params_per_task": masks, "params_per_task": masks + self.router.dim}

    # ---------------------------------------------------------------- checkpoints: the mask-file format
    def save(self, path, extra):
        save_masks(self.soft, path, extra={**extra, **self.router_state()})

    def load(self, path, tasks):
        mine, extras = load_mask_checkpoint(self.soft, path, tasks, PREFIX)
        self.load_router_state(mine, path, tasks)
        self.trained = list(tasks)
        return extras
