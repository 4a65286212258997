"""``softtf bench``: throughput and peak memory of Soft-TF against LoRA, Adapters and the eager reference.

    softtf bench [--quick] [--output DIR] [--json PATH] [--cases vit_qkv vit ...] [--device cpu]
    python -m softtf.benchmark ...                     (same thing without the CLI)

What is measured, per *case* and per *candidate*, on the current device (CUDA if present, else CPU):

tasks
  ``infer``  inference forward (``torch.no_grad``, eval mode)
  ``train``  one training step: zero_grad + forward + loss + backward + Adam step on the
             candidate's trainable parameters (train mode)
  ``gid``    Gradient-ID task inference, per-sample rule (``softtf.gradient_id(rule="sample")``) over
             ``--gid-tasks`` learned masks: superposed forward + entropy + backward to α [B, T]

cases
  layer level: ``vit_qkv`` (768->2304), ``vit_proj`` (768->768), ``bert_query`` (768->768, BERT
  sequence length); model level: ``vit`` (random-init timm ``vit_base_patch16_224``, Soft-TF on
  qkv+proj of blocks 9-11) and ``bert`` (``BertForSequenceClassification(BertConfig())`` random init,
  Soft-TF on query/key/value of layers 9-11).

candidates (on exactly the layers Soft-TF masks; all share the frozen base weights)
  ``floor``            the unmodified frozen layer/model. Its training step trains only the biases of
                       the target layers, so backward reaches the same depth as every method (the
                       least a method on these layers can cost). Its ``infer`` time is also the
                       floor of ``gid``.
  ``softtf[<b>]``      ``softtf.SoftLinear`` under each backend of ``softtf_kernels.BACKENDS``
                       (cpp, triton, cuda, reference); those that cannot run here are rows marked
                       ``skipped`` with the reason (triton on CPU only under TRITON_INTERPRET=1).
  ``eager``            ``F.linear(x, W * M, b)`` with autograd (``W * M`` materialized); its Gradient-ID
                       builds the per-sample weights ``W ⊙ Σ_t α_bt M_t`` [B, out, in] with autograd.
  ``compiled``         ``torch.compile`` of the eager ``F.linear(x, W * M, b)`` function (failures are
                       reported as the row's reason, never raised).
  ``lora[matched]``    PEFT LoRA with r = round(out*in / (out+in)) per layer (Soft-TF's trainable count)
  ``lora[small]``      PEFT LoRA with r = ``--lora-r`` (8)
  ``adapter[matched]`` bottleneck Adapter (Houlsby: down, GELU, up, residual) on the layer output with
                       the bottleneck matched to out*in parameters; ``adapter[small]``: ``--adapter-m`` (8)

Timing: every candidate is warmed up, then timed ``--repeats`` times with the candidates of a task
interleaved round-robin (rotating start), so load from other processes hits all of them alike;
the median is reported, with ratios to the floor and to ``lora[matched]`` of the same run.

Peak memory (bytes allocated during one call above what was live before it: activations saved for
backward, gradients, temporaries; weights and optimizer state are listed separately as static
bytes). CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation before the call. CPU:
allocation events of ``torch.profiler.profile(profile_memory=True)`` (every allocation and free of
the CPU allocator, in time order); the peak of their running sum. Allocations that bypass the
c10 allocator (e.g. oneDNN / OpenMP scratch) are not seen on CPU.

Output: a table on stdout, JSON (``--json``, default ``DIR/bench.json``), a PNG bar chart
(``DIR/bench.png``), the table as text (``DIR/bench.txt``) and as Markdown (``DIR/bench.md``);
progress on stderr (tqdm).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import softtf_kernels
from softtf_kernels import BACKENDS, available_backends, use_backend

from .adapters import AdapterLinear, adapter_param_count, matched_bottleneck
from .gradient_id import entropy, gradient_id
from .layer import SoftLinear
from .model import _set_submodule

__all__ = ["main", "build_parser", "run", "CASES", "CANDIDATES", "TASKS", "matched_lora_rank"]

TASKS = ("infer", "train", "gid")
LAYER_CASES = ("vit_qkv", "vit_proj", "bert_query")
MODEL_CASES = ("vit", "bert")
CASES = LAYER_CASES + MODEL_CASES
SOFT_BACKENDS = tuple(b for b in BACKENDS if b != "auto")  # cpp, cuda, triton, reference
CANDIDATES = (
    ("floor",)
    + tuple(f"softtf[{b}]" for b in SOFT_BACKENDS)
    + ("eager", "compiled", "lora[matched]", "lora[small]", "adapter[matched]", "adapter[small]")
)
FLOOR, LORA_REF, EAGER = "floor", "lora[matched]", "eager"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def matched_lora_rank(in_features: int, out_features: int) -> int:
    """LoRA rank with as many parameters (r * (in + out)) as a Soft-TF mask (out * in)."""
    return max(1, round(in_features * out_features / (in_features + out_features)))


# ====================================================================== small modules
class _Holder(nn.Module):
    """Layer-level case: a model made of one linear module ``lin``."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.lin = lin

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x)


def _eager_masked_linear(x: Tensor, weight: Tensor, mask: Tensor, bias: Tensor | None) -> Tensor:
    return F.linear(x, weight * mask, bias)


_compiled_fn: Callable | None = None


def _compiled_masked_linear(x, weight, mask, bias):
    global _compiled_fn
    if _compiled_fn is None:
        _compiled_fn = torch.compile(_eager_masked_linear)
    return _compiled_fn(x, weight, mask, bias)


class EagerMaskedLinear(nn.Module):
    """The eager reference: ``F.linear(x, W * M, b)`` (W * M materialized), autograd for everything.

    With ``alpha`` [B, T] set (Gradient ID), sample b runs with ``W ⊙ Σ_t alpha[b, t] M_t``: the
    per-sample weights [B, out, in] are materialized, which is what autograd needs for ∂/∂α per sample.
    """

    def __init__(self, base_layer: nn.Linear, frozen_masks: Tensor | None = None, compiled: bool = False):
        super().__init__()
        self.base_layer = base_layer
        w = base_layer.weight
        self.mask = nn.Parameter(torch.ones(w.shape, dtype=torch.float32 if w.dtype != torch.float64 else w.dtype, device=w.device))
        self.frozen_masks = frozen_masks
        self.compiled = compiled
        self.alpha: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        w, b = self.base_layer.weight, self.base_layer.bias
        if self.alpha is None:
            fn = _compiled_masked_linear if self.compiled else _eager_masked_linear
            return fn(x, w, self.mask.to(w.dtype), b)
        masks = self.frozen_masks.to(w.dtype)
        wb = w * torch.einsum("bt,toi->boi", self.alpha.to(w.dtype), masks)  # [B, out, in]
        xb = x.reshape(x.shape[0], -1, x.shape[-1])
        y = torch.bmm(xb, wb.transpose(1, 2))
        if b is not None:
            y = y + b
        return y.reshape(*x.shape[:-1], w.shape[0])


