"""The attention cases' modules: the frozen model's attention (SDPA, no prefix), the prefixed
attention of DualPrompt / NoRGa through ``softtf.prefix_attention``, and the eager composite
(the prefixes concatenated to k and v, explicit scores, gate, softmax, matmul).

Shapes: ViT-B/16 heads (H 12, D 64) over ``layer_tokens`` tokens (197: 196 patches + [CLS]) and
``layer_batch`` images; ``--quick``: H 2, D 32. q, k, v are the [B, H, N, D] views of one
[B, N, 3, H, D] qkv output, as in timm's Attention; the prompt is one [2, P, H, D] parameter
(keys, values) expanded over the batch (one task's prompt for the whole batch, stride 0).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from softtf_kernels import ops

from .config import BenchConfig

__all__ = ["ACTIVATIONS", "AttentionHolder", "FrozenAttention", "LazyCompiled", "PrefixAttention",
           "attention_shape", "eager_prefix_attention"]

# case -> gate activation: DualPrompt's prefix tuning has none, NoRGa's official scripts use sigmoid
ACTIVATIONS = {"attn_dualprompt": "none", "attn_norga": "sigmoid"}
_GATES: dict[str, Callable[[Tensor], Tensor]] = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "gelu": F.gelu}


def attention_shape(config: BenchConfig) -> tuple[int, int, int, int, int]:
    """(B, H, N, D, P) of the attention cases."""
    heads, head_dim = (2, 32) if config.quick else (12, 64)
    return config.layer_batch, heads, config.layer_tokens, head_dim, config.prefix_len


def eager_prefix_attention(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor, alpha: Tensor,
                           tau: Tensor, activation: str) -> Tensor:
    """The eager composite, as the reference code of DualPrompt / NoRGa writes it: the prefixes
    concatenated to k and v, the [N, P + N] scores explicit, the gate applied to the scaled prefix
    columns, softmax, matmul; autograd keeps the score and probability matrices for backward."""
    n_prefix = prefix_k.shape[-2]
    keys, values = torch.cat([prefix_k, k], -2), torch.cat([prefix_v, v], -2)
    s = (q @ keys.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if activation != "none":
        s_p = s[..., :n_prefix]
        s = torch.cat([s_p + alpha * _GATES[activation](tau * s_p), s[..., n_prefix:]], -1)
    return s.softmax(-1) @ values


class LazyCompiled:
    """``torch.compile`` of ``fn``, compiled on the first call (a compile failure is that call's
    error, i.e. the row's reason) and dropped with the candidate."""

    def __init__(self, fn: Callable) -> None:
        self.fn, self.compiled = fn, None

    def __call__(self, *args):
        if self.compiled is None:
            self.compiled = torch.compile(self.fn)
        return self.compiled(*args)


class FrozenAttention(nn.Module):
    """The frozen model's attention: ``F.scaled_dot_product_attention(q, k, v)``, no prefix."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v)


class PrefixAttention(nn.Module):
    """Attention with a learned [2, P, H, D] prefix (``prompt``) and, unless ``activation`` is
    "none", NoRGa's learned α and τ (initialised to 1); ``fn`` has the signature of
    ``softtf.prefix_attention`` without ``scale``."""

    def __init__(self, prompt: Tensor, activation: str, fn: Callable = ops.prefix_attention):
        super().__init__()
        self.prompt = nn.Parameter(prompt.clone())
        one = torch.ones((), device=prompt.device)
        if activation == "none":  # the op takes them, nothing learns them
            self.register_buffer("alpha", one.clone())
            self.register_buffer("tau", one.clone())
        else:
            self.alpha, self.tau = nn.Parameter(one.clone()), nn.Parameter(one.clone())
        self.activation, self.fn = activation, fn

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        b = q.shape[0]
        pk, pv = (p.transpose(0, 1).unsqueeze(0).expand(b, -1, -1, -1) for p in self.prompt)  # [B, H, P, D]
        return self.fn(q, k, v, pk, pv, self.alpha, self.tau, self.activation)


class AttentionHolder(nn.Module):
    """An attention case's model: ``qkv`` [B, N, 3, H, D] -> ``attn(q, k, v)`` [B, H, N, D]."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.attn = attn

    def forward(self, qkv: Tensor) -> Tensor:
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        return self.attn(q, k, v)
