"""The cases: one linear layer (ViT qkv/proj, BERT query), a whole random-init model (ViT, BERT), or
one attention call at ViT-B/16 shapes with DualPrompt's / NoRGa's prefix (``attn_*``), or SAPT's
mixture of T LoRA blocks on one BERT-base projection (``lora_t*``), or the ViT wrapped with T frozen
tasks serving a batch of mixed tasks (``serve_t10``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.config import SoftConfig, resolve_config
from ..core.model import wrap
from .attention import ACTIVATIONS, AttentionHolder, FrozenAttention, attention_shape
from .config import ATTENTION_CASES, CASES, LAYER_CASES, LORA_CASES, SERVE_CASES, SERVE_TASKS, BenchConfig
from .routed import SAPT_ALPHA, routed_shape

__all__ = ["Case", "LayerHolder", "build_case"]


@dataclass
class Case:
    name: str
    level: str  # "layer", "model", "attention", "lora" or "serve"
    description: str
    model: nn.Module
    names: list[str]  # target modules (linear layers; the attention cases: "attn")
    originals: dict[str, nn.Module]
    inputs: Any
    train_inputs: Any
    labels: Tensor | None
    tokens: int  # tokens per call
    batch: int
    logits_fn: Callable[[nn.Module, Any], Tensor]
    loss_fn: Callable[[nn.Module, Any, Any], Tensor]
    base_params: list[nn.Parameter] = field(default_factory=list)
    wrap_used: str = ""


class LayerHolder(nn.Module):
    """Layer-level case: a model made of one linear module ``lin``."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.lin = lin

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x)


def _layer_shape(name: str, quick: bool) -> tuple[int, int]:
    if quick:
        return {"vit_qkv": (64, 192), "vit_proj": (64, 64), "bert_query": (64, 64)}[name]
    return {"vit_qkv": (768, 2304), "vit_proj": (768, 768), "bert_query": (768, 768)}[name]


def build_case(name: str, config: BenchConfig, device: torch.device) -> Case:
    torch.manual_seed(config.seed)
    if name in LAYER_CASES:
        case = _layer_case(name, config, device)
    elif name == "vit":
        case = _vit_case(config, device)
    elif name == "bert":
        case = _bert_case(config, device)
    elif name in ATTENTION_CASES:
        case = _attention_case(name, config, device)
    elif name in LORA_CASES:
        case = _routed_case(name, config, device)
    elif name in SERVE_CASES:
        case = _serve_case(name, config, device)
    else:
        raise ValueError(f"unknown case {name!r}; choose from {CASES}")
    if case.level == "model":
        case.model.requires_grad_(False)
        # the Soft-TF default targets (ViT: qkv+proj of the last 3 blocks; BERT: q/k/v of the last 3 layers)
        _, names = resolve_config(case.model, SoftConfig(modules_to_save=[]))
        case.names, case.wrap_used = list(names), "softtf.wrap"
        case.originals = {n: case.model.get_submodule(n) for n in case.names}
    case.base_params = list(case.model.parameters())
    return case


def _layer_case(name: str, config: BenchConfig, device: torch.device) -> Case:
    fin, fout = _layer_shape(name, config.quick)
    bert = name == "bert_query"
    batch = config.bert_batch if bert else config.layer_batch
    tokens = config.bert_tokens if bert else config.layer_tokens
    lin = nn.Linear(fin, fout, device=device).requires_grad_(False)
    x = torch.randn(batch, tokens, fin, device=device)
    desc = f"{'BERT query' if bert else 'ViT ' + name.split('_')[1]} layer {fin}->{fout}, x [{batch}, {tokens}, {fin}]"
    return Case(name, "layer", desc, LayerHolder(lin), ["lin"], {"lin": lin}, x, x.clone().requires_grad_(True), None,
                batch * tokens, batch, logits_fn=lambda m, inp: m(inp).mean(1),
                loss_fn=lambda m, inp, lab: m(inp).pow(2).mean(), wrap_used="SoftLinear")


def _vit_case(config: BenchConfig, device: torch.device) -> Case:
    import timm  # optional heavy dependency (softtf[models]): only the model cases need it

    if config.quick:
        from timm.models.vision_transformer import VisionTransformer

        model = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2, mlp_ratio=2.0,
                                  num_classes=10)
        desc = "tiny timm VisionTransformer (32px, patch 8, dim 64, depth 4), random init"
    else:
        model = timm.create_model("vit_base_patch16_224", pretrained=False)
        desc = "timm vit_base_patch16_224, random init"
    model = model.to(device)
    b = config.vit_batch
    img = model.patch_embed.img_size
    x = torch.randn(b, 3, img[0], img[1], device=device)
    labels = torch.randint(0, model.num_classes, (b,), device=device)
    ntok = model.patch_embed.num_patches + model.num_prefix_tokens
    return Case("vit", "model", f"{desc}, batch {b} x {ntok} tokens", model, [], {}, x, x, labels, b * ntok, b,
                logits_fn=lambda m, inp: m(inp), loss_fn=lambda m, inp, lab: F.cross_entropy(m(inp), lab))