# ====================================================================== memory
def cpu_allocation_profile(fn: Callable[[], Any]) -> tuple[int, int]:
    """(peak, largest single allocation) in bytes of CPU memory allocated by fn(): the peak of
    live bytes the call allocated and has not yet freed (torch.profiler allocation events, in time
    order, including allocations inside C++ kernels). Frees of blocks allocated before the call
    are ignored, so the peak is the high-water mark of what the call itself allocated."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events: list[tuple[int, int, int]] = []  # (time, signed bytes, ptr)
    try:  # raw allocation records: every allocation and free of the CPU allocator
        def walk(nodes):
            for n in nodes:
                if str(n.tag).endswith("Allocation"):
                    ef = n.extra_fields
                    if str(getattr(ef, "device", "cpu")).startswith("cpu"):
                        events.append((n.start_time_ns, int(ef.alloc_size), int(ef.ptr)))
                walk(n.children)

        walk(prof.profiler.kineto_results.experimental_event_tree())
    except Exception:  # pragma: no cover - other profiler layouts: op-level self memory, no pointers
        events = [(e.time_range.start, int(e.self_cpu_memory_usage), -1 - i)
                  for i, e in enumerate(prof.events()) if e.self_cpu_memory_usage]
    events.sort(key=lambda e: e[0])
    live: dict[int, int] = {}
    cur = peak = largest = 0
    for _, b, ptr in events:
        if b > 0:
            live[ptr] = live.get(ptr, 0) + b
            cur += b
            largest = max(largest, b)
        elif ptr in live:  # a free of something this call allocated
            cur -= live.pop(ptr)
        peak = max(peak, cur)
    return peak, largest


def measure_peak_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    return cpu_allocation_profile(fn)[0]


def _tensor_bytes(ts: Sequence[Tensor], exclude: set[int] = frozenset()) -> int:
    seen, total = set(exclude), 0
    for t in ts:
        if t is None or not isinstance(t, Tensor) or t.numel() == 0:
            continue
        key = t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


# ====================================================================== cases and candidates
@dataclass
class Case:
    name: str
    level: str
    description: str
    model: nn.Module
    names: list[str]  # target linear modules
    originals: dict[str, nn.Linear]
    inputs: Any
    train_inputs: Any
    labels: Tensor | None
    tokens: int  # tokens per call
    batch: int
    logits_fn: Callable[[nn.Module, Any], Tensor]
    loss_fn: Callable[[nn.Module, Any, Any], Tensor]
    base_params: list[nn.Parameter] = field(default_factory=list)
    wrap_used: str = ""


@dataclass
class Cand:
    key: str
    label: str
    kind: str
    modules: dict[str, nn.Module] = field(default_factory=dict)
    trainable: list[nn.Parameter] = field(default_factory=list)
    backend: str | None = None
    config: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    fns: dict[str, Callable[[], Any]] = field(default_factory=dict)
    results: dict[str, dict] = field(default_factory=dict)
    static_bytes: int = 0
    opt: torch.optim.Optimizer | None = None


def install(case: Case, cand: Cand) -> None:
    for name, mod in cand.modules.items():
        _set_submodule(case.model, name, mod)
    for p in case.base_params:
        p.requires_grad_(False)
    for p in cand.trainable:
        p.requires_grad_(True)


def _soft_params(case: Case, mask_dtype: torch.dtype) -> dict:
    per = []
    for n in case.names:
        lin = case.originals[n]
        o, i = lin.out_features, lin.in_features
        per.append({"name": n, "in": i, "out": o, "trainable": o * i, "stored_per_task": o * i,
                    "bytes_per_task": o * i * torch.finfo(mask_dtype).bits // 8})
    return _sum_params(per, str(mask_dtype).removeprefix("torch."))


def _sum_params(per: list[dict], store_dtype: str) -> dict:
    return {
        "trainable": sum(p["trainable"] for p in per),
        "stored_per_task": sum(p["stored_per_task"] for p in per),
        "bytes_per_task": sum(p["bytes_per_task"] for p in per),
        "store_dtype": store_dtype,
        "per_layer": per,
    }


def _optimizer(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-4)


def _make_train_fn(case: Case, cand: Cand) -> Callable[[], Any]:
    def step():
        if cand.opt is None:
            cand.opt = _optimizer(cand.trainable)
        cand.opt.zero_grad(set_to_none=True)
        x = case.train_inputs
        if isinstance(x, Tensor) and x.requires_grad:
            x.grad = None
        case.model.train()
        loss = case.loss_fn(case.model, x, case.labels)
        loss.backward()
        cand.opt.step()
        return loss

    return step


def _make_infer_fn(case: Case, cand: Cand, backend: str | None = None) -> Callable[[], Any]:
    def infer():
        case.model.eval()
        ctx = use_backend(backend) if backend else contextlib.nullcontext()
        with ctx, torch.no_grad():
            return case.logits_fn(case.model, case.inputs)

    return infer


def build_candidates(case: Case, args, device: torch.device, progress) -> list[Cand]:
    """Every candidate of CANDIDATES for this case (those that cannot run carry a skipped/failed status)."""
    mask_dtype = _DTYPES[args.mask_dtype]
    T = args.gid_tasks
    cands: list[Cand] = []
    soft_p = _soft_params(case, mask_dtype)
    na_gid = {"status": "n/a", "reason": "Gradient ID needs per-task soft masks (Soft-TF only)"}

    # ---- floor
    floor = Cand(FLOOR, "frozen (floor)", "floor", modules=dict(case.originals),
                 trainable=[case.originals[n].bias for n in case.names if case.originals[n].bias is not None])
    floor.params = _sum_params([{"name": n, "in": case.originals[n].in_features, "out": case.originals[n].out_features,
                                 "trainable": 0, "stored_per_task": 0, "bytes_per_task": 0} for n in case.names], "-")
    floor.config = {"note": "train step trains only the target layers' biases (backward to the same depth)"}
    floor.fns = {"infer": _make_infer_fn(case, floor), "train": _make_train_fn(case, floor)}
    floor.results["gid"] = {"status": "n/a", "reason": "floor of gid = floor infer (ratio_floor of gid uses it)"}
    cands.append(floor)
    install(case, floor)

    # ---- Soft-TF: one set of SoftLinear modules (via softtf.wrap when it works), every backend
    soft_mods: dict[str, SoftLinear] = {}
    try:
        soft_mods = _soft_modules(case, args, mask_dtype)
    except Exception as exc:  # pragma: no cover - reported, not raised
        soft_reason = "building SoftLinear failed: " + _fail(exc)["reason"]
    else:
        soft_reason = ""
    frozen_names = [f"t{k}" for k in range(T)]
    here = available_backends(device)
    for b in SOFT_BACKENDS:
        c = Cand(f"softtf[{b}]", f"SoftLinear [{b}]", "softtf", backend=b, params=soft_p,
                 config={"backend": b, "mask_dtype": args.mask_dtype, "gid_tasks": T})
        cands.append(c)
        reason = soft_reason
        if not reason and b not in here:
            if b == "triton" and device.type == "cpu":
                reason = "triton on CPU runs only under TRITON_INTERPRET=1 (interpreter, not a performance number)"
            elif b == "cuda" and device.type != "cuda":
                reason = "no CUDA device"
            elif b == "cpp" and device.type != "cpu":
                reason = "C++ CPU kernel runs CPU tensors only"
            else:
                reason = f"backend {b!r} unavailable on {device.type} (available: {here})"
        if reason:
            for t in TASKS:
                c.results[t] = {"status": "skipped" if not soft_reason else "failed", "reason": reason}
            continue
        if b == "triton" and device.type == "cpu":
            c.label += " (interpreter)"
        c.modules = dict(soft_mods)
        c.trainable = [m.masks["active"] for m in soft_mods.values()]
        c.fns = {"infer": _make_infer_fn(case, c, b), "train": _with_backend(_make_train_fn(case, c), b),
                 "gid": _soft_gid_fn(case, b, frozen_names)}

    # ---- eager reference and torch.compile of it
    for key, compiled in ((EAGER, False), ("compiled", True)):
        label = "eager F.linear(x, W*M)" if not compiled else "torch.compile(eager)"
        c = Cand(key, label, key, params=soft_p, config={"compiled": compiled})
        cands.append(c)
        if compiled and not args.compile:
            for t in TASKS:
                c.results[t] = {"status": "skipped", "reason": "torch.compile rows off (--no-compile, or --quick without --compile)"}
            continue
        mods = {n: EagerMaskedLinear(case.originals[n], soft_mods[n].frozen_masks if soft_mods else None, compiled)
                for n in case.names}
        c.modules = mods
        c.trainable = [m.mask for m in mods.values()]
        c.fns = {"infer": _make_infer_fn(case, c), "train": _make_train_fn(case, c)}
        if compiled:
            c.results["gid"] = {"status": "skipped", "reason": "compile of the per-sample superposed eager path not attempted (compile time)"}
        elif soft_mods:
            c.fns["gid"] = _eager_gid_fn(case, list(mods.values()), T)
        else:
            c.results["gid"] = {"status": "failed", "reason": soft_reason}

    # ---- LoRA through PEFT
    for key, rank in ((LORA_REF, None), ("lora[small]", args.lora_r)):
        ranks = {n: (matched_lora_rank(case.originals[n].in_features, case.originals[n].out_features) if rank is None else rank)
                 for n in case.names}
        c = Cand(key, f"LoRA (PEFT) r={_ranks_text(ranks)}", "lora", config={"ranks": ranks})
        c.params = _sum_params([{"name": n, "in": case.originals[n].in_features, "out": case.originals[n].out_features,
                                 "trainable": r * (case.originals[n].in_features + case.originals[n].out_features),
                                 "stored_per_task": r * (case.originals[n].in_features + case.originals[n].out_features),
                                 "bytes_per_task": 4 * r * (case.originals[n].in_features + case.originals[n].out_features)}
                                for n, r in ranks.items()], "float32")
        cands.append(c)
        try:
            c.modules, c.trainable = _lora_modules(case, ranks, adapter_name=key.split("[")[1].rstrip("]"))
            c.config["peft"] = _version("peft")
        except Exception as exc:
            for t in ("infer", "train"):
                c.results[t] = {"status": "failed", "reason": "PEFT LoRA: " + _fail(exc)["reason"]}
        else:
            c.fns = {"infer": _make_infer_fn(case, c), "train": _make_train_fn(case, c)}
        c.results["gid"] = dict(na_gid)
        install(case, floor)

    # ---- bottleneck Adapters
    for key, m in (("adapter[matched]", None), ("adapter[small]", args.adapter_m)):
        ms = {n: (matched_bottleneck(case.originals[n].in_features, case.originals[n].out_features) if m is None else m)
              for n in case.names}
        mods = {n: AdapterLinear(case.originals[n], ms[n]) for n in case.names}
        for n in case.names:
            case.originals[n].requires_grad_(False)
        c = Cand(key, f"Adapter m={_ranks_text(ms)}", "adapter", modules=mods,
                 trainable=[p for mod in mods.values() for p in mod.adapter.parameters()], config={"bottleneck": ms})
        c.params = _sum_params([{"name": n, "in": case.originals[n].in_features, "out": case.originals[n].out_features,
                                 "trainable": adapter_param_count(case.originals[n].out_features, b),
                                 "stored_per_task": adapter_param_count(case.originals[n].out_features, b),
                                 "bytes_per_task": 4 * adapter_param_count(case.originals[n].out_features, b)}
                                for n, b in ms.items()], "float32")
        c.fns = {"infer": _make_infer_fn(case, c), "train": _make_train_fn(case, c)}
        c.results["gid"] = dict(na_gid)
        cands.append(c)
    install(case, floor)
    if getattr(args, "candidates", None):
        keep = set(args.candidates) | {FLOOR, LORA_REF}
        for c in cands:
            if c.key not in keep:
                c.fns = {}
                for t in TASKS:
                    c.results.setdefault(t, {"status": "skipped", "reason": "not selected (--candidates)"})

    # static bytes owned by each candidate (not the shared base model); optimizer state added later
    base_ptrs = {p.untyped_storage().data_ptr() for p in case.base_params}
    for c in cands:
        ts = [t for mod in c.modules.values() for t in list(mod.parameters()) + list(mod.buffers())]
        ts += [mod.frozen_masks for mod in c.modules.values() if isinstance(getattr(mod, "frozen_masks", None), Tensor)]
        c.static_bytes = _tensor_bytes(ts, base_ptrs)
    return cands


def _ranks_text(ranks: dict[str, int]) -> str:
    vals = list(dict.fromkeys(ranks.values()))
    return "/".join(str(v) for v in vals)


def _with_backend(fn: Callable[[], Any], backend: str) -> Callable[[], Any]:
    def run():
        with use_backend(backend):
            return fn()

    return run


def _soft_modules(case: Case, args, mask_dtype: torch.dtype) -> dict[str, SoftLinear]:
    """SoftLinear on the case's target names, T frozen tasks + one trainable task ``train``."""
    mods: dict[str, SoftLinear] = {}
    if case.level == "model" and case.wrap_used == "softtf.wrap":
        from .config import SoftConfig
        from .model import wrap

        try:
            wrapped = wrap(case.model, SoftConfig(mask_dtype=mask_dtype, modules_to_save=[]))
            mods = dict(wrapped.soft_layers)
        finally:  # back to the plain layers; candidates are installed on demand
            for n in case.names:
                _set_submodule(case.model, n, case.originals[n])
        if list(mods) != case.names:
            raise RuntimeError(f"softtf.wrap chose {list(mods)}, expected {case.names}")
    else:
        mods = {n: SoftLinear(case.originals[n], mask_dtype=mask_dtype) for n in case.names}
    gen = torch.Generator(device=case.originals[case.names[0]].weight.device)
    gen.manual_seed(args.seed)
    for layer in mods.values():
        for k in range(args.gid_tasks):
            layer.add_task(f"t{k}", init=("uniform", 0.5, 1.5), generator=gen)
            layer.freeze_task(f"t{k}")
        layer.add_task("active", init="ones")
    return mods


