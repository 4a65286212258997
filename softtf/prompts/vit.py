"""A timm ViT run with prompts: prefixes in chosen attention layers, prompt tokens after [CLS].

:class:`PromptedViT` is a view of a feature-extracting timm ``VisionTransformer`` (classifier
removed, ``reset_classifier(0)``); it holds no parameters. Called without prompts it is the
ViT's own forward, so the model stays the pretrained network wherever prompts are not asked for.
"""
from __future__ import annotations

import contextlib
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from .attention import Prefix, enable_prefixes, prompting

__all__ = ["PromptedViT", "POOLS", "clip_layers"]

POOLS = ("model", "prompt")  # the ViT's own pooling ([CLS] for global_pool="token") | mean of the prompt tokens (L2P)


def clip_layers(layers: Sequence[int], depth: int, what: str) -> tuple[int, ...]:
    """The blocks of ``layers`` a ``depth``-block model has (the papers' defaults name ViT-B's
    12 blocks; a smaller demo model keeps those it has). Refuses an empty result."""
    kept = tuple(i for i in layers if 0 <= i < depth)
    if not kept:
        raise ValueError(f"{what}: none of the blocks {tuple(layers)} exists in a {depth}-block ViT")
    return kept


class PromptedViT:
    """Prompted forward passes of ``vit`` (a timm ``VisionTransformer`` used as a feature extractor).

    ``prefix_layers``: the blocks whose attention takes prefixes (made able in place by
    :func:`~softtf.prompts.attention.enable_prefixes`; names and weights are unchanged).
    """

    def __init__(self, vit: nn.Module, prefix_layers: Sequence[int] = ()):
        missing = [a for a in ("blocks", "patch_embed", "norm_pre", "norm", "forward_head", "num_prefix_tokens") if not hasattr(vit, a)]
        if missing:
            raise TypeError(f"PromptedViT: expected a timm VisionTransformer, got {type(vit).__name__} without {missing}")
        depth = len(vit.blocks)
        bad = [i for i in prefix_layers if not (isinstance(i, int) and 0 <= i < depth)]
        if bad:
            raise ValueError(f"PromptedViT: prefix_layers {bad} are not blocks of this {depth}-block ViT")
        self.vit = vit
        self.prefix_layers = tuple(prefix_layers)
        for i in self.prefix_layers:
            enable_prefixes(vit.blocks[i].attn)
        attn = vit.blocks[0].attn
        self.depth, self.num_heads, self.head_dim = depth, int(attn.num_heads), int(attn.head_dim)
        self.embed_dim = int(vit.embed_dim)

    def __call__(self, x: Tensor, prefixes: Mapping[int, Prefix] | None = None, tokens: Tensor | None = None,
                 pool: str = "model") -> Tensor:
        """Features [B, embed_dim] of images ``x``.

        ``prefixes``: block index -> :class:`Prefix` (blocks given at construction only).
        ``tokens`` [B, L, embed_dim]: prompt tokens inserted after the [CLS] (prefix) tokens, after
        the position embedding (they carry none). ``pool``: ``"model"`` (the ViT's own pooling)
        or ``"prompt"`` (mean of the L prompt tokens' outputs, L2P's head input)."""
        if pool not in POOLS:
            raise ValueError(f"PromptedViT: pool must be one of {POOLS}, got {pool!r}")
        if pool == "prompt" and tokens is None:
            raise ValueError("PromptedViT: pool 'prompt' needs prompt tokens")
        context = contextlib.nullcontext()
        if prefixes:
            unknown = sorted(set(prefixes) - set(self.prefix_layers))
            if unknown:
                raise ValueError(f"PromptedViT: blocks {unknown} do not take prefixes (prefix_layers={self.prefix_layers})")
            context = prompting({self.vit.blocks[i].attn: p for i, p in prefixes.items()})
        with context:
            if tokens is None and pool == "model":
                return self.vit(x)  # timm's own forward (the attention layers read the prefixes)
            return self._forward_with_tokens(x, tokens, pool)

    def _forward_with_tokens(self, x: Tensor, tokens: Tensor, pool: str) -> Tensor:
        vit, npt = self.vit, int(self.vit.num_prefix_tokens)
        if tokens.ndim != 3 or tokens.shape[0] != x.shape[0] or tokens.shape[2] != self.embed_dim:
            raise ValueError(f"PromptedViT: tokens must be [{x.shape[0]}, L, {self.embed_dim}], got {tuple(tokens.shape)}")
        # timm's forward_features with the prompt tokens spliced in after the position embedding
        # (_pos_embed adds [CLS] and the position embedding: timm's own step, called as timm does).
        h = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
        h = torch.cat([h[:, :npt], tokens.to(h.dtype), h[:, npt:]], dim=1)
        h = vit.norm(vit.blocks(h))
        if pool == "prompt":
            return vit.head(vit.head_drop(vit.fc_norm(h[:, npt:npt + tokens.shape[1]].mean(dim=1))))
        return vit.forward_head(h)
