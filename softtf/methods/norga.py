"""NoRGa (Le et al. 2024, arXiv 2405.14124): E-prompts with a non-linear residual gate on the
prefix scores, s' = s + alpha * act(tau * s), through ``softtf.prefix_attention``.

As its official code (Minhchuyentoancbn/MoE_PromptCL, attention.py): one E-prompt of length 5
per task in blocks 0-4 (prefix tuning, 5 key and 5 value tokens per head), trained with its
task and frozen after; one (alpha, tau) pair per prefixed block, shared by the heads, both
initialised to 1, trained during the first task and frozen after it; activation sigmoid (the
Sup-21K scripts; ``prompt_activation`` offers tanh and gelu). The head reads the [CLS] feature.
Task inference: the run's (Prompt ID by default). Not here: HiDe-Prompt's later stages that
NoRGa's code also runs (prompt momentum, the head's task-adaptive calibration on sampled
features).
"""
from __future__ import annotations

import torch
from torch import nn

from ..prompts import PrefixPrompts, clip_layers
from .prompting import PromptMethod
from .registry import register

__all__ = ["NoRGaMethod"]


@register
class NoRGaMethod(PromptMethod):
    name = "norga"
    E_LAYERS, E_LENGTH, GATE_INIT = (0, 1, 2, 3, 4), 5, 1.0

    def __init__(self, classifier, options):
        [(e, e_len)] = self.prefix_sets(self.depth(classifier))
        super().__init__(classifier, options, prefix_layers=e)
        self.activation = options.prompt_activation
        self.parts.e = PrefixPrompts(e, e_len, self.vit.num_heads, self.vit.head_dim)
        self.parts.alpha = nn.ParameterList([nn.Parameter(torch.tensor(self.GATE_INIT)) for _ in e])
        self.parts.tau = nn.ParameterList([nn.Parameter(torch.tensor(self.GATE_INIT)) for _ in e])

    @classmethod
    def prefix_sets(cls, depth: int) -> list[tuple[tuple[int, ...], int]]:
        """[(E-prompt blocks, length)] of a ``depth``-block ViT."""
        return [(clip_layers(cls.E_LAYERS, depth, "norga E-prompt"), cls.E_LENGTH)]

    def gate_parameters(self) -> list[nn.Parameter]:
        return list(self.parts.alpha) + list(self.parts.tau)

    def add_parts(self, t, name):
        params = self.parts.e.add(name, device=self.device)
        gates = self.gate_parameters()
        for p in gates:
            p.requires_grad_(t == 0)  # the gate learns during the first task only
        return params + (gates if t == 0 else [])

    def freeze_parts(self, t, name):
        self.parts.e.freeze(name)
        for p in self.gate_parameters():
            p.requires_grad_(False)

    def features(self, inputs, task_index, tasks):
        gates = (list(self.parts.alpha), list(self.parts.tau))
        return self.vit(inputs, prefixes=self.parts.e.select(task_index, tasks, self.activation, gates))

    def info(self):
        e = self.parts.e
        return {**super().info(), "e_layers": list(e.layers), "e_length": e.length, "activation": self.activation,
                "params_per_task": e.parameters_per_task() + super().info()["mask_params_per_task"],
                "params_shared": 2 * len(e.layers)}