def _soft_gid_fn(case: Case, backend: str, tasks: list[str]) -> Callable[[], Any]:
    def gid():
        case.model.eval()
        with use_backend(backend):
            return gradient_id(case.model, case.inputs, forward_fn=lambda inp: case.logits_fn(case.model, inp),
                               tasks=tasks, rule="sample").task_index

    return gid


def _eager_gid_fn(case: Case, mods: list[EagerMaskedLinear], T: int) -> Callable[[], Any]:
    def gid():
        case.model.eval()
        dev = mods[0].base_layer.weight.device
        alpha = torch.full((case.batch, T), 1.0 / T, device=dev, requires_grad=True)
        for m in mods:
            m.alpha = alpha
        try:
            with torch.enable_grad():
                h = entropy(case.logits_fn(case.model, case.inputs)).sum()
                (g,) = torch.autograd.grad(h, alpha)
        finally:
            for m in mods:
                m.alpha = None
        return g.argmin(1)

    return gid


def _lora_modules(case: Case, ranks: dict[str, int], adapter_name: str):
    import peft

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
        _set_submodule(case.model, n, case.originals[n])
    return mods, trainable


# ---------------------------------------------------------------------- case builders
def _shapes(args) -> dict:
    if args.quick:
        return {"vit_qkv": (64, 192), "vit_proj": (64, 64), "bert_query": (64, 64)}
    return {"vit_qkv": (768, 2304), "vit_proj": (768, 768), "bert_query": (768, 768)}


