"""SAPT's PET blocks in the backbone: one LoRA per task on the query and value projections, mixed
per sample by the router's weights through the fused op ``softtf_kernels.ops.routed_lora``.

    y = W x + b + Σ_t w_bt · scaling · B_t A_t x_b        (scaling = alpha / r)

``softtf_kernels.ops.routed_lora(x, lora_a [T, r, in], lora_b [T, out, r], weights [B, T], scaling)``
computes the sum as one rank-(T·r) LoRA; the official code loops over T LoRA modules.

* HF BERT: ``attention.self.query`` and ``attention.self.value`` of every layer become
  :class:`RoutedLoRALinear` (the frozen ``nn.Linear`` as ``.base``).
* timm ViT: q, k and v come from one fused ``attn.qkv`` Linear (out = 3·dim, rows [q; k; v]);
  :class:`RoutedLoRAQKV` runs it unchanged and adds one routed LoRA to the q slice (rows 0..dim-1)
  and one to the v slice (rows 2·dim..3·dim-1): the same as LoRA on separate q and v Linears.

The weights of a call live in a :class:`Routing` shared by the layers of one model, set by the
method around each forward (``with routing.use(w):``); with ``routing.enabled`` False (the
pretrained network) the layers are their base Linear.

The router's input (:func:`router_input`): BERT, the word embeddings of the tokens (T5's
``embed_tokens``, as the official router reads: no positions), padding excluded by the attention
mask; ViT, the patch embeddings plus their position embeddings (the class token left out).
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor, nn

from softtf_kernels import ops as kernel_ops

__all__ = ["Routing", "RoutedLoRALinear", "RoutedLoRAQKV", "LoRABlocks", "install_routed_lora", "router_input"]


class Routing:
    """The routing weights [B, T] of the current forward, shared by a model's routed layers."""

    def __init__(self) -> None:
        self.weights: Tensor | None = None
        self.enabled = True

    @contextlib.contextmanager
    def use(self, weights: Tensor):
        before, self.weights = self.weights, weights
        try:
            yield
        finally:
            self.weights = before

    @contextlib.contextmanager
    def disabled(self):
        before, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = before


class LoRABlocks(nn.Module):
    """One LoRA (A [r, in], B [out, r]) per task for one projection; A as PEFT/loralib initialise it
    (Kaiming-uniform, a = sqrt(5)), B zeros."""

    def __init__(self, in_features: int, out_features: int, r: int):
        super().__init__()
        self.in_features, self.out_features, self.r = in_features, out_features, r
        self.A = nn.ParameterList()
        self.B = nn.ParameterList()

    def add(self, device=None) -> list[nn.Parameter]:
        a = nn.Parameter(torch.empty(self.r, self.in_features, device=device))
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        b = nn.Parameter(torch.zeros(self.out_features, self.r, device=device))
        self.A.append(a)
        self.B.append(b)
        return [a, b]

    def freeze(self, i: int) -> None:
        self.A[i].requires_grad_(False)
        self.B[i].requires_grad_(False)

    def __len__(self) -> int:
        return len(self.A)

    def delta(self, x: Tensor, weights: Tensor, scaling: float) -> Tensor:
        """``Σ_t weights[b, t] · scaling · x_b A_tᵀ B_tᵀ`` over the first ``weights.shape[1]`` blocks."""
        n = weights.shape[1]
        lora_a = torch.stack(list(self.A[:n])).to(x.dtype)
        lora_b = torch.stack(list(self.B[:n])).to(x.dtype)
        return kernel_ops.routed_lora(x, lora_a, lora_b, weights, scaling)  # weights stay fp32 (the op takes any dtype)


class RoutedLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus the routed LoRA blocks of its output (BERT's query / value)."""

    def __init__(self, base: nn.Linear, routing: Routing, r: int, scaling: float):
        super().__init__()
        self.base, self.routing, self.scaling = base, routing, scaling
        self.lora = LoRABlocks(base.in_features, base.out_features, r)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        w = self.routing.weights
        if not self.routing.enabled or len(self.lora) == 0:
            return y
        if w is None:
            raise RuntimeError("SAPT: a routed layer ran without routing weights (run the model through the method)")
        return y + self.lora.delta(x, w, self.scaling)


class RoutedLoRAQKV(nn.Module):
    """timm's fused qkv Linear plus routed LoRA blocks on its q and v output slices."""

    def __init__(self, base: nn.Linear, routing: Routing, r: int, scaling: float):
        super().__init__()
        if base.out_features % 3:
            raise ValueError(f"SAPT: a fused qkv Linear needs 3*dim outputs, got {base.out_features}")
        self.base, self.routing, self.scaling = base, routing, scaling
        self.dim = base.out_features // 3
        self.in_features, self.out_features = base.in_features, base.out_features  # timm reads them
        self.lora_q = LoRABlocks(base.in_features, self.dim, r)
        self.lora_v = LoRABlocks(base.in_features, self.dim, r)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        w = self.routing.weights
        if not self.routing.enabled or len(self.lora_q) == 0:
            return y
        if w is None:
            raise RuntimeError("SAPT: a routed layer ran without routing weights (run the model through the method)")
        q, k, v = y.split(self.dim, dim=-1)
        return torch.cat([q + self.lora_q.delta(x, w, self.scaling), k, v + self.lora_v.delta(x, w, self.scaling)], dim=-1)


def install_routed_lora(backbone: nn.Module, arch: str, routing: Routing, r: int, scaling: float) -> dict[str, LoRABlocks]:
    """Replace the q / v projections of every block by routed layers, in place; returns the LoRA
    blocks by name (``<module>.q`` / ``.v``: checkpoint keys), in model order."""
    blocks: dict[str, LoRABlocks] = {}
    if arch == "vit":
        for i, block in enumerate(backbone.blocks):
            layer = RoutedLoRAQKV(block.attn.qkv, routing, r, scaling)
            block.attn.qkv = layer
            blocks[f"blocks.{i}.attn.qkv.q"], blocks[f"blocks.{i}.attn.qkv.v"] = layer.lora_q, layer.lora_v
        return blocks
    for i, layer in enumerate(backbone.encoder.layer):
        attn = layer.attention.self
        for proj in ("query", "value"):
            routed = RoutedLoRALinear(getattr(attn, proj), routing, r, scaling)
            setattr(attn, proj, routed)
            blocks[f"encoder.layer.{i}.attention.self.{proj}"] = routed.lora
    return blocks


def router_input(backbone: nn.Module, arch: str, inputs) -> tuple[Tensor, Tensor | None]:
    """The token embeddings the router max-pools [B, N, d] and the mask of real tokens (or None)."""
    if arch == "vit":
        x = backbone.patch_embed(inputs)
        if x.ndim == 4:  # a patch embed that keeps the grid (NHWC)
            x = x.flatten(1, 2)
        pos = backbone.pos_embed
        if pos is not None:
            start = 0 if getattr(backbone, "no_embed_class", False) else getattr(backbone, "num_prefix_tokens", 1)
            x = x + pos[:, start:start + x.shape[1]]
        return x, None
    emb = backbone.embeddings.word_embeddings(inputs["input_ids"])
    mask = inputs.get("attention_mask")
    return emb, None if mask is None else mask.bool()
