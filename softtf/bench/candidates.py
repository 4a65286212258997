"""The candidates of one case: every row of its candidates (CANDIDATES; ATTENTION_CANDIDATES for the
attention cases; ROUTED_CANDIDATES for the routed-LoRA cases) with its modules, trainable parameters,
parameter accounting and step functions (or the reason it cannot run here)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from softtf_kernels import available_backends

from ..core.model import set_submodule
from ..methods.adapter import AdapterLinear, adapter_param_count, matched_bottleneck
from .attention import ACTIVATIONS, LazyCompiled, PrefixAttention, attention_shape, eager_prefix_attention
from .candidate import Candidate
from .cases import Case
from .config import COMPILED, EAGER, FLOOR, LORA_REF, SOFT_BACKENDS, TASKS, BenchConfig
from .memory import tensor_bytes
from .meta import package_version
from .modules import CompiledMaskedLinear, EagerMaskedLinear, eager_masked_linear, lora_modules, soft_modules
from .prompted import prompt_candidates
from .routed import SAPT_ALPHA, PeftLoop, RoutedLoRA, peft_lora_layer, routed_inits, routed_shape
from .sapt_rows import sapt_candidates
from .serving import serve_candidates
from .steps import eager_gid_step, soft_gid_step

__all__ = ["Candidate", "build_candidates", "failure", "install", "matched_lora_rank"]


def matched_lora_rank(in_features: int, out_features: int) -> int:
    """LoRA rank with as many parameters (r * (in + out)) as a Soft-TF mask (out * in)."""
    return max(1, round(in_features * out_features / (in_features + out_features)))


def failure(exc: BaseException) -> dict:
    """The status row of a call that raised."""
    msg = str(exc).strip().splitlines()
    return {"status": "failed", "reason": f"{type(exc).__name__}: {msg[0] if msg else ''}"[:300]}


def install(case: Case, cand: Candidate) -> None:
    """Put the candidate's modules on the case's targets; only its trainable parameters need grad."""
    for name, mod in cand.modules.items():
        set_submodule(case.model, name, mod)
    for p in case.base_params:
        p.requires_grad_(False)
    for p in cand.trainable:
        p.requires_grad_(True)


def _params(case: Case, count: Callable[[str, nn.Linear], int], itemsize: int, store_dtype: str) -> dict:
    """Parameter accounting: ``count(name, layer)`` trainable (= stored per task) values per target layer."""
    per = []
    for n in case.names:
        lin = case.originals[n]
        k = count(n, lin)
        per.append({"name": n, "in": lin.in_features, "out": lin.out_features, "trainable": k,
                    "stored_per_task": k, "bytes_per_task": itemsize * k})
    return {
        "trainable": sum(p["trainable"] for p in per),
        "stored_per_task": sum(p["stored_per_task"] for p in per),
        "bytes_per_task": sum(p["bytes_per_task"] for p in per),
        "store_dtype": store_dtype,
        "per_layer": per,
    }


def _sizes_text(sizes: dict[str, int]) -> str:
    return "/".join(str(v) for v in dict.fromkeys(sizes.values()))


def _unavailable(backend: str, device: torch.device, here: list[str]) -> str:
    """Why a SoftLinear backend cannot run on ``device`` ("" if it can)."""
    if backend in here:
        return ""
    if backend == "triton" and device.type == "cpu":
        return "triton on CPU runs only under TRITON_INTERPRET=1 (interpreter, not a performance number)"
    if backend == "cuda" and device.type != "cuda":
        return "no CUDA device"
    if backend == "cpp" and device.type != "cpu":
        return "C++ CPU kernel runs CPU tensors only"
    return f"backend {backend!r} unavailable on {device.type} (available: {here})"


def build_candidates(case: Case, config: BenchConfig, device: torch.device) -> list[Candidate]:
    """Every candidate of the case's rows (``config.case_candidates(case.name)``; those that cannot
    run carry a skipped/failed status), the floor installed."""
    if case.level == "attention":
        cands, always = _attention_candidates(case, config, device), {FLOOR, EAGER}
    elif case.level == "lora":
        cands, always = _routed_candidates(case, config, device), {FLOOR, EAGER}
    elif case.level == "serve":
        cands, always = serve_candidates(case, config, device), {FLOOR, EAGER}
    else:
        cands, always = _linear_candidates(case, config, device), {FLOOR, LORA_REF}
    install(case, cands[0])
    if config.candidates:
        keep = set(config.candidates) | always  # the ratios' references always run
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
        c.static_bytes = tensor_bytes(ts, base_ptrs)
    return cands


def _linear_candidates(case: Case, config: BenchConfig, device: torch.device) -> list[Candidate]:
    """The rows of CANDIDATES on the case's linear layers."""
    floor = Candidate(FLOOR, "frozen (floor)", "floor", modules=dict(case.originals),
                      trainable=[case.originals[n].bias for n in case.names if case.originals[n].bias is not None])
    floor.params = _params(case, lambda n, lin: 0, 0, "-")
    floor.config = {"note": "train step trains only the target layers' biases (backward to the same depth)"}
    floor.use_steps(case)
    floor.results["gid"] = {"status": "n/a", "reason": "floor of gid = floor infer (ratio_floor of gid uses it)"}
    install(case, floor)
    soft_p = _params(case, lambda n, lin: lin.out_features * lin.in_features,
                     torch.finfo(config.mask_torch_dtype).bits // 8, config.mask_dtype)
    try:
        soft_mods, soft_reason = soft_modules(case, config), ""
    except Exception as exc:  # pragma: no cover - reported, not raised
        soft_mods, soft_reason = {}, "building SoftLinear failed: " + failure(exc)["reason"]
    prompt_rows = prompt_candidates(case, config, soft_mods, soft_reason) if case.name == "vit" else []
    if case.name == "bert":
        prompt_rows = sapt_candidates(case, config)
    return [floor, *_soft_candidates(case, config, device, soft_mods, soft_reason, soft_p),
            *_eager_candidates(case, config, soft_mods, soft_reason, soft_p),
            *_lora_candidates(case, config, floor), *_adapter_candidates(case, config), *prompt_rows]


def _soft_candidates(case: Case, config: BenchConfig, device: torch.device, soft_mods: dict, soft_reason: str,
                     soft_p: dict) -> list[Candidate]:
    """softtf[<backend>]: the one set of SoftLinear modules under every backend."""
    cands = []
    frozen_names = [f"t{k}" for k in range(config.gid_tasks)]
    here = available_backends(device)
    for b in SOFT_BACKENDS:
        c = Candidate(f"softtf[{b}]", f"SoftLinear [{b}]", "softtf", backend=b, params=soft_p,
                      config={"backend": b, "mask_dtype": config.mask_dtype, "gid_tasks": config.gid_tasks})
        cands.append(c)
        reason = soft_reason or _unavailable(b, device, here)
        if reason:
            c.mark("failed" if soft_reason else "skipped", reason)
            continue
        if b == "triton" and device.type == "cpu":
            c.label += " (interpreter)"
        c.modules = dict(soft_mods)
        c.trainable = [m.masks["active"] for m in soft_mods.values()]
        c.use_steps(case, b)
        c.fns["gid"] = soft_gid_step(case, b, frozen_names)
    return cands


def _eager_candidates(case: Case, config: BenchConfig, soft_mods: dict, soft_reason: str,
                      soft_p: dict) -> list[Candidate]:
    """eager: F.linear(x, W * M, b) with autograd; compiled: torch.compile of it (Soft-TF's parameters)."""
    cands = []
    for key, compiled in ((EAGER, False), (COMPILED, True)):
        label = "eager F.linear(x, W*M)" if not compiled else "torch.compile(eager)"
        c = Candidate(key, label, key, params=soft_p, config={"compiled": compiled})
        cands.append(c)
        if compiled and not config.compile:
            c.mark("skipped", "torch.compile rows off (--no-compile, or --quick without --compile)")
            continue
        linear_fn = CompiledMaskedLinear() if compiled else eager_masked_linear
        mods = {n: EagerMaskedLinear(case.originals[n], soft_mods[n].frozen_masks if soft_mods else None, linear_fn)
                for n in case.names}
        c.modules = mods
        c.trainable = [m.mask for m in mods.values()]
        c.use_steps(case)
        if compiled:
            c.results["gid"] = {"status": "skipped",
                                "reason": "compile of the per-sample superposed eager path not attempted (compile time)"}
        elif soft_mods:
            c.fns["gid"] = eager_gid_step(case, list(mods.values()), config.gid_tasks)
        else:
            c.results["gid"] = {"status": "failed", "reason": soft_reason}
    return cands


_NA_GID = {"status": "n/a", "reason": "Gradient ID needs per-task soft masks (Soft-TF only)"}


def _lora_candidates(case: Case, config: BenchConfig, floor: Candidate) -> list[Candidate]:
    """PEFT LoRA, rank matched to Soft-TF's trainable count per layer and ``config.lora_r``."""
    cands = []
    for key, rank in ((LORA_REF, None), ("lora[small]", config.lora_r)):
        ranks = {n: (matched_lora_rank(case.originals[n].in_features, case.originals[n].out_features)
                     if rank is None else rank) for n in case.names}
        c = Candidate(key, f"LoRA (PEFT) r={_sizes_text(ranks)}", "lora", config={"ranks": ranks})
        c.params = _params(case, lambda n, lin: ranks[n] * (lin.in_features + lin.out_features), 4, "float32")
        cands.append(c)
        try:
            c.modules, c.trainable = lora_modules(case, ranks, adapter_name=key.split("[")[1].rstrip("]"))
            c.config["peft"] = package_version("peft")
        except Exception as exc:
            c.mark("failed", "PEFT LoRA: " + failure(exc)["reason"], ("infer", "train"))
        else:
            c.use_steps(case)
        c.results["gid"] = dict(_NA_GID)
        install(case, floor)
    return cands


def _adapter_candidates(case: Case, config: BenchConfig) -> list[Candidate]:
    """Bottleneck Adapters on the layer outputs, matched to out*in parameters and ``config.adapter_m``."""
    cands = []
    for key, m in (("adapter[matched]", None), ("adapter[small]", config.adapter_m)):
        ms = {n: (matched_bottleneck(case.originals[n].in_features, case.originals[n].out_features) if m is None else m)
              for n in case.names}
        mods = {n: AdapterLinear(case.originals[n], ms[n]) for n in case.names}  # freezes the base layer
        c = Candidate(key, f"Adapter m={_sizes_text(ms)}", "adapter", modules=mods,
                      trainable=[p for mod in mods.values() for p in mod.adapter.parameters()], config={"bottleneck": ms})
        c.params = _params(case, lambda n, lin: adapter_param_count(lin.out_features, ms[n]), 4, "float32")
        c.use_steps(case)
        c.results["gid"] = dict(_NA_GID)
        cands.append(c)
    return cands


def _frozen_floor(case: Case, label: str, params: dict, note: str) -> Candidate:
    """The floor row of an op case: the case's frozen modules, nothing stored per task."""
    floor = Candidate(FLOOR, label, "floor", modules=dict(case.originals),
                      params={**params, "trainable": 0, "stored_per_task": 0, "bytes_per_task": 0, "note": ""},
                      config={"note": note})
    floor.use_steps(case)
    return floor


def _op_rows(case: Case, device: torch.device, op: str, label: str, params: dict, config: dict,
             build: Callable[[], tuple[dict, list]], reason: Callable[[str], str] = lambda bk: "") -> list[Candidate]:
    """``softtf[<b>]``: one row per backend of ``op``, its modules and trainable parameters from
    ``build()``; a backend that cannot run here (or for which ``reason(b)`` says why) is skipped."""
    here = available_backends(device, op)
    rows = []
    for bk in SOFT_BACKENDS:
        c = Candidate(f"softtf[{bk}]", f"{label} [{bk}]", "softtf", backend=bk, params=params,
                      config={"backend": bk, **config})
        rows.append(c)
        why = reason(bk) or _unavailable(bk, device, here)
        if why:
            c.mark("skipped", why)
            continue
        if bk == "triton" and device.type == "cpu":
            c.label += " (interpreter)"
        c.modules, c.trainable = build()
        c.use_steps(case, bk)
    return rows


_NA_ATTENTION_GID = {"status": "n/a", "reason": "Gradient ID runs on SoftLinear layers (no attention row)"}


def _attention_candidates(case: Case, config: BenchConfig, device: torch.device) -> list[Candidate]:
    """ATTENTION_CANDIDATES: the floor (SDPA without prefix, the frozen model's cost; its train step
    is forward + backward to qkv), softtf.prefix_attention under every backend, the eager composite
    and torch.compile of it. Every prefixed row starts from the same U(-1, 1) prompt (DualPrompt's
    init), α = τ = 1."""
    _, h, _, d, p = attention_shape(config)
    activation = ACTIVATIONS[case.name]
    gen = torch.Generator(device=device)
    gen.manual_seed(config.seed)
    prompt = torch.rand((2, p, h, d), generator=gen, device=device) * 2 - 1
    gated = activation != "none"
    note = "the [2, P, H, D] prompt per task" + (" + alpha, tau (learned in task 0, shared)" if gated else "")
    params = {"trainable": 2 * p * h * d + 2 * gated, "stored_per_task": 2 * p * h * d,
              "bytes_per_task": 4 * 2 * p * h * d, "store_dtype": "float32", "per_layer": [], "note": note}
    floor = _frozen_floor(case, "SDPA, no prefix (frozen)", params,
                          "F.scaled_dot_product_attention(q, k, v); train: forward + backward to qkv")

    def prefixed():
        mod = PrefixAttention(prompt, activation)
        return {"attn": mod}, list(mod.parameters())

    no_cuda = "prefix_attention has no CUDA C++ kernel (its CUDA kernel is Triton)"
    cands = [floor, *_op_rows(case, device, "prefix_attention_forward", "prefix_attention", params,
                              {"activation": activation, "prefix_len": p}, prefixed,
                              lambda bk: no_cuda if bk == "cuda" and device.type == "cuda" else "")]
    for key, compiled in ((EAGER, False), (COMPILED, True)):
        label = "torch.compile(eager)" if compiled else "eager cat + softmax"
        c = Candidate(key, label, key, params=params, config={"compiled": compiled, "activation": activation,
                                                              "prefix_len": p})
        cands.append(c)
        if compiled and not config.compile:
            c.mark("skipped", "torch.compile rows off (--no-compile, or --quick without --compile)")
            continue
        fn = LazyCompiled(eager_prefix_attention) if compiled else eager_prefix_attention
        c.modules = {"attn": PrefixAttention(prompt, activation, fn)}
        c.trainable = list(c.modules["attn"].parameters())
        c.use_steps(case)
    for c in cands:
        c.results.setdefault("gid", dict(_NA_ATTENTION_GID))
    return cands


_NA_ROUTED_GID = {"status": "n/a", "reason": "Gradient ID runs on Soft-TF masks (no routed-LoRA row)"}


def _routed_candidates(case: Case, config: BenchConfig, device: torch.device) -> list[Candidate]:
    """ROUTED_CANDIDATES: the floor (the frozen nn.Linear; its train step is forward + backward to
    x), softtf_kernels.ops.routed_lora under every backend, and the official loop over the T
    adapters of a PEFT LoraLayer (key ``eager``). Every row starts from the same A, B and weights."""
    b, _, d, t, r = routed_shape(case.name, config)
    lora_a, lora_b, weights = routed_inits(case.name, config, device)
    scaling = SAPT_ALPHA / r
    base = case.originals["lin"]
    blocks = t * r * 2 * d
    params = {"trainable": blocks + b * t, "stored_per_task": r * 2 * d, "bytes_per_task": 4 * r * 2 * d,
              "store_dtype": "float32", "per_layer": [],
              "note": f"T = {t} blocks of A [r, in] + B [out, r], all trained here, + the [B, T] routing weights"}
    floor = _frozen_floor(case, "frozen nn.Linear (floor)", params, "the frozen projection; train: forward + backward to x")

    def routed():
        mod = RoutedLoRA(base, lora_a, lora_b, weights, scaling)
        return {"lin": mod}, [mod.lora_a, mod.lora_b, mod.weights]

    cands = [floor, *_op_rows(case, device, "routed_lora", "routed_lora", params, {"T": t, "r": r, "scaling": scaling},
                              routed)]
    loop = Candidate(EAGER, f"PEFT loop over T={t} LoRA", "eager", params=params,
                     config={"T": t, "r": r, "scaling": scaling, "loop": "peft.tuners.lora.Linear, T adapters"})
    cands.append(loop)
    try:
        mod = PeftLoop(peft_lora_layer(base, lora_a, lora_b), weights)
        loop.config["peft"] = package_version("peft")
    except Exception as exc:
        loop.mark("failed", "PEFT LoRA: " + failure(exc)["reason"], ("infer", "train"))
    else:
        loop.modules, loop.trainable = {"lin": mod}, [*mod.blocks(), mod.weights]
        loop.use_steps(case)
    for c in cands:
        c.results.setdefault("gid", dict(_NA_ROUTED_GID))
    return cands