def build_case(name: str, args, device: torch.device) -> Case:
    torch.manual_seed(args.seed)
    if name in LAYER_CASES:
        fin, fout = _shapes(args)[name]
        bert = name == "bert_query"
        batch = args.bert_batch if bert else args.layer_batch
        tokens = args.bert_tokens if bert else args.layer_tokens
        lin = nn.Linear(fin, fout, device=device).requires_grad_(False)
        model = _Holder(lin)
        x = torch.randn(batch, tokens, fin, device=device)
        desc = f"{'BERT query' if bert else 'ViT ' + name.split('_')[1]} layer {fin}->{fout}, x [{batch}, {tokens}, {fin}]"
        case = Case(name, "layer", desc, model, ["lin"], {"lin": lin}, x, x.clone().requires_grad_(True), None,
                    batch * tokens, batch, logits_fn=lambda m, inp: m(inp).mean(1),
                    loss_fn=lambda m, inp, lab: m(inp).pow(2).mean())
        case.wrap_used = "SoftLinear"
    elif name == "vit":
        model, desc = _vit(args, device)
        b = args.vit_batch
        img = model.patch_embed.img_size
        x = torch.randn(b, 3, img[0], img[1], device=device)
        labels = torch.randint(0, model.num_classes, (b,), device=device)
        ntok = model.patch_embed.num_patches + model.num_prefix_tokens
        case = Case(name, "model", f"{desc}, batch {b} x {ntok} tokens", model, [], {}, x, x, labels, b * ntok, b,
                    logits_fn=lambda m, inp: m(inp), loss_fn=lambda m, inp, lab: F.cross_entropy(m(inp), lab))
    elif name == "bert":
        model, desc = _bert(args, device)
        b, L = args.bert_batch, args.bert_tokens
        ids = torch.randint(0, model.config.vocab_size, (b, L), device=device)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        labels = torch.randint(0, model.config.num_labels, (b,), device=device)
        case = Case(name, "model", f"{desc}, batch {b} x {L} tokens", model, [], {}, inputs, inputs, labels, b * L, b,
                    logits_fn=lambda m, inp: m(**inp).logits,
                    loss_fn=lambda m, inp, lab: F.cross_entropy(m(**inp).logits, lab))
    else:
        raise ValueError(f"unknown case {name!r}; choose from {CASES}")
    if case.level == "model":
        case.model.requires_grad_(False)
        case.names, case.wrap_used = _target_names(case.model, name)
        case.originals = {n: case.model.get_submodule(n) for n in case.names}
    case.base_params = list(case.model.parameters())
    return case


def _vit(args, device):
    import timm

    if args.quick:
        from timm.models.vision_transformer import VisionTransformer

        m = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2, mlp_ratio=2.0, num_classes=10)
        desc = "tiny timm VisionTransformer (32px, patch 8, dim 64, depth 4), random init"
    else:
        m = timm.create_model("vit_base_patch16_224", pretrained=False)
        desc = "timm vit_base_patch16_224, random init"
    return m.to(device), desc


def _bert(args, device):
    from transformers import BertConfig, BertForSequenceClassification

    if args.quick:
        cfg = BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=2,
                         intermediate_size=128, max_position_embeddings=64, num_labels=10)
        desc = "tiny BERT (dim 64, 4 layers), random init"
    else:
        cfg = BertConfig(num_labels=10)
        desc = "BertForSequenceClassification(BertConfig()) (BERT-base), random init"
    return BertForSequenceClassification(cfg).to(device), desc


