"""L2P (Learning to Prompt, Wang et al. 2022): one pool of prompts shared by every task.

Defaults of JH-LEE-KR/l2p-pytorch: a pool of 10 prompts of 5 tokens, each with a key; each sample
takes the 5 prompts whose keys are nearest (cosine) to its query, the frozen model's [CLS]
feature; the 25 tokens go after the [CLS] token; the head reads the mean of their outputs
(``head_type="prompt"``); the loss subtracts 0.1 x the summed similarity of the chosen keys (the
pull constraint). The whole pool and its keys train on every task (no per-task part), so L2P needs
no task inference (``task_id`` ``none``, the default) unless Soft-TF masks are added (``masks``),
which need the task (default ``prompt``).

Where we differ from l2p-pytorch: the prompt tokens carry no position embedding (l2p-pytorch
resizes the pretrained position embedding over them); prompt selection is per sample (its
``batchwise_prompt`` takes the batch's most frequent prompts, which uses the test set's grouping
by task).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..prompts import TokenPromptPool
from .prompting import PROMPT_TASK_ID_MODES, PromptMethod
from .registry import register

__all__ = ["L2PMethod"]


@register
class L2PMethod(PromptMethod):
    name = "l2p"
    task_id_modes = ("none",) + PROMPT_TASK_ID_MODES
    default_task_id = "none"
    POOL_SIZE, LENGTH, TOP_K, PULL = 10, 5, 5, 0.1

    def __init__(self, classifier, options):
        super().__init__(classifier, options, prefix_layers=())
        self.parts.pool = TokenPromptPool(self.POOL_SIZE, self.LENGTH, self.vit.embed_dim, self.TOP_K)
        self.reduce_sim: Tensor | None = None

    @classmethod
    def resolve_task_id(cls, options) -> str:
        return "prompt" if getattr(options, "masks", False) else "none"

    @classmethod
    def check_options(cls, options) -> None:
        if options.masks and options.task_id == "none":
            raise ValueError("RunConfig: l2p with masks needs task inference to pick each sample's mask; "
                             "task_id 'none' has none (use 'prompt', 'prompt-vote' or 'oracle')")

    def add_parts(self, t, name):
        return list(self.parts.pool.parameters())  # the shared pool trains on every task

    def freeze_parts(self, t, name):
        pass  # nothing per task: the pool keeps training with the next task

    def features(self, inputs, task_index, tasks):
        with torch.no_grad(), self.pretrained():
            query = self.clf.features(inputs)  # the frozen model's [CLS] feature
        tokens, _, self.reduce_sim = self.parts.pool.select(query)
        return self.vit(inputs, tokens=tokens, pool="prompt")

    def loss(self, logits, targets):
        loss = super().loss(logits, targets)
        return loss if self.reduce_sim is None else loss - self.PULL * self.reduce_sim

    def info(self):
        pool = self.parts.pool
        return {**super().info(), "pool_size": pool.size, "prompt_length": pool.length, "top_k": pool.top_k,
                "pull": self.PULL, "params_shared": sum(p.numel() for p in pool.parameters())}