def _bert_case(config: BenchConfig, device: torch.device) -> Case:
    # optional heavy dependency (softtf[models]): only the BERT case needs it
    from transformers import BertConfig, BertForSequenceClassification

    if config.quick:
        cfg = BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=2,
                         intermediate_size=128, max_position_embeddings=64, num_labels=10)
        desc = "tiny BERT (dim 64, 4 layers), random init"
    else:
        cfg = BertConfig(num_labels=10)
        desc = "BertForSequenceClassification(BertConfig()) (BERT-base), random init"
    model = BertForSequenceClassification(cfg).to(device)
    b, L = config.bert_batch, config.bert_tokens
    ids = torch.randint(0, model.config.vocab_size, (b, L), device=device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    labels = torch.randint(0, model.config.num_labels, (b,), device=device)
    return Case("bert", "model", f"{desc}, batch {b} x {L} tokens", model, [], {}, inputs, inputs, labels, b * L, b,
                logits_fn=lambda m, inp: m(**inp).logits,
                loss_fn=lambda m, inp, lab: F.cross_entropy(m(**inp).logits, lab))


def _attention_case(name: str, config: BenchConfig, device: torch.device) -> Case:
    """One attention call: ``qkv`` [B, N, 3, H, D] in (the train step's requires grad, as the output
    of the frozen qkv projection does when prompts sit in earlier blocks), [B, H, N, D] out."""
    b, h, n, d, p = attention_shape(config)
    activation = ACTIVATIONS[name]
    qkv = torch.randn(b, n, 3, h, d, device=device)
    floor = FrozenAttention()
    method = "DualPrompt prefix tuning" if activation == "none" else f"NoRGa gate {activation!r}"
    desc = (f"ViT-B/16 attention q, k, v [{b}, {h}, {n}, {d}] (views of one qkv output), prefix P = {p} "
            f"({method}, one [2, P, H, D] prompt expanded over the batch)")
    return Case(name, "attention", desc, AttentionHolder(floor), ["attn"], {"attn": floor}, qkv,
                qkv.clone().requires_grad_(True), None, b * n, b, logits_fn=lambda m, inp: m(inp),
                loss_fn=lambda m, inp, lab: m(inp).pow(2).mean(), wrap_used="")


def _routed_case(name: str, config: BenchConfig, device: torch.device) -> Case:
    """One frozen BERT-base projection (query / value, d -> d) with T LoRA blocks mixed per sample;
    x [B, N, d] in (the train step's requires grad: dx is one of the gradients measured)."""
    b, n, d, t, r = routed_shape(name, config)
    lin = nn.Linear(d, d, device=device).requires_grad_(False)
    x = torch.randn(b, n, d, device=device)
    desc = (f"SAPT routed LoRA on a BERT-base query/value layer {d}->{d}, x [{b}, {n}, {d}], T = {t} blocks, "
            f"r = {r}, scaling {SAPT_ALPHA}/{r}, weights [{b}, {t}]")
    return Case(name, "lora", desc, LayerHolder(lin), ["lin"], {"lin": lin}, x, x.clone().requires_grad_(True), None,
                b * n, b, logits_fn=lambda m, inp: m(inp), loss_fn=lambda m, inp, lab: m(inp).pow(2).mean(),
                wrap_used="")


def _serve_case(name: str, config: BenchConfig, device: torch.device) -> Case:
    """The ``vit`` case's model wrapped (default targets) with SERVE_TASKS frozen tasks, masks drawn
    around 1 (one seed each), and a batch of 4 x --vit-batch images whose task ids are drawn at random
    (seeded; ``labels`` holds them)."""
    vit = build_case("vit", config, device)
    model = wrap(vit.model)
    for t in range(SERVE_TASKS):
        model.add_task(f"t{t}", init=("uniform", 0.9, 1.1), seed=config.seed + t)
        model.freeze_task(f"t{t}")
    model.eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(config.seed)
    b = 4 * config.vit_batch
    x = torch.randn(b, 3, *vit.inputs.shape[-2:], generator=gen).to(device)
    ids = torch.randint(0, SERVE_TASKS, (b,), generator=gen)
    ntok = vit.tokens // vit.batch
    desc = (f"{vit.description.split(', batch')[0]} wrapped with T = {SERVE_TASKS} frozen tasks; batch {b} x {ntok} "
            f"tokens, task ids drawn at random ({len(ids.unique())} tasks present)")
    return Case(name, "serve", desc, model, list(vit.names), {n: vit.originals[n] for n in vit.names}, x, x, ids,
                b * ntok, b, logits_fn=lambda m, inp: m(inp), loss_fn=lambda m, inp, lab: m(inp).sum(),
                wrap_used="softtf.wrap")