def _target_names(model: nn.Module, arch: str) -> tuple[list[str], str]:
    """The Soft-TF default targets (ViT: qkv+proj of the last 3 blocks; BERT: q/k/v of the last 3
    layers), resolved by softtf.config when it is importable, else by name."""
    try:
        from .config import SoftConfig, resolve_config
        from .model import wrap  # noqa: F401  (wrap is used for the SoftLinear candidates)

        _, names = resolve_config(model, SoftConfig(modules_to_save=[]))
        return list(names), "softtf.wrap"
    except ImportError:
        pass
    if arch == "vit":
        n = len(model.blocks)
        return [f"blocks.{i}.attn.{p}" for i in range(n - 3, n) for p in ("qkv", "proj")], "manual SoftLinear swap"
    n = model.config.num_hidden_layers
    return [f"bert.encoder.layer.{i}.attention.self.{p}" for i in range(n - 3, n) for p in ("query", "key", "value")], \
        "manual SoftLinear swap"


# ====================================================================== timing harness
class _NoBar:
    def update(self, n=1):
        pass

    def set_description(self, text):
        pass


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fail(exc: BaseException) -> dict:
    msg = str(exc).strip().splitlines()
    return {"status": "failed", "reason": f"{type(exc).__name__}: {msg[0] if msg else ''}"[:300]}


def measure_case(case: Case, cands: list[Cand], args, device: torch.device, pbar) -> None:
    if pbar is None:
        pbar = _NoBar()
    warmup, repeats = (args.warmup, args.repeats) if case.level == "layer" else (args.model_warmup, args.model_repeats)
    for task in TASKS:
        runnable = [c for c in cands if task in c.fns and task not in c.results]
        times: dict[str, list[float]] = {c.key: [] for c in runnable}
        # warm-up (the first call also compiles, creates optimizer state, primes oneDNN)
        for c in runnable:
            for _ in range(warmup):
                if task in c.results:
                    break
                pbar.set_description(f"{case.name} {task} warmup {c.key}")
                try:
                    install(case, c)
                    c.fns[task]()
                except Exception as exc:
                    c.results[task] = _fail(exc)
                pbar.update(1)
        # peak memory: one profiled call each
        for c in runnable:
            if task in c.results:
                pbar.update(1)
                continue
            pbar.set_description(f"{case.name} {task} memory {c.key}")
            try:
                install(case, c)
                # gradients of the previous step are dropped before, not inside, the measured call
                if c.opt is not None:
                    c.opt.zero_grad(set_to_none=True)
                if isinstance(case.train_inputs, Tensor):
                    case.train_inputs.grad = None
                c.results.setdefault("_mem", {})[task] = measure_peak_bytes(c.fns[task], device)
            except Exception as exc:
                c.results[task] = _fail(exc)
            pbar.update(1)
        # timed rounds, candidates interleaved round-robin with a rotating start
        for r in range(repeats):
            alive = [c for c in runnable if task not in c.results]
            k = r % max(1, len(alive))
            for c in alive[k:] + alive[:k]:
                pbar.set_description(f"{case.name} {task} round {r + 1}/{repeats}")
                try:
                    install(case, c)
                    _sync(device)
                    t0 = time.perf_counter()
                    c.fns[task]()
                    _sync(device)
                    times[c.key].append((time.perf_counter() - t0) * 1e3)
                except Exception as exc:
                    c.results[task] = _fail(exc)
                pbar.update(1)
            pbar.update(len(runnable) - len(alive))
        for c in runnable:
            if task in c.results:
                continue
            ts = times[c.key]
            med = statistics.median(ts)
            c.results[task] = {"status": "ok", "median_ms": med, "min_ms": min(ts), "times_ms": ts,
                               "tokens_per_s": case.tokens / (med / 1e3), "peak_bytes": c.results.get("_mem", {}).get(task)}
    floor = next(c for c in cands if c.key == FLOOR)
    install(case, floor)
    for c in cands:
        c.results.pop("_mem", None)
        if c.opt is not None:
            c.static_bytes += _tensor_bytes([t for st in c.opt.state.values() for t in st.values() if isinstance(t, Tensor)])
            c.opt = None  # free optimizer state before the next case


def add_ratios(cands: list[Cand], stat: str = "median") -> None:
    """ratio_floor / ratio_lora from the ``stat`` ("median" or "min") of each candidate's times;
    the ratios of the other statistic are kept too (``ratio_floor_min`` / ``ratio_floor_median``...)."""
    by = {c.key: c for c in cands}
    for other in ("median", "min"):
        for c in cands:
            for task in TASKS:
                r = c.results.get(task)
                if r and r.get("status") == "ok":
                    f = _stat_ms(by, FLOOR, "infer" if task == "gid" else task, other)
                    lo = _stat_ms(by, LORA_REF, task, other)
                    r[f"ratio_floor_{other}"] = r[f"{other}_ms"] / f if f else None
                    r[f"ratio_lora_{other}"] = r[f"{other}_ms"] / lo if lo else None
    key_ms = f"{stat}_ms"

    def ms(key, task):
        return _stat_ms(by, key, task, stat)

    def peak(key, task):
        r = by.get(key).results.get(task, {}) if key in by else {}
        return r.get("peak_bytes") if r.get("status") == "ok" else None

    for c in cands:
        for task in TASKS:
            r = c.results.get(task)
            if not r or r.get("status") != "ok":
                continue
            f = ms(FLOOR, "infer" if task == "gid" else task)
            lo = ms(LORA_REF, task)
            r["ratio_floor"] = r[key_ms] / f if f else None
            r["ratio_lora"] = r[key_ms] / lo if lo else None
            pe, pm = peak(EAGER, task), r.get("peak_bytes")
            r["peak_ratio_eager"] = pm / pe if (pe and pm is not None) else None


def _stat_ms(by: dict, key: str, task: str, stat: str):
    r = by[key].results.get(task, {}) if key in by else {}
    return r.get(f"{stat}_ms") if r.get("status") == "ok" else None


# ====================================================================== output
def _mib(b) -> str:
    return "-" if b is None else f"{b / 2**20:.1f}"


