"""Prompt ID: task inference by matching a query feature against one learnable key per task.

The query ``q(x)`` is the [CLS] feature of the *same* model with every mask disabled (the
pretrained network; no second copy of the model is kept). Task ``t``'s key ``k_t`` is trained
together with task ``t``'s masks through the pull term ``-λ·cos(q(x), k_t)`` (λ = 1, METHOD.md);
keys of finished tasks are frozen. At test time ``task = argmax_t cos(q(x), k_t)``.

    >>> pid = PromptID(dim=768)
    >>> pid.add_key("task0")
    >>> q = pid.query(model, x, feature_fn)          # masks disabled, no grad
    >>> loss = ce + pid.pull_loss(q, "task0")
    >>> pid.freeze_key("task0")
    >>> idx = pid.predict(q)                          # [B] indices into pid.tasks
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.layer import MaskSwitch, soft_layers

__all__ = ["PromptID", "cls_feature"]


def cls_feature(model: nn.Module, inputs) -> Tensor:
    """The [CLS] feature of a timm ViT (after the final norm) or an HF BERT (last hidden state)."""
    if isinstance(inputs, dict):
        out = model(**inputs)
        hidden = getattr(out, "last_hidden_state", None)
        if hidden is None:
            raise TypeError(f"cls_feature: {type(model).__name__} output has no last_hidden_state")
        return hidden[:, 0]
    if hasattr(model, "forward_features"):
        return model.forward_features(inputs)[:, 0]
    raise TypeError(f"cls_feature: {type(model).__name__} has no forward_features; pass a feature_fn")


class PromptID(nn.Module):
    """One learnable key per task, matched by cosine similarity against a query feature.

    Args:
        dim: feature (key) dimension.
        lam: weight λ of the pull term ``-λ·cos(q, k_t)``.
        init_std: with ``init="normal"`` keys start as ``N(0, init_std^2)``; small keys turn toward
            their task's queries within a few Adam steps.
        init: ``"normal"`` or ``"uniform"`` (``U(-1, 1)``, the official Soft-TF / L2P pool keys).
    """

    INITS = ("normal", "uniform")

    def __init__(self, dim: int, lam: float = 1.0, init_std: float = 0.02, init: str = "normal"):
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"PromptID: dim must be a positive int, got {dim!r}")
        if lam <= 0:
            raise ValueError(f"PromptID: lam must be > 0, got {lam}")
        if init not in self.INITS:
            raise ValueError(f"PromptID: init must be one of {self.INITS}, got {init!r}")
        self.dim, self.lam, self.init_std, self.init = dim, float(lam), float(init_std), init
        self.keys = nn.ParameterDict()

    @property
    def tasks(self) -> list[str]:
        return list(self.keys.keys())

    def add_key(self, task: str, generator: torch.Generator | None = None, device=None, trainable: bool = True) -> nn.Parameter:
        """Create the key of ``task``: the one trainable key (every other key is frozen), or a
        frozen one with ``trainable=False`` (a pool key to train later with :meth:`train_key`)."""
        if task in self.keys:
            raise ValueError(f"PromptID.add_key: task {task!r} already has a key")
        if self.init == "uniform":
            key = torch.rand(self.dim, generator=generator, device=device) * 2 - 1
        else:
            key = torch.randn(self.dim, generator=generator, device=device) * self.init_std
        self.keys[task] = nn.Parameter(key, requires_grad=False)
        return self.train_key(task) if trainable else self.keys[task]

    def train_key(self, task: str) -> nn.Parameter:
        """Make ``task``'s key the one trainable key (every other key is frozen); returns it."""
        self._check(task, "train_key")
        for p in self.keys.values():
            p.requires_grad_(False)
        return self.keys[task].requires_grad_(True)

    def freeze_key(self, task: str) -> None:
        self._check(task, "freeze_key")
        self.keys[task].requires_grad_(False)

    def delete_key(self, task: str) -> None:
        self._check(task, "delete_key")
        del self.keys[task]

    def _check(self, task: str, where: str) -> None:
        if task not in self.keys:
            raise KeyError(f"PromptID.{where}: no key for task {task!r} (tasks: {self.tasks or 'none'})")

    @torch.no_grad()
    def query(
        self,
        model: nn.Module,
        inputs,
        feature_fn: Callable[[nn.Module, object], Tensor] = cls_feature,
        pretrained: Callable[[], ContextManager] | None = None,
    ) -> Tensor:
        """``feature_fn(model, inputs)`` run as the pretrained network (no grad) -> [B, dim].

        ``pretrained()`` gives the context in which ``model`` is the pretrained network; by
        default every SoftLinear mask of ``model`` is disabled for the call and its mode restored
        afterwards. Methods that adapt the model otherwise (LoRA) pass their own."""
        if pretrained is None:
            layers = list(soft_layers(model).values())
            context = MaskSwitch(layers) if layers else contextlib.nullcontext()
        else:
            context = pretrained()
        with context:
            q = feature_fn(model, inputs)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"PromptID.query: feature_fn must return [B, {self.dim}], got {tuple(q.shape)}")
        return q.detach()

    def pull_loss(self, q: Tensor, task: str) -> Tensor:
        """``-λ·mean_b cos(q_b, k_task)``: pulls the task's key toward its inputs' queries."""
        self._check(task, "pull_loss")
        self._check_q(q, "pull_loss")
        return -self.lam * F.cosine_similarity(q, self.keys[task][None].to(q.dtype), dim=-1).mean()

    def similarity(self, q: Tensor, tasks: Sequence[str] | None = None) -> Tensor:
        """Cosine similarity [B, T] of queries with the keys of ``tasks`` (default: all)."""
        tasks = self.tasks if tasks is None else list(tasks)
        if not tasks:
            raise ValueError("PromptID.similarity: no keys (add_key first)")
        for t in tasks:
            self._check(t, "similarity")
        self._check_q(q, "similarity")
        keys = torch.stack([self.keys[t] for t in tasks]).to(q.dtype)
        return F.normalize(q, dim=-1) @ F.normalize(keys, dim=-1).T

    def predict(self, q: Tensor, tasks: Sequence[str] | None = None) -> Tensor:
        """``argmax_t cos(q, k_t)`` -> [B] long indices into ``tasks`` (default: all keys).

        A sample whose similarities are not finite (NaN/Inf in its query: in the inputs or the
        model) is refused with ``ValueError`` naming the samples, rather than given task 0."""
        sim = self.similarity(q, tasks)
        finite = torch.isfinite(sim).all(dim=-1)
        if not bool(finite.all()):
            bad = (~finite).nonzero().flatten().tolist()
            raise ValueError(
                f"PromptID.predict: similarities of samples {bad} are not finite (NaN/Inf in the query "
                "features: the inputs or the model); task inference needs finite inputs"
            )
        return sim.argmax(dim=-1)

    def _check_q(self, q: Tensor, where: str) -> None:
        if not isinstance(q, Tensor) or q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"PromptID.{where}: q must be [B, {self.dim}], got {getattr(q, 'shape', type(q).__name__)}")
