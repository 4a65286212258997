"""Baking one task's masks into plain ``nn.Linear`` weights, for deployment (PEFT's merge).

The single-task forward computes ``y = x (W ⊙ M_t)^T + b`` with ``W`` and ``M_t`` both cast to the
accumulation dtype (fp32; fp64 for fp64 weights). The merged weight is that same product, stored in
the weight's dtype: for fp32 weights it holds exactly the values the kernel multiplies by, so merged
and masked outputs differ only by the order of the GEMM's sums; for bf16 / fp16 weights the product
is rounded once to the weight's dtype, where the masked forward keeps it in fp32.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from softtf_kernels.common import acc_dtype
from softtf_kernels.quant import dequantize_mask

from .layer import SoftLinear

__all__ = ["merged_weight", "merge_layer"]


def merged_weight(layer: SoftLinear, task: str) -> Tensor:
    """``W ⊙ M_task`` of ``layer`` as its forward forms it, in the weight's dtype (a new tensor)."""
    w = layer.weight
    acc = acc_dtype(w.dtype)
    with torch.no_grad():
        mask = dequantize_mask(layer.mask(task).detach(), acc)  # KeyError naming the known tasks when unknown
        return (w.detach().to(acc) * mask.to(w.device)).to(w.dtype)


def merge_layer(layer: SoftLinear, task: str) -> nn.Linear:
    """``layer``'s base ``nn.Linear`` with its weight set to ``W ⊙ M_task`` in place (the Parameter
    object stays, so a weight tied elsewhere changes there too, as in PEFT); its bias is kept."""
    merged = merged_weight(layer, task)
    base = layer.base_layer
    with torch.no_grad():
        base.weight.copy_(merged)
    return base