def _num(v, fmt="{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def _cell(r: dict | None, kind: str) -> str:
    if not r:
        return "-"
    if r.get("status") != "ok":
        return {"n/a": "n/a", "skipped": "skip", "failed": "FAIL"}.get(r.get("status"), "?")
    if kind == "tps":
        return f"{r['tokens_per_s']:.0f}"
    if kind == "ms":
        v = r[_STAT + "_ms"]
        return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 1000 else f"{v:.0f}"
    return _num(r.get(kind))


def _params_text(n: int) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}k"
    return str(n)


_STAT = "median"


def format_table(result: dict) -> str:
    global _STAT
    lines = []
    meta = result["meta"]
    _STAT = meta["args"].get("stat", "median")
    lines.append(f"softtf bench  device: {meta['device_name']}  torch {meta['versions']['torch']}  "
                 f"threads {meta['threads']}  load avg {meta['loadavg_start']} -> {meta['loadavg_end']}")
    lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()))
    lines.append(f"times: {_STAT} of the timed calls (ms); x floor = time / frozen layer-model time (gid: / floor infer); "
                 "x LoRA = time / LoRA(matched) time, same task, same run. peak = MiB allocated during one train step above "
                 "the live level before it; static = candidate-owned tensors (trainable + stored task masks + Adam state).")
    hdr = (f"{'candidate':<28} {'infer ms':>9} {'x floor':>7} {'x LoRA':>6} | {'train ms':>9} {'x floor':>7} "
           f"{'x LoRA':>6} {'peak MiB':>8} {'x eager':>7} | {'gid ms':>8} {'x fl.fwd':>8} | "
           f"{'trainable':>9} {'MiB/task':>8} {'static MiB':>10}")
    for case in result["cases"]:
        lines.append("")
        lines.append(f"== {case['case']} ({case['level']}): {case['description']}; {case['tokens']} tokens/call; "
                     f"targets: {case['targets_text']}")
        lines.append(hdr)
        lines.append("-" * len(hdr))
        for row in case["rows"]:
            t = row["tasks"]
            i, tr, g = t.get("infer"), t.get("train"), t.get("gid")
            p = row["params"]
            lines.append(
                f"{row['label'][:28]:<28} {_cell(i, 'ms'):>9} {_cell(i, 'ratio_floor'):>7} {_cell(i, 'ratio_lora'):>6} | "
                f"{_cell(tr, 'ms'):>9} {_cell(tr, 'ratio_floor'):>7} {_cell(tr, 'ratio_lora'):>6} "
                f"{(_mib(tr.get('peak_bytes')) if tr and tr.get('status') == 'ok' else '-'):>8} "
                f"{_cell(tr, 'peak_ratio_eager'):>7} | {_cell(g, 'ms'):>8} {_cell(g, 'ratio_floor'):>8} | "
                f"{_params_text(p.get('trainable', 0)):>9} {p.get('bytes_per_task', 0) / 2**20:>8.2f} "
                f"{row['static_bytes'] / 2**20:>10.1f}")
        notes = [f"  {row['key']}: {task}: {r['status']} ({r.get('reason', '')})" for row in case["rows"]
                 for task, r in row["tasks"].items() if r.get("status") in ("failed", "skipped")]
        if notes:
            lines.append("notes:")
            seen = set()
            for n in notes:
                if n not in seen:
                    lines.append(n)
                    seen.add(n)
    lines.append("")
    lines.append(f"targets (model level, softtf[{meta['default_backend']}], same run; reported, not asserted):")
    lines.extend("  " + t for t in result.get("targets_text", []))
    return "\n".join(lines)


