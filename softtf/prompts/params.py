"""The learnable prompts of the prompt methods.

* :class:`PrefixPrompts`: prefix-tuning prompts, one set per task (DualPrompt's / NoRGa's
  E-prompts; a single "shared" set is DualPrompt's G-prompt): per prefixed layer a [2, L, H, D]
  tensor, the key half and the value half (JH-LEE-KR/dualprompt-pytorch's layout).
* :class:`TokenPromptPool`: L2P's pool of M prompts of L tokens with one key each; each sample
  takes the ``top_k`` prompts whose keys are nearest (cosine) to its query feature.

Prompts and keys start U(-1, 1), the official codes' ``prompt_init="uniform"``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import Prefix

__all__ = ["PrefixPrompts", "TokenPromptPool", "uniform"]


def uniform(*shape: int) -> nn.Parameter:
    """A parameter drawn U(-1, 1) from torch's global generator (seeded by the caller)."""
    return nn.Parameter(torch.rand(*shape) * 2 - 1)


class PrefixPrompts(nn.Module):
    """Prefix prompts per task: ``prompts[task][i]`` is the [2, L, H, D] prefix of ``layers[i]``."""

    def __init__(self, layers: tuple[int, ...], length: int, num_heads: int, head_dim: int):
        super().__init__()
        if not layers:
            raise ValueError("PrefixPrompts: layers must not be empty")
        if not isinstance(length, int) or length < 1:
            raise ValueError(f"PrefixPrompts: length must be a positive int, got {length!r}")
        self.layers, self.length, self.num_heads, self.head_dim = tuple(layers), length, num_heads, head_dim
        self.tasks: list[str] = []
        self.prompts = nn.ModuleList()  # one ParameterList per task, in self.tasks order

    def add(self, task: str, device: torch.device | str | None = None) -> list[nn.Parameter]:
        """Create ``task``'s prompts (U(-1, 1) drawn on the CPU, trainable) on ``device``."""
        if task in self.tasks:
            raise ValueError(f"PrefixPrompts.add: task {task!r} already has prompts")
        params = nn.ParameterList([uniform(2, self.length, self.num_heads, self.head_dim) for _ in self.layers])
        self.prompts.append(params.to(device))
        self.tasks.append(task)
        return list(self.prompts[-1])

    def freeze(self, task: str) -> None:
        for p in self.prompts[self.index(task)]:
            p.requires_grad_(False)

    def index(self, task: str) -> int:
        if task not in self.tasks:
            raise KeyError(f"PrefixPrompts: no prompts for task {task!r} (tasks: {self.tasks or 'none'})")
        return self.tasks.index(task)

    def select(self, task_index: Tensor, tasks: list[str], activation: str = "none",
               gates: tuple[list[Tensor], list[Tensor]] | None = None) -> dict[int, Prefix]:
        """Per-layer prefixes of a batch whose sample b runs task ``tasks[task_index[b]]``.

        One task for the whole batch expands that task's prompts (no copy); several gather them.
        ``gates`` = (alphas, taus), one per layer, for a gated ``activation``."""
        idx = torch.as_tensor([self.index(t) for t in tasks], dtype=torch.long)
        rows = idx[task_index.cpu().long()]
        single = bool((rows == rows[0]).all()) if rows.numel() else True
        out = {}
        for i, layer in enumerate(self.layers):
            if single:
                p = self.prompts[int(rows[0])][i]
                kv = p.unsqueeze(0).expand(rows.shape[0], *p.shape)  # [B, 2, L, H, D]
            else:
                kv = torch.stack([self.prompts[j][i] for j in range(len(self.tasks))])[rows.to(self.prompts[0][i].device)]
            alpha, tau = (gates[0][i], gates[1][i]) if gates is not None else (None, None)
            out[layer] = Prefix(kv[:, 0], kv[:, 1], alpha, tau, activation)
        return out

    def parameters_per_task(self) -> int:
        return len(self.layers) * 2 * self.length * self.num_heads * self.head_dim


class TokenPromptPool(nn.Module):
    """L2P's prompt pool: ``prompts`` [M, L, C] and ``keys`` [M, C]."""

    def __init__(self, size: int, length: int, dim: int, top_k: int):
        super().__init__()
        for name, v in (("size", size), ("length", length), ("dim", dim), ("top_k", top_k)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"TokenPromptPool: {name} must be a positive int, got {v!r}")
        if top_k > size:
            raise ValueError(f"TokenPromptPool: top_k {top_k} exceeds the pool size {size}")
        self.size, self.length, self.dim, self.top_k = size, length, dim, top_k
        self.prompts = uniform(size, length, dim)
        self.keys = uniform(size, dim)

    def select(self, query: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(tokens [B, top_k * L, C], chosen prompt ids [B, top_k], reduce_sim) for queries [B, C].

        ``reduce_sim`` = Σ_b Σ_k cos(q_b, key_{id_bk}) / B (l2p-pytorch's pull term; the loss
        subtracts ``pull * reduce_sim``, pulling the chosen keys toward their queries)."""
        if query.ndim != 2 or query.shape[1] != self.dim:
            raise ValueError(f"TokenPromptPool.select: query must be [B, {self.dim}], got {tuple(query.shape)}")
        keys = F.normalize(self.keys, dim=-1)
        q = F.normalize(query.detach().to(keys.dtype), dim=-1)
        sim = q @ keys.T  # [B, M]
        ids = sim.topk(self.top_k, dim=1).indices
        tokens = self.prompts[ids].reshape(query.shape[0], self.top_k * self.length, self.dim)
        reduce_sim = sim.gather(1, ids).sum() / query.shape[0]
        return tokens, ids, reduce_sim
