"""The BERT model case's SAPT row: SAPT's routed LoRA (r = 4, alpha = 32) on the query and value
projections of every layer with T = 5 blocks (the fifth task's step: blocks 0-3 frozen, block 4
trains), mixed per sample by SAPT's router (max-pooled word embeddings -> trans_input -> scores
against 5 keys -> softmax), through ``softtf_kernels.ops.routed_lora`` under the default backend.

The routed layers are :class:`softtf.methods.sapt_layers.RoutedLoRALinear` (what ``softtf train
--method sapt`` installs) around the case's frozen Linears, the router
:class:`softtf.methods.sapt_router.SAPTRouter`. On the case's targets (q, v of the last 3 layers)
they are the row's modules, installed with it (the other rows put their own there); on the other
layers they are put in place when the row is built, so every row of the run sees the same model,
where they are inert: the shared :class:`Routing` is enabled only inside this row's calls, and a
disabled routed layer is its base Linear. The train step trains block 4 of
every layer, key 4 and the router's ``trans_input`` (what ``SAPTMethod.begin_task`` returns) and
backpropagates to layer 0, where the first blocks sit. Not included: the replayed inputs and the KL
term of attentive reflection (a second forward of the router on replayed inputs).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ..core.model import set_submodule
from ..methods.sapt_layers import Routing, RoutedLoRALinear, router_input
from ..methods.sapt_router import SAPTRouter
from .candidate import Candidate
from .cases import Case
from .config import SAPT_CANDIDATES, BenchConfig
from .routed import SAPT_ALPHA, SAPT_R

__all__ = ["SAPT_TASKS", "sapt_candidates"]

SAPT_TASKS = 5  # blocks (tasks learned so far, the current one included)
_NA_GID = {"status": "n/a", "reason": "Gradient ID runs on Soft-TF masks (SAPT routes by its router)"}


def sapt_candidates(case: Case, config: BenchConfig) -> list[Candidate]:
    """SAPT_CANDIDATES for the BERT model case."""
    bert = case.model
    backbone = bert.bert
    device = next(bert.parameters()).device
    torch.manual_seed(config.seed)
    routing = Routing()
    routing.enabled = False  # inert outside this row's calls
    mods: dict[str, nn.Module] = {}
    trainable: list[nn.Parameter] = []
    for i, layer in enumerate(backbone.encoder.layer):
        for proj in ("query", "value"):
            name = f"bert.encoder.layer.{i}.attention.self.{proj}"
            base = case.originals[name] if name in case.originals else bert.get_submodule(name)
            if isinstance(base, RoutedLoRALinear):  # pragma: no cover - built twice on one model
                base = base.base
            routed = RoutedLoRALinear(base, routing, SAPT_R, SAPT_ALPHA / SAPT_R)
            for t in range(SAPT_TASKS):
                a, b = routed.lora.add(device)
                if t < SAPT_TASKS - 1:  # an earlier task's block: trained (B no longer zero), frozen
                    with torch.no_grad():
                        b.normal_(0.0, 0.02)
                    routed.lora.freeze(t)
                else:
                    trainable += [a, b]
            mods[name] = routed
            if name not in case.originals:
                set_submodule(bert, name, routed)  # inert for the other rows (see the module docstring)
    router = SAPTRouter(backbone.config.hidden_size).to(device)
    for t in range(SAPT_TASKS):
        router.add_key(device)
        if t < SAPT_TASKS - 1:
            router.freeze_key(t)
    trainable += [router.keys[SAPT_TASKS - 1], *router.trans_input.parameters()]
    mods["sapt_router"] = router  # a new attribute of the model (static bytes), called by logits() only

    def logits(inputs):
        emb, mask = router_input(backbone, "bert", inputs)
        weights = router(emb.float(), mask)
        routing.enabled = True
        try:
            with routing.use(weights):
                return bert(**inputs).logits
        finally:
            routing.enabled = False

    run_case = dataclasses.replace(case, logits_fn=lambda m, inp: logits(inp),
                                   loss_fn=lambda m, inp, lab: F.cross_entropy(logits(inp), lab))
    c = Candidate(SAPT_CANDIDATES[0], f"SAPT routed LoRA q+v, T={SAPT_TASKS}", "sapt", modules=mods,
                  trainable=trainable)
    per_task = sum(SAPT_R * (m.base.in_features + m.base.out_features) for m in mods.values()
                   if isinstance(m, RoutedLoRALinear)) + router.dim
    c.params = {"trainable": sum(p.numel() for p in trainable), "stored_per_task": per_task,
                "bytes_per_task": 4 * per_task, "store_dtype": "float32", "per_layer": [],
                "note": "one LoRA block per q/v layer + one router key per task; trans_input shared"}
    c.config = {"tasks": SAPT_TASKS, "r": SAPT_R, "lora_alpha": SAPT_ALPHA, "routed_layers": len(mods) - 1,
                "note": "fifth task's step: blocks 0-3 and keys 0-3 frozen; no replay / KL term"}
    c.use_steps(run_case)
    c.results["gid"] = dict(_NA_GID)
    return [c]
