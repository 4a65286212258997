"""DualPrompt (Wang et al. 2022): prefix tuning with a shared G-prompt and one E-prompt per task.

Defaults of JH-LEE-KR/dualprompt-pytorch: G-prompt of length 5 in blocks 0-1, trained on every
task; one E-prompt of length 5 per task in blocks 2-4, trained with its task and frozen after;
prefixes of length 5 for the keys and 5 for the values of each head (``use_prefix_tune``); the
head reads the [CLS] feature. The E-prompt of a test sample is the task its key matches: the
run's Prompt ID (keys matched by cosine against the frozen model's [CLS] feature, pull
coefficient ``prompt_lambda`` = 1.0, the official value). A model with fewer blocks keeps the
blocks of those lists it has (``info()["g_layers"]``, ``["e_layers"]``).
"""
from __future__ import annotations

from ..prompts import PrefixPrompts, clip_layers
from .prompting import PromptMethod
from .registry import register

__all__ = ["DualPromptMethod"]

SHARED = "shared"  # the G-prompt's one "task"


@register
class DualPromptMethod(PromptMethod):
    name = "dualprompt"
    G_LAYERS, E_LAYERS, G_LENGTH, E_LENGTH = (0, 1), (2, 3, 4), 5, 5

    def __init__(self, classifier, options):
        (g, g_len), (e, e_len) = self.prefix_sets(self.depth(classifier))
        super().__init__(classifier, options, prefix_layers=g + e)
        heads, dim = self.vit.num_heads, self.vit.head_dim
        self.parts.g = PrefixPrompts(g, g_len, heads, dim)
        self.parts.e = PrefixPrompts(e, e_len, heads, dim)
        self.parts.g.add(SHARED)

    @classmethod
    def prefix_sets(cls, depth: int) -> list[tuple[tuple[int, ...], int]]:
        """[(G-prompt blocks, length), (E-prompt blocks, length)] of a ``depth``-block ViT."""
        g = clip_layers(cls.G_LAYERS, depth, "dualprompt G-prompt")
        e = tuple(i for i in clip_layers(cls.E_LAYERS, depth, "dualprompt E-prompt") if i not in g)
        return [(g, cls.G_LENGTH), (e, cls.E_LENGTH)]

    def add_parts(self, t, name):
        return list(self.parts.g.parameters()) + self.parts.e.add(name, device=self.device)

    def freeze_parts(self, t, name):
        self.parts.e.freeze(name)  # the G-prompt keeps training with the next task

    def features(self, inputs, task_index, tasks):
        shared = task_index.new_zeros(task_index.shape)
        prefixes = {**self.parts.g.select(shared, [SHARED]), **self.parts.e.select(task_index, tasks)}
        return self.vit(inputs, prefixes=prefixes)

    def info(self):
        g, e = self.parts.g, self.parts.e
        return {**super().info(), "g_layers": list(g.layers), "e_layers": list(e.layers), "g_length": g.length,
                "e_length": e.length, "params_per_task": e.parameters_per_task() + super().info()["mask_params_per_task"],
                "params_shared": g.parameters_per_task()}
