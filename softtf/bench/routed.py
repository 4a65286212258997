"""The routed-LoRA cases' modules (``lora_t5``, ``lora_t10``, ``lora_t20``): SAPT's mixture of T
per-task LoRA blocks on one frozen projection, ``y = W x + b + Σ_t w_bt · s · B_t A_t x_b``,
through the fused op ``softtf_kernels.ops.routed_lora`` (one rank-(T·r) LoRA) and as the official
SAPT code computes it, a Python loop over T LoRA modules.

The loop (:class:`PeftLoop`) runs on a real PEFT ``LoraLayer`` (``peft.tuners.lora.Linear``) holding
T adapters on the frozen ``nn.Linear``: PEFT's own modules (``lora_A[t]``, ``lora_B[t]``, its
``lora_dropout[t]`` (an Identity at dropout 0) and ``scaling[t]`` = alpha / r), but PEFT's forward
sums its active adapters without per-sample weights, so the loop over them is written here:
``base(x) + Σ_t w[:, t] · lora_B[t](lora_A[t](dropout[t](x))) · scaling[t]``, the official line.

Shapes: BERT-base query / value (in = out = 768; ``--quick``: 64), r = 4, alpha = 32 (SAPT's), x
[B, N, in] with B, N the BERT case's batch and sequence length; T from the case name. The routing
weights are a [B, T] leaf parameter standing in for the router's softmax output (its gradient is
what the router would receive; Adam steps it like A and B).
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from softtf_kernels import ops

from .config import LORA_CASES, BenchConfig

__all__ = ["PeftLoop", "RoutedLoRA", "SAPT_ALPHA", "SAPT_R", "peft_lora_layer", "routed_inits", "routed_shape"]

SAPT_R, SAPT_ALPHA = 4, 32  # SAPT's LoRA: r = 4, lora_alpha = 32 (scaling 8), no dropout


def routed_shape(name: str, config: BenchConfig) -> tuple[int, int, int, int, int]:
    """(B, N, d, T, r) of routed-LoRA case ``name`` (in = out = d)."""
    if name not in LORA_CASES:
        raise ValueError(f"not a routed-LoRA case: {name!r}; choose from {LORA_CASES}")
    return config.bert_batch, config.bert_tokens, 64 if config.quick else 768, int(name.split("_t")[1]), SAPT_R


def routed_inits(name: str, config: BenchConfig, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """(lora_a [T, r, d], lora_b [T, d, r], weights [B, T]) every row starts from: A as PEFT's
    Kaiming-uniform bound, B small and non-zero (PEFT's zero B would zero every gradient but dB),
    the weights a softmax over tasks."""
    b, _, d, t, r = routed_shape(name, config)
    gen = torch.Generator(device=device)
    gen.manual_seed(config.seed)
    lora_a = (torch.rand((t, r, d), generator=gen, device=device) * 2 - 1) * d ** -0.5
    lora_b = torch.randn((t, d, r), generator=gen, device=device) * 0.02
    weights = torch.randn((b, t), generator=gen, device=device).softmax(-1)
    return lora_a, lora_b, weights


class RoutedLoRA(nn.Module):
    """The frozen ``base`` plus ``softtf_kernels.ops.routed_lora`` over the T blocks."""

    def __init__(self, base: nn.Linear, lora_a: Tensor, lora_b: Tensor, weights: Tensor, scaling: float):
        super().__init__()
        self.base, self.scaling = base, scaling
        self.lora_a, self.lora_b = nn.Parameter(lora_a.clone()), nn.Parameter(lora_b.clone())
        self.weights = nn.Parameter(weights.clone())

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + ops.routed_lora(x, self.lora_a, self.lora_b, self.weights, self.scaling)


class _Holder(nn.Module):
    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.lin = lin


def peft_lora_layer(base: nn.Linear, lora_a: Tensor, lora_b: Tensor, alpha: int = SAPT_ALPHA) -> nn.Module:
    """A PEFT ``LoraLayer`` on ``base`` with adapters ``t0`` .. ``t{T-1}`` (r = lora_a.shape[1],
    ``lora_alpha`` alpha, no dropout) holding lora_a[t] / lora_b[t]."""
    import peft  # optional heavy dependency (softtf[models]): only this row needs it

    holder = _Holder(base)
    t, r = lora_a.shape[0], lora_a.shape[1]
    with warnings.catch_warnings():  # "Already found a peft_config": the adapters are meant to share the layer
        warnings.simplefilter("ignore")
        for k in range(t):
            cfg = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=["lin"])
            peft.inject_adapter_in_model(cfg, holder, adapter_name=f"t{k}")
    layer = holder.lin
    if layer is base or list(layer.lora_A.keys()) != [f"t{k}" for k in range(t)]:
        raise RuntimeError("PEFT did not build one LoraLayer with the T adapters")
    with torch.no_grad():
        for k in range(t):
            layer.lora_A[f"t{k}"].weight.copy_(lora_a[k])
            layer.lora_B[f"t{k}"].weight.copy_(lora_b[k])
    return layer


class PeftLoop(nn.Module):
    """The official SAPT mixture: a Python loop over the T adapters of a PEFT ``LoraLayer``, each
    ``lora_B(lora_A(dropout(x))) * scaling`` weighted by ``weights[:, t]``, added to the frozen output."""

    def __init__(self, layer: nn.Module, weights: Tensor):
        super().__init__()
        self.layer = layer
        self.names = list(layer.lora_A.keys())
        self.weights = nn.Parameter(weights.clone())

    def forward(self, x: Tensor) -> Tensor:
        lay = self.layer
        result = lay.base_layer(x)
        w = self.weights.view(self.weights.shape[0], *([1] * (x.dim() - 2)), self.weights.shape[1])
        for t, name in enumerate(self.names):
            delta = lay.lora_B[name](lay.lora_A[name](lay.lora_dropout[name](x))) * lay.scaling[name]
            result = result + w[..., t:t + 1] * delta
        return result

    def blocks(self) -> list[nn.Parameter]:
        """The adapters' A and B weights (the trainable LoRA parameters)."""
        return [p for n in self.names for p in (self.layer.lora_A[n].weight, self.layer.lora_B[n].weight)]
