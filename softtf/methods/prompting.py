"""What the prompt methods (L2P, DualPrompt, NoRGa) share: a frozen timm ViT run through
:class:`~softtf.prompts.PromptedViT`, their prompts attached to the classifier (so they move with
it), and optional Soft-TF masks (``options.masks``; ``soft_config``'s layers, default qkv + proj of
the last 3 blocks, 9-11 of ViT-B) selected by the same inferred task as the E-prompt.

A subclass implements :meth:`PromptMethod.features` (the prompted feature of a batch whose sample
b runs ``tasks[task_index[b]]``), :meth:`PromptMethod.add_parts` / :meth:`PromptMethod.freeze_parts`
(its per-task prompts: used by training and by a resume alike) and ``info``.
"""
from __future__ import annotations

import contextlib
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..core.batch import batch_size
from ..core.config import SoftConfig
from ..core.files import load_tensors, save_tensors
from ..core.model import SoftModel, save_masks, wrap
from ..inference.gradient_id import predict_with_tasks
from ..prompts import PromptedViT
from .base import EXTRA_PREFIX, ContinualMethod, checkpoint_extras, load_mask_checkpoint

__all__ = ["PromptMethod", "PROMPT_TASK_ID_MODES", "METHOD_PREFIX"]

PROMPT_TASK_ID_MODES = ("oracle", "prompt", "prompt-vote", "classifier")
METHOD_PREFIX = "prompt::"  # checkpoint keys of the method's prompt tensors


class PromptMethod(ContinualMethod):
    """Base of the prompt methods. ``prefix_layers`` are the blocks whose attention takes prefixes."""

    task_id_modes: ClassVar[tuple[str, ...]] = PROMPT_TASK_ID_MODES
    default_task_id = "prompt"

    def __init__(self, classifier, options, prefix_layers: tuple[int, ...] = ()):
        super().__init__(classifier, options)
        self.depth(classifier)
        vit = classifier.backbone
        vit.requires_grad_(False)
        self.soft: SoftModel | None = None
        if options.masks:
            soft_cfg = SoftConfig.from_dict(options.soft_config) if options.soft_config else SoftConfig()
            soft_cfg.modules_to_save = soft_cfg.modules_to_save or []  # the runner trains the head itself
            self.soft = wrap(vit, soft_cfg)  # the ViT's linears become SoftLinear in place; names stay
        self.vit = PromptedViT(vit, prefix_layers)
        self.parts = nn.Module()  # the method's prompts; attached to the classifier so .to(device) moves them
        classifier.add_module("prompt_parts", self.parts)
        self.current: str | None = None

    @classmethod
    def depth(cls, classifier) -> int:
        """The number of blocks of the classifier's ViT; refuses other backbones (prefixes and prompt
        tokens are spliced into timm's ViT; HF BERT is not supported by the prompt methods)."""
        if getattr(classifier, "arch", None) != "vit":
            raise ValueError(f"method {cls.name!r}: prompt methods run on a timm ViT backbone; "
                             f"got a {getattr(classifier, 'arch', type(classifier).__name__)!r} backbone")
        return len(classifier.backbone.blocks)

    @classmethod
    def check_options(cls, options) -> None:
        """Masks are fine here (the base class refuses them for other methods)."""

    # ---------------------------------------------------------------- what subclasses provide
    def features(self, inputs, task_index: Tensor | None, tasks: list[str]) -> Tensor:
        raise NotImplementedError

    def add_parts(self, t: int, name: str) -> list[nn.Parameter]:
        """Create task ``name``'s prompts; return the parameters training task ``t`` updates."""
        raise NotImplementedError

    def freeze_parts(self, t: int, name: str) -> None:
        raise NotImplementedError

    # ---------------------------------------------------------------- training
    def begin_task(self, t, name):
        params = list(self.add_parts(t, name))
        if self.soft is not None:
            self.soft.add_task(name, seed=self.options.seed * 1000 + t)
            params += self.soft.mask_parameters()
        self.current = name
        return params

    def forward(self, inputs) -> Tensor:
        tasks = self.trained + [self.current]
        index = torch.full((batch_size(inputs),), len(tasks) - 1, dtype=torch.long)
        return self.clf.head(self.features(inputs, index, tasks))

    def end_task(self, t, name):
        self.freeze_parts(t, name)
        if self.soft is not None:
            self.soft.freeze_task(name)
        super().end_task(t, name)

    # ---------------------------------------------------------------- evaluation
    def forward_tasks(self, inputs, task_index, tasks):
        def logits(x):
            return self.clf.head(self.features(x, task_index, tasks))

        if self.soft is None:
            return logits(inputs)
        if task_index is None:
            raise ValueError(f"{self.name} with masks needs a task per sample (task_id 'none' is not supported)")
        # a per-call choice; one task in the batch runs the plain masked forward (bit-identical to training)
        return predict_with_tasks(self.soft, inputs, task_index, tasks, forward_fn=logits)

    def pretrained(self):
        """The pretrained network: no prompts (none are passed outside this method's calls) and,
        with masks, every mask disabled."""
        return contextlib.nullcontext() if self.soft is None else self.soft.disable_masks()

    def info(self) -> dict:
        masks = 0 if self.soft is None else sum(layer.weight.numel() for layer in self.soft.soft_layers.values())
        return {"prefix_layers": list(self.vit.prefix_layers), "masks": self.soft is not None,
                "mask_layers": [] if self.soft is None else self.soft.layer_names, "mask_params_per_task": masks}

    # ---------------------------------------------------------------- checkpoints
    def state(self):
        return {METHOD_PREFIX + k: v.detach() for k, v in self.parts.state_dict().items()}, {"method": self.name}

    def save(self, path: str, extra: dict[str, Tensor]) -> None:
        tensors, meta = self.state()
        if self.soft is None:
            save_tensors(path, {**tensors, **{EXTRA_PREFIX + k: v for k, v in extra.items()}}, meta)
        else:  # the mask-file format, the prompts riding along as extras
            save_masks(self.soft, path, extra={**extra, **tensors})

    def load(self, path, tasks):
        if self.soft is None:
            tensors = load_tensors(path)
            extras = checkpoint_extras(tensors)
        else:
            tensors, extras = load_mask_checkpoint(self.soft, path, tasks, METHOD_PREFIX)
        self.load_state(tensors, path, tasks)
        self.trained = list(tasks)
        return extras

    def load_state(self, tensors, path, tasks):
        for t, name in enumerate(tasks):
            self.add_parts(t, name)
            self.freeze_parts(t, name)
        state = {k[len(METHOD_PREFIX):]: v for k, v in tensors.items() if k.startswith(METHOD_PREFIX)}
        own = self.parts.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(f"resume: checkpoint {path!r} prompts do not fit {self.name} after tasks {tasks}: "
                             f"missing {missing[:4]}, unexpected {unexpected[:4]}")
        for k, v in state.items():
            if v.shape != own[k].shape:
                raise ValueError(f"resume: checkpoint {path!r} prompt {k!r} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}")
        with torch.no_grad():
            for k, p in self.parts.state_dict(keep_vars=True).items():
                p.copy_(state[k])

    @property
    def device(self) -> torch.device:
        """Where the classifier lives (new prompts are created there)."""
        return self.clf.head.weight.device