def format_markdown(result: dict) -> str:
    """The table as Markdown (written to OUTPUT/bench.md; bench/README.md shows one)."""
    global _STAT
    meta = result["meta"]
    _STAT = meta["args"].get("stat", "median")
    out = [f"Device: {meta['device_name']}; torch {meta['versions']['torch']}, timm {meta['versions']['timm']}, "
           f"transformers {meta['versions']['transformers']}, peft {meta['versions']['peft']}; "
           f"load average {meta['loadavg_start']} -> {meta['loadavg_end']}; {meta['date']}.", ""]
    for case in result["cases"]:
        out.append(f"**{case['case']}** ({case['level']}): {case['description']}; {case['tokens']} tokens per call; "
                   f"Soft-TF on {case['targets_text']}")
        out.append("")
        out.append(f"| candidate | infer ms | ×floor | ×LoRA | train ms | ×floor | ×LoRA | train peak MiB | ×eager "
                   f"| GID ms | ×floor fwd | trainable | MiB/task |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for row in case["rows"]:
            t = row["tasks"]
            if all(r.get("status") in ("skipped", "failed") for r in t.values()):
                continue
            i, tr, g = t.get("infer"), t.get("train"), t.get("gid")
            p = row["params"]
            peak = _mib(tr.get("peak_bytes")) if tr and tr.get("status") == "ok" else "-"
            out.append(f"| {row['label']} | {_cell(i, 'ms')} | {_cell(i, 'ratio_floor')} | {_cell(i, 'ratio_lora')} | "
                       f"{_cell(tr, 'ms')} | {_cell(tr, 'ratio_floor')} | {_cell(tr, 'ratio_lora')} | {peak} | "
                       f"{_cell(tr, 'peak_ratio_eager')} | {_cell(g, 'ms')} | {_cell(g, 'ratio_floor')} | "
                       f"{_params_text(p.get('trainable', 0))} | {p.get('bytes_per_task', 0) / 2**20:.2f} |")
        skipped = sorted({f"{row['key']} ({r.get('reason')})" for row in case["rows"] for r in row["tasks"].values()
                          if r.get("status") in ("skipped", "failed")})
        if skipped:
            out.append("")
            out.append("Not run: " + "; ".join(skipped) + ".")
        out.append("")
    out.append(f"Targets (model level, softtf[{meta['default_backend']}], same run):")
    out.append("")
    out.extend(f"- {t}" for t in result.get("targets_text", []))
    return "\n".join(out) + "\n"


def targets(result: dict) -> tuple[list[dict], list[str]]:
    """The issue's CPU targets, reported (never asserted), for the default backend at model level.
    Time targets are given from the median (the table's statistic) and from the minimum of the
    timed calls; on a loaded machine the minimum is the less noisy of the two."""
    out, text = [], []
    soft_key = f"softtf[{result['meta']['default_backend']}]"
    for case in result["cases"]:
        if case["level"] != "model":
            continue
        rows = {r["key"]: r for r in case["rows"]}
        s = rows.get(soft_key, {}).get("tasks", {})
        tr, inf = s.get("train", {}), s.get("infer", {})
        chk = [("train <= 1.2x LoRA(matched)", tr, "ratio_lora", 1.2),
               ("infer <= 1.15x floor", inf, "ratio_floor", 1.15),
               ("train peak memory < eager", tr, "peak_ratio_eager", 1.0)]
        for name, r, key, lim in chk:
            v = r.get(key)
            vmin = r.get(key + "_min") if key != "peak_ratio_eager" else None
            met = None if v is None else (v <= lim if "<=" in name else v < lim)
            out.append({"case": case["case"], "candidate": soft_key, "target": name, "value": v, "value_min": vmin,
                        "limit": lim, "met": met})
            extra = f" (min-based {vmin:.2f})" if vmin is not None else ""
            text.append(f"{case['case']} {name}: {_num(v)}{extra} -> "
                        f"{'met' if met else 'MISSED' if met is not None else 'n/a'}")
    return out, text


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    cases = result["cases"]
    fig, axes = plt.subplots(len(cases), 1, figsize=(11, 3.2 * len(cases)), squeeze=False)
    colors = {"infer": "#4C72B0", "train": "#DD8452", "gid": "#55A868"}
    for ax, case in zip(axes[:, 0], cases):
        rows = [r for r in case["rows"] if any(t.get("status") == "ok" for t in r["tasks"].values())]
        ys = range(len(rows))
        h = 0.27
        vmax = 1.0
        for j, task in enumerate(TASKS):
            vals = [(r["tasks"].get(task) or {}).get("ratio_floor") or 0.0 for r in rows]
            vmax = max([vmax] + vals)
            ax.barh([y + (j - 1) * h for y in ys], vals, height=h, color=colors[task],
                    label=f"{task} (x floor{' fwd' if task == 'gid' else ''})")
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_yticks(list(ys))
        ax.set_yticklabels([r["label"] for r in rows], fontsize=8)
        ax.invert_yaxis()
        if vmax > 12:
            ax.set_xscale("log")
        ax.set_title(f"{case['case']}: {case['description']}", fontsize=9)
        ax.set_xlabel("time / frozen floor (same run; lower is better)", fontsize=8)
        ax.legend(fontsize=7, loc="lower right")
    meta = result["meta"]
    fig.suptitle(f"softtf bench on {meta['device_name']}, torch {meta['versions']['torch']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ====================================================================== meta
def _version(mod: str) -> str | None:
    try:
        m = __import__(mod)
        return getattr(m, "__version__", "?")
    except Exception:
        return None


def _loadavg() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:  # pragma: no cover
        return "?"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"CPU {cpu} ({os.cpu_count()} cores visible, {torch.get_num_threads()} torch threads)"


def _meta(args, device: torch.device) -> dict:
    import softtf

    versions = {"softtf": softtf.__version__, "torch": torch.__version__, "python": platform.python_version()}
    for m in ("timm", "transformers", "peft", "numpy", "triton"):
        versions[m] = _version(m)
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": str(device), "device_name": _device_name(device), "threads": torch.get_num_threads(),
        "platform": platform.platform(), "versions": versions, "loadavg_start": _loadavg(),
        "default_backend": softtf_kernels.backend.resolve("masked_linear", device)[0]
        if softtf_kernels.get_backend() == "auto" else softtf_kernels.get_backend(),
        "available_backends": available_backends(device),
        "args": {k: v for k, v in vars(args).items()},
        "timing": "warmup, then the median of repeats; candidates interleaved round-robin per task",
        "memory": ("cuda max_memory_allocated - allocated before the call" if device.type == "cuda" else
                   "CPU: peak running sum of torch.profiler allocation events (profile_memory=True) during one call"),
    }


# ====================================================================== pytest-benchmark suites
_suite_cache: dict[str, tuple] = {}


def suite_candidates(name: str, quick: bool = False) -> tuple[Case, dict[str, Cand]]:
    """(case, {key: candidate}) for the pytest-benchmark suites in bench/, built once per process
    (one case alive at a time), with the default arguments of ``softtf bench`` (``--quick`` shapes
    if ``quick``) and torch.compile off."""
    if name not in _suite_cache:
        _suite_cache.clear()
        args = build_parser().parse_args(["--no-compile", "--no-progress"] + (["--quick"] if quick else []))
        _fill_defaults(args)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        case = build_case(name, args, device)
        _suite_cache[name] = (case, {c.key: c for c in build_candidates(case, args, device, None)})
    return _suite_cache[name]


def suite_run(benchmark, name: str, key: str, task: str, rounds: int, warmup: int, quick: bool = False) -> str | None:
    """Time candidate ``key`` on ``task`` of case ``name`` with a pytest-benchmark fixture (setup installs
    the candidate before every round). Returns a skip reason instead when the row cannot run here."""
    case, cands = suite_candidates(name, quick)
    cand = cands[key]
    if task not in cand.fns:
        r = cand.results.get(task, {})
        return f"{key} {task}: {r.get('status', 'n/a')} ({r.get('reason', 'not applicable')})"
    benchmark.group = f"{name} {task}"
    benchmark.extra_info.update({"tokens_per_call": case.tokens, "label": cand.label,
                                 "trainable": cand.params.get("trainable"), "bytes_per_task": cand.params.get("bytes_per_task")})
    benchmark.pedantic(cand.fns[task], setup=lambda: install(case, cand), rounds=rounds, warmup_rounds=warmup, iterations=1)
    return None


# ====================================================================== entry points
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="softtf bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Ratios, not seconds, are the result: they are measured in one run.")
    p.add_argument("--quick", action="store_true", help="CI smoke test: tiny shapes and models, few iterations")
    p.add_argument("--output", default="bench_results", help="directory for bench.json, bench.png, bench.txt")
    p.add_argument("--json", default=None, help="JSON path (default OUTPUT/bench.json)")
    p.add_argument("--cases", nargs="+", choices=CASES, default=None, help=f"subset of {', '.join(CASES)} (default all)")
    p.add_argument("--device", default=None, help="cpu | cuda[:i] (default: cuda if available, else cpu)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size of every case (overrides the per-case ones)")
    p.add_argument("--tokens", type=int, default=None, help="tokens per sample of the layer cases and BERT (ViT: 197 fixed)")
    p.add_argument("--layer-batch", type=int, default=None, help="layer cases batch (default 4; quick 2)")
    p.add_argument("--layer-tokens", type=int, default=None, help="ViT layer cases tokens (default 197; quick 16)")
    p.add_argument("--vit-batch", type=int, default=None, help="ViT model batch (default 2; quick 2)")
    p.add_argument("--bert-batch", type=int, default=None, help="BERT model and bert_query batch (default 4; quick 2)")
    p.add_argument("--bert-tokens", type=int, default=None, help="BERT sequence length (default 128; quick 16)")
    p.add_argument("--warmup", type=int, default=None, help="layer-level warm-up calls (default 2; quick 1)")
    p.add_argument("--repeats", type=int, default=None, help="layer-level timed calls (default 7; quick 2)")
    p.add_argument("--model-warmup", type=int, default=None, help="model-level warm-up calls (default 1)")
    p.add_argument("--model-repeats", type=int, default=None, help="model-level timed calls (default 3; quick 2)")
    p.add_argument("--gid-tasks", type=int, default=None, help="learned tasks for Gradient ID (default 10; quick 3)")
    p.add_argument("--mask-dtype", choices=sorted(_DTYPES), default="float32", help="dtype of stored (frozen) masks")
    p.add_argument("--lora-r", type=int, default=8, help="rank of lora[small]")
    p.add_argument("--adapter-m", type=int, default=8, help="bottleneck of adapter[small]")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--compile", dest="compile", action="store_true", default=None, help="include torch.compile rows (default on, off with --quick)")
    g.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--candidates", nargs="+", choices=CANDIDATES, default=None,
                   help="subset of candidates (default all; the floor and lora[matched] always run, ratios need them)")
    p.add_argument("--stat", choices=("median", "min"), default="median",
                   help="statistic of the timed calls used for the table and ratios (JSON has both)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for the run, restored afterwards (default: torch's choice; --quick: 1, "
                        "since tiny ops on a loaded machine are dominated by OpenMP synchronisation)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    return p


def _fill_defaults(args) -> None:
    q = args.quick
    d = {"layer_batch": 2 if q else 4, "layer_tokens": 16 if q else 197, "vit_batch": 2, "bert_batch": 2 if q else 4,
         "bert_tokens": 16 if q else 128, "warmup": 1 if q else 2, "repeats": 2 if q else 7, "model_warmup": 1,
         "model_repeats": 2 if q else 3, "gid_tasks": 3 if q else 10, "compile": not q,
         "threads": 1 if q else None}
    for k, v in d.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.batch_size is not None:
        args.layer_batch = args.vit_batch = args.bert_batch = args.batch_size
    if args.tokens is not None:
        args.layer_tokens = args.bert_tokens = args.tokens
    for k in ("layer_batch", "layer_tokens", "vit_batch", "bert_batch", "bert_tokens", "repeats", "model_repeats", "gid_tasks", "lora_r", "adapter_m"):
        if getattr(args, k) < 1:
            raise SystemExit(f"softtf bench: --{k.replace('_', '-')} must be >= 1, got {getattr(args, k)}")
    for k in ("warmup", "model_warmup"):
        if getattr(args, k) < 0:
            raise SystemExit(f"softtf bench: --{k.replace('_', '-')} must be >= 0")
    if args.cases is None:
        args.cases = list(CASES)


def run(args) -> dict:
    """Run the benchmark described by parsed ``args``; returns the result dict (also the JSON)."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, device)
    finally:
        torch.set_num_threads(threads_before)


def _run(args, device: torch.device) -> dict:
    global _compiled_fn
    from tqdm.auto import tqdm

    with contextlib.suppress(Exception):  # a compiled function per shape and grad mode
        import torch._dynamo as dynamo

        for attr in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo.config, attr):
                setattr(dynamo.config, attr, 64)
    result: dict[str, Any] = {"meta": _meta(args, device), "cases": []}
    n_layer = sum(c in LAYER_CASES for c in args.cases)
    n_model = len(args.cases) - n_layer
    per = len(CANDIDATES) * len(TASKS)
    total = per * (n_layer * (args.warmup + 1 + args.repeats) + n_model * (args.model_warmup + 1 + args.model_repeats))
    pbar = tqdm(total=total, file=sys.stderr, disable=args.no_progress, dynamic_ncols=True, leave=False)
    try:
        for name in args.cases:
            pbar.set_description(f"{name}: building")
            case = build_case(name, args, device)
            cands = build_candidates(case, args, device, pbar)
            # progress accounts every candidate x task; rows that never run are ticked off now
            warm, rep = (args.warmup, args.repeats) if case.level == "layer" else (args.model_warmup, args.model_repeats)
            skipped = sum(1 for c in cands for t in TASKS if t not in c.fns or t in c.results)
            pbar.update(skipped * (warm + 1 + rep))
            measure_case(case, cands, args, device, pbar)
            add_ratios(cands, args.stat)
            result["cases"].append({
                "case": case.name, "level": case.level, "description": case.description, "tokens": case.tokens,
                "batch": case.batch, "targets": case.names, "wrapped_with": case.wrap_used,
                "targets_text": _targets_text(case.names),
                "rows": [{"key": c.key, "label": c.label, "kind": c.kind, "config": c.config, "params": c.params,
                          "static_bytes": c.static_bytes, "tasks": {t: c.results.get(t, {"status": "missing"}) for t in TASKS}}
                         for c in cands],
            })
            del case, cands
            with contextlib.suppress(Exception):
                import torch._dynamo as dynamo

                dynamo.reset()
            _compiled_fn = None
    finally:
        pbar.close()
    result["meta"]["loadavg_end"] = _loadavg()
    result["targets"], result["targets_text"] = targets(result)
    return result


def _targets_text(names: list[str]) -> str:
    if len(names) <= 2:
        return ", ".join(names)
    return f"{len(names)} layers ({names[0]} ... {names[-1]})"


def main(argv: Sequence[str] | None = None) -> int:
    """``softtf bench``: parse ``argv`` (default ``sys.argv[1:]``), run, write JSON/PNG/text, print the table."""
    args = build_parser().parse_args(argv)
    _fill_defaults(args)
    os.makedirs(args.output, exist_ok=True)
    json_path = args.json or os.path.join(args.output, "bench.json")
    result = run(args)
    table = format_table(result)
    print(table)
    d = os.path.dirname(os.path.abspath(json_path))
    os.makedirs(d, exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1, default=str)
    with open(os.path.join(args.output, "bench.txt"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.output, "bench.md"), "w") as f:
        f.write(format_markdown(result))
    if not args.no_plot:
        try:
            plot(result, os.path.join(args.output, "bench.png"))
        except Exception as exc:  # the numbers matter more than the picture
            print(f"softtf bench: plot failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    print(f"\nwrote {json_path} and {os.path.join(args.output, 'bench.png')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
