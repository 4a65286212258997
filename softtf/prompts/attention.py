"""Prefix keys/values in a timm ViT's attention, through the fused ``softtf.prefix_attention`` op.

:func:`enable_prefixes` gives an ``Attention`` module the ability to take prefixes without renaming
anything: like ``torch.nn.utils.parametrize``, it swaps the instance's class for a generated
subclass of its own class, so module names, ``state_dict`` keys and Soft-TF target names
(``blocks.9.attn.qkv``) stay as they were and ``softtf.wrap`` before or after works the same.

The prefixes of one call live in a context variable set by :func:`prompting` (private to the
thread / asyncio task, so concurrent calls with different prompts do not see each other's). With
no prefix for a layer the layer runs timm's own forward, bit for bit.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch
from torch import Tensor, nn

from softtf_kernels import ops

__all__ = ["Prefix", "enable_prefixes", "disable_prefixes", "prompting", "current_prefix", "PREFIX_ACTIVATIONS"]

PREFIX_ACTIVATIONS = ("none", "sigmoid", "tanh", "gelu")
_PREFIXES: contextvars.ContextVar[Mapping[nn.Module, "Prefix"] | None] = contextvars.ContextVar("softtf_prefixes", default=None)
_PREFIXED_CLASSES: dict[type, type] = {}  # original Attention class -> its generated prefixed subclass


@dataclass(frozen=True)
class Prefix:
    """The prefix of one attention layer for one call.

    ``key`` / ``value`` [B, P, H, D]: one row of P prefix tokens per sample (select per sample
    before, e.g. ``eprompts[task_index]``), in any dtype (cast to the activations' dtype).
    ``alpha`` / ``tau`` (0-dim) and ``activation``: NoRGa's gate on the prefix scores,
    ``s' = s + alpha * act(tau * s)``; ``"none"`` is DualPrompt's plain prefix tuning.
    """

    key: Tensor
    value: Tensor
    alpha: Tensor | None = None
    tau: Tensor | None = None
    activation: str = "none"

    def __post_init__(self) -> None:
        if self.activation not in PREFIX_ACTIVATIONS:
            raise ValueError(f"Prefix: activation must be one of {PREFIX_ACTIVATIONS}, got {self.activation!r}")
        for name in ("key", "value"):
            t = getattr(self, name)
            if not isinstance(t, Tensor) or t.ndim != 4:
                raise ValueError(f"Prefix: {name} must be a [B, P, H, D] tensor, got {getattr(t, 'shape', type(t).__name__)}")
        if self.key.shape != self.value.shape:
            raise ValueError(f"Prefix: key {tuple(self.key.shape)} and value {tuple(self.value.shape)} must have one shape")
        if self.activation != "none":
            for name in ("alpha", "tau"):
                t = getattr(self, name)
                if not isinstance(t, Tensor) or t.ndim != 0:
                    raise ValueError(f"Prefix: activation {self.activation!r} needs {name} as a 0-dim tensor, got {t!r}")


@contextlib.contextmanager
def prompting(prefixes: Mapping[nn.Module, Prefix]) -> Iterator[None]:
    """``with prompting({attn: Prefix(...)}): model(x)``: the calls inside the block run each
    listed attention module (made able by :func:`enable_prefixes`) with its prefix."""
    token = _PREFIXES.set(dict(prefixes))
    try:
        yield
    finally:
        _PREFIXES.reset(token)


def current_prefix(module: nn.Module) -> Prefix | None:
    """The prefix ``module`` runs with in the current context (None: none)."""
    prefixes = _PREFIXES.get()
    return None if prefixes is None else prefixes.get(module)


class PrefixAttentionMixin:
    """The forward of a prefixed timm ``Attention``: q, k, v through the module's own (possibly
    masked) ``qkv``, attention with the prefix through ``softtf.prefix_attention``, then the
    module's own output path. Without a prefix: the original class's forward."""

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        prefix = current_prefix(self)
        if prefix is None:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if attn_mask is not None or is_causal:
            raise ValueError("prefix attention: attn_mask / is_causal are not supported together with a prefix")
        B, N, _ = x.shape
        if prefix.key.shape[0] != B or prefix.key.shape[2:] != (self.num_heads, self.head_dim):
            raise ValueError(f"prefix attention: prefix key must be [{B}, P, {self.num_heads}, {self.head_dim}], "
                             f"got {tuple(prefix.key.shape)}")
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        pk = prefix.key.to(q.dtype).transpose(1, 2)  # [B, H, P, D]: the op takes any strides
        pv = prefix.value.to(q.dtype).transpose(1, 2)
        if prefix.activation == "none":
            alpha = tau = q.new_zeros(())
        else:
            alpha, tau = prefix.alpha, prefix.tau
        out = ops.prefix_attention(q, k, v, pk, pv, alpha, tau, prefix.activation, float(self.scale))
        out = self.norm(out.transpose(1, 2).reshape(B, N, self.attn_dim))
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))


def enable_prefixes(attn: nn.Module) -> nn.Module:
    """Make a timm ``Attention`` module take prefixes (in place; returns it). Idempotent."""
    cls = type(attn)
    if isinstance(attn, PrefixAttentionMixin):
        return attn
    missing = [a for a in ("qkv", "proj", "num_heads", "head_dim", "scale", "q_norm", "k_norm") if not hasattr(attn, a)]
    if missing or cls.__name__ != "Attention":
        raise TypeError(f"enable_prefixes: expected timm's Attention module (qkv, q_norm, k_norm, proj, num_heads, head_dim, "
                        f"scale), got {cls.__name__}" + (f" without {missing}" if missing else ""))
    if getattr(attn, "attn_drop", None) is not None and attn.attn_drop.p > 0:
        raise ValueError(f"enable_prefixes: attention dropout p={attn.attn_drop.p} is not supported by prefix attention")
    if cls not in _PREFIXED_CLASSES:
        _PREFIXED_CLASSES[cls] = type(f"Prefixed{cls.__name__}", (PrefixAttentionMixin, cls), {"original_class": cls})
    attn.__class__ = _PREFIXED_CLASSES[cls]
    return attn


def disable_prefixes(attn: nn.Module) -> nn.Module:
    """Undo :func:`enable_prefixes` (in place; returns the module)."""
    if isinstance(attn, PrefixAttentionMixin):
        attn.__class__ = type(attn).original_class
    return attn
