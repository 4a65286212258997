"""The ViT model case's prompt rows: DualPrompt and NoRGa with their official layer lists and
lengths, each alone and with Soft-TF masks on the case's targets (qkv + proj of the last 3
blocks), against the frozen model (the floor row).

Each row runs the case's ViT through :class:`softtf.prompts.PromptedViT` with one task's prompts
for the whole batch (what a training step and a one-task test batch see): prefixes through
``softtf.prefix_attention`` in the prompted blocks. Its train step trains the prompts (+ NoRGa's
alpha, tau; + the active mask with ``+softtf``) and backpropagates to block 0.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..methods.dualprompt import DualPromptMethod
from ..methods.norga import NoRGaMethod
from ..prompts import PrefixPrompts, PromptedViT
from .candidate import Candidate
from .cases import Case
from .config import PROMPT_CANDIDATES, BenchConfig

__all__ = ["prompt_candidates"]

_NA_GID = {"status": "n/a", "reason": "Gradient ID runs on SoftLinear layers alone (prompt rows: task from Prompt ID)"}
_METHODS = {"dualprompt": (DualPromptMethod, "none"), "norga": (NoRGaMethod, "sigmoid")}  # NoRGa's official gate


def _prefix_sets(method: str, depth: int, heads: int, head_dim: int) -> tuple[list[PrefixPrompts], str]:
    """The prompt sets of ``method`` (its own blocks and lengths, one task each) and the gate activation."""
    cls, activation = _METHODS[method]
    sets = [PrefixPrompts(layers, length, heads, head_dim) for layers, length in cls.prefix_sets(depth)]
    for s in sets:
        s.add("task")
    return sets, activation


def prompt_candidates(case: Case, config: BenchConfig, soft_mods: dict, soft_reason: str) -> list[Candidate]:
    """PROMPT_CANDIDATES for the ViT model case (``soft_mods``: the case's SoftLinear modules)."""
    vit = case.model
    device = next(vit.parameters()).device
    attn = vit.blocks[0].attn
    cands = []
    for key in PROMPT_CANDIDATES:
        method, masks = key.split("+")[0], key.endswith("+softtf")
        c = Candidate(key, f"{'DualPrompt' if method == 'dualprompt' else 'NoRGa'}" + (" + Soft-TF masks" if masks else ""),
                      "prompt")
        cands.append(c)
        c.results["gid"] = dict(_NA_GID)
        if masks and not soft_mods:
            c.mark("failed", soft_reason, ("infer", "train"))
            continue
        torch.manual_seed(config.seed)
        sets, activation = _prefix_sets(method, len(vit.blocks), int(attn.num_heads), int(attn.head_dim))
        holder = nn.ModuleList(sets).to(device)
        gates = None
        if activation != "none":
            n = len(sets[0].layers)
            gates = (nn.ParameterList([nn.Parameter(torch.ones((), device=device)) for _ in range(n)]),
                     nn.ParameterList([nn.Parameter(torch.ones((), device=device)) for _ in range(n)]))
        layers = tuple(i for s in sets for i in s.layers)
        prompted = PromptedViT(vit, layers)  # enables the prefixed blocks in place; inert without prefixes

        def features(inputs, sets=sets, activation=activation, gates=gates, prompted=prompted):
            index = torch.zeros(inputs.shape[0], dtype=torch.long)
            g = None if gates is None else (list(gates[0]), list(gates[1]))
            prefixes = {}
            for s in sets:
                prefixes.update(s.select(index, ["task"], activation, g))
            return prompted(inputs, prefixes=prefixes)

        run_case = dataclasses.replace(case, logits_fn=lambda m, inp, f=features: f(inp),
                                       loss_fn=lambda m, inp, lab, f=features: torch.nn.functional.cross_entropy(f(inp), lab))
        c.modules = dict(soft_mods) if masks else dict(case.originals)
        c.trainable = list(holder.parameters()) + ([p for g in gates for p in g] if gates else [])
        if masks:
            c.trainable += [m.masks["active"] for m in soft_mods.values()]
        prompt_values = sum(s.parameters_per_task() for s in sets)
        mask_values = sum(case.originals[n].weight.numel() for n in case.names) if masks else 0
        c.params = {"trainable": sum(p.numel() for p in c.trainable), "stored_per_task": prompt_values + mask_values,
                    "bytes_per_task": 4 * prompt_values + mask_values * torch.finfo(config.mask_torch_dtype).bits // 8,
                    "store_dtype": "float32" + (f" prompts, {config.mask_dtype} masks" if masks else ""), "per_layer": []}
        c.config = {"prefix_layers": list(layers), "prompt_length": sets[-1].length, "activation": activation, "masks": masks}
        c.use_steps(run_case)
    return cands
