"""SAPT's shared attentive router and its attentive-reflection loss (circle-hit/SAPT, src/t5_prompt.py
``T5Stack.cal_attention`` and ``T5ForConditionalGeneration.memory_replay``).

For an input with token embeddings ``e`` [B, N, d] (padding excluded):

    x = max_n e[:, n, :]                                          (max-pool over the tokens)
    q = LayerNorm(SiLU(W_up (W_down x)))      W_down: d -> 100, W_up: 100 -> d, no biases
    s_t = k_t · q / sqrt(d)                   one d-dim key per task (U(-1, 1) init, frozen after its task)
    w = softmax_t(s)                          the weights of the PET blocks, per input

Attentive reflection: for replayed inputs of an earlier task s, ``KL(batchmean)`` between
``log_softmax(s)`` and the mean routing vector saved at the end of task s (zeros for the keys
added later), times the kl ratio.

The official code orders the keys [current, previous ...] and prepends zeros to the saved vector;
here keys are in task order and the zeros are appended: the same loss.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SAPTRouter", "reflection_loss", "pad_routing", "ROUTER_HIDDEN"]

ROUTER_HIDDEN = 100  # the official trans_input's bottleneck


class SAPTRouter(nn.Module):
    """``trans_input`` (shared by every task, trained on every task) and the per-task keys."""

    def __init__(self, dim: int, hidden: int = ROUTER_HIDDEN):
        super().__init__()
        self.dim = int(dim)
        self.trans_input = nn.Sequential(
            nn.Linear(dim, hidden, bias=False),
            nn.Linear(hidden, dim, bias=False),
            nn.SiLU(),
            nn.LayerNorm(dim),
        )
        self.keys = nn.ParameterList()

    @property
    def n_keys(self) -> int:
        return len(self.keys)

    def add_key(self, device=None) -> nn.Parameter:
        """A new trainable key, U(-1, 1) as the official ``prompt_key`` (draws from torch's global RNG)."""
        key = nn.Parameter(torch.empty(self.dim, device=device).uniform_(-1.0, 1.0))
        self.keys.append(key)
        return key

    def freeze_key(self, i: int) -> None:
        self.keys[i].requires_grad_(False)

    @staticmethod
    def pool(embeddings: Tensor, mask: Tensor | None = None) -> Tensor:
        """Max over the tokens [B, N, d] -> [B, d]; tokens with ``mask`` False (padding) are left out."""
        if mask is not None:
            embeddings = embeddings.masked_fill(~mask.bool()[..., None], float("-inf"))
        return embeddings.max(dim=1).values

    def scores(self, embeddings: Tensor, mask: Tensor | None = None, n_keys: int | None = None) -> Tensor:
        """Attention logits [B, n_keys] over the first ``n_keys`` keys (default: all)."""
        n = self.n_keys if n_keys is None else n_keys
        if not 1 <= n <= self.n_keys:
            raise ValueError(f"SAPTRouter: n_keys must be in [1, {self.n_keys}], got {n}")
        q = self.trans_input(self.pool(embeddings, mask))
        keys = torch.stack(list(self.keys[:n]))
        return q @ keys.to(q.dtype).t() / math.sqrt(self.dim)

    def forward(self, embeddings: Tensor, mask: Tensor | None = None, n_keys: int | None = None) -> Tensor:
        """Routing weights [B, n_keys]: the softmax of :meth:`scores` over the tasks."""
        return torch.softmax(self.scores(embeddings, mask, n_keys), dim=-1)


def pad_routing(mean: Tensor, n: int) -> Tensor:
    """A task's saved mean routing vector [s+1] with zeros appended for the keys added later: [n]."""
    if mean.shape[0] > n:
        raise ValueError(f"pad_routing: a routing vector of {mean.shape[0]} tasks cannot be padded to {n}")
    return torch.cat([mean, mean.new_zeros(n - mean.shape[0])])


def reflection_loss(scores: Tensor, target: Tensor) -> Tensor:
    """``KL(batchmean)`` of ``log_softmax(scores)`` [B, T] against ``target`` [T] (broadcast over
    the batch), as ``nn.KLDivLoss(reduction="batchmean")`` in the official ``memory_replay``."""
    log_p = F.log_softmax(scores, dim=-1)
    return F.kl_div(log_p, target.to(log_p.dtype).expand_as(log_p), reduction="batchmean")
