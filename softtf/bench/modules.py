"""The layers the candidates put on a case's targets: SoftLinear, the eager reference, PEFT LoRA."""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.config import SoftConfig
from ..core.layer import SoftLinear
from ..core.model import set_submodule, wrap
from .cases import Case
from .config import BenchConfig

__all__ = ["CompiledMaskedLinear", "EagerMaskedLinear", "eager_masked_linear", "lora_modules", "soft_modules"]


def eager_masked_linear(x: Tensor, weight: Tensor, mask: Tensor, bias: Tensor | None) -> Tensor:
    return F.linear(x, weight * mask, bias)


class CompiledMaskedLinear:
    """``torch.compile`` of :func:`eager_masked_linear`, shared by the layers of one candidate.
    Compiled on the first call, so that a compile failure is that call's error (the row's reason);
    dropped with the candidate, so every case starts from a fresh compile."""

    def __init__(self) -> None:
        self.fn: Callable | None = None

    def __call__(self, x: Tensor, weight: Tensor, mask: Tensor, bias: Tensor | None) -> Tensor:
        if self.fn is None:
            self.fn = torch.compile(eager_masked_linear)
        return self.fn(x, weight, mask, bias)


class EagerMaskedLinear(nn.Module):
    """The eager reference: ``F.linear(x, W * M, b)`` (W * M materialized), autograd for everything.
    ``linear_fn`` is :func:`eager_masked_linear` or a ``torch.compile`` of it.

    With ``alpha`` [B, T] set (Gradient ID), sample b runs with ``W ⊙ Σ_t alpha[b, t] M_t``: the
    per-sample weights [B, out, in] are materialized, which is what autograd needs for ∂/∂α per sample.
    """

    def __init__(self, base_layer: nn.Linear, frozen_masks: Tensor | None = None,
                 linear_fn: Callable[[Tensor, Tensor, Tensor, Tensor | None], Tensor] = eager_masked_linear):
        super().__init__()
        self.base_layer = base_layer
        w = base_layer.weight
        self.mask = nn.Parameter(torch.ones(w.shape, dtype=torch.float32 if w.dtype != torch.float64 else w.dtype,
                                            device=w.device))
        self.frozen_masks = frozen_masks
        self.linear_fn = linear_fn
        self.alpha: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        w, b = self.base_layer.weight, self.base_layer.bias
        if self.alpha is None:
            return self.linear_fn(x, w, self.mask.to(w.dtype), b)
        masks = self.frozen_masks.to(w.dtype)
        wb = w * torch.einsum("bt,toi->boi", self.alpha.to(w.dtype), masks)  # [B, out, in]
        xb = x.reshape(x.shape[0], -1, x.shape[-1])
        y = torch.bmm(xb, wb.transpose(1, 2))
        if b is not None:
            y = y + b
        return y.reshape(*x.shape[:-1], w.shape[0])


def soft_modules(case: Case, config: BenchConfig) -> dict[str, SoftLinear]:
    """SoftLinear on the case's target names (through ``softtf.wrap`` for the models), with
    ``config.gid_tasks`` frozen tasks ``t0..`` and one trainable task ``active``."""
    mask_dtype = config.mask_torch_dtype
    if case.wrap_used == "softtf.wrap":
        try:
            mods = dict(wrap(case.model, SoftConfig(mask_dtype=mask_dtype, modules_to_save=[])).soft_layers)
        finally:  # back to the plain layers; candidates are installed on demand
            for n in case.names:
                set_submodule(case.model, n, case.originals[n])
        if list(mods) != case.names:
            raise RuntimeError(f"softtf.wrap chose {list(mods)}, expected {case.names}")
    else:
        mods = {n: SoftLinear(case.originals[n], mask_dtype=mask_dtype) for n in case.names}
    gen = torch.Generator(device=case.originals[case.names[0]].weight.device)
    gen.manual_seed(config.seed)
    for layer in mods.values():
        for k in range(config.gid_tasks):
            layer.add_task(f"t{k}", init=("uniform", 0.5, 1.5), generator=gen)
            layer.freeze_task(f"t{k}")
        layer.add_task("active", init="ones")
    return mods


def lora_modules(case: Case, ranks: dict[str, int], adapter_name: str) -> tuple[dict[str, nn.Module], list[nn.Parameter]]:
    """PEFT LoRA layers of rank ``ranks[name]`` on the targets and their trainable parameters; the
    model is left with its plain layers (the candidate installs the LoRA ones on demand)."""
    import peft  # optional heavy dependency (softtf[models]): only the LoRA rows need it

    names = list(ranks)
    first = ranks[names[0]]
    cfg = peft.LoraConfig(r=first, lora_alpha=first, lora_dropout=0.0, target_modules=names,
                          rank_pattern={n: r for n, r in ranks.items() if r != first},
                          alpha_pattern={n: r for n, r in ranks.items() if r != first})
    peft.inject_adapter_in_model(cfg, case.model, adapter_name=adapter_name)
    mods = {n: case.model.get_submodule(n) for n in names}
    trainable = []
    for n, mod in mods.items():
        if mod is case.originals[n]:
            raise RuntimeError(f"PEFT did not replace {n!r}")
        got = mod.r.get(adapter_name) if hasattr(mod, "r") else None
        if got != ranks[n]:
            raise RuntimeError(f"PEFT gave {n!r} rank {got}, expected {ranks[n]}")
        trainable += [p for pn, p in mod.named_parameters() if "lora_" in pn]
    if hasattr(case.model, "peft_config"):  # inject_adapter_in_model leaves its config on the model
        with contextlib.suppress(Exception):
            del case.model.peft_config
    for n in names:
        set_submodule(case.model, n, case.originals[n])
    return mods, trainable

