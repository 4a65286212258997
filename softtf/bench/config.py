"""What a ``softtf bench`` run measures: the task, case and candidate names and :class:`BenchConfig`."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from softtf_kernels import BACKENDS

__all__ = [
    "ALL_CANDIDATES", "ATTENTION_CANDIDATES", "ATTENTION_CASES", "BenchConfig", "CANDIDATES", "CASES", "COMPILED", "EAGER",
    "FLOOR",
    "LAYER_CASES", "LORA_CASES", "LORA_REF", "MASK_DTYPES", "MODEL_CASES", "PROMPT_CANDIDATES", "ROUTED_CANDIDATES",
    "SAPT_CANDIDATES", "SERVE_CANDIDATES", "SERVE_CASES", "SERVE_TASKS", "SOFT_BACKENDS", "STATS", "TASKS", "case_candidates",
    "case_level",
]

TASKS = ("infer", "train", "gid")
LAYER_CASES = ("vit_qkv", "vit_proj", "bert_query")
MODEL_CASES = ("vit", "bert")
# softtf.prefix_attention at ViT-B/16 shapes: DualPrompt's prefix (no gate) and NoRGa's (sigmoid gate)
ATTENTION_CASES = ("attn_dualprompt", "attn_norga")
# SAPT's mixture of T LoRA blocks on one BERT-base projection: softtf_kernels.ops.routed_lora vs the PEFT loop
LORA_CASES = ("lora_t5", "lora_t10", "lora_t20")
# serving a mixed batch: one wrapped ViT with T = 10 frozen tasks, each sample its own task (softtf.bench.serving)
SERVE_CASES = ("serve_t10",)
SERVE_TASKS = 10  # frozen tasks of the serving case
CASES = LAYER_CASES + MODEL_CASES + ATTENTION_CASES + LORA_CASES + SERVE_CASES
SOFT_BACKENDS = tuple(b for b in BACKENDS if b != "auto")  # cpp, cuda, triton, reference
FLOOR, LORA_REF, EAGER, COMPILED = "floor", "lora[matched]", "eager", "compiled"
CANDIDATES = (
    (FLOOR,)
    + tuple(f"softtf[{b}]" for b in SOFT_BACKENDS)
    + (EAGER, COMPILED, LORA_REF, "lora[small]", "adapter[matched]", "adapter[small]")
)
# the attention cases: floor = SDPA without prefix (the frozen model), softtf[<b>] = softtf.prefix_attention
# under backend b, eager / compiled = the concatenate-and-softmax composite (and torch.compile of it)
ATTENTION_CANDIDATES = (FLOOR,) + tuple(f"softtf[{b}]" for b in SOFT_BACKENDS) + (EAGER, COMPILED)
# the ViT model case also runs the prompt methods (softtf.bench.prompted), alone and with masks
PROMPT_CANDIDATES = ("dualprompt", "dualprompt+softtf", "norga", "norga+softtf")
# the routed-LoRA cases: floor = the frozen nn.Linear, softtf[<b>] = routed_lora under backend b,
# eager = the official code's loop over T PEFT LoRA modules (softtf.bench.routed)
ROUTED_CANDIDATES = (FLOOR,) + tuple(f"softtf[{b}]" for b in SOFT_BACKENDS) + (EAGER,)
# the BERT model case also runs SAPT (softtf.bench.sapt_rows): routed LoRA on q and v of every layer, T = 5
SAPT_CANDIDATES = ("sapt",)
# the serving case: floor = masks off, task_names = one call, eager = one call per task present ("grouped"),
# per_sample = one call per sample
SERVE_CANDIDATES = (FLOOR, "task_names", EAGER, "per_sample")
ALL_CANDIDATES = tuple(dict.fromkeys(CANDIDATES + ATTENTION_CANDIDATES + PROMPT_CANDIDATES + ROUTED_CANDIDATES
                                     + SAPT_CANDIDATES + SERVE_CANDIDATES))
MASK_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STATS = ("median", "min")


def case_level(name: str) -> str:
    """The level of case ``name``: "layer", "model", "attention", "lora" (routed LoRA) or "serve"."""
    if name in LAYER_CASES:
        return "layer"
    if name in SERVE_CASES:
        return "serve"
    return "attention" if name in ATTENTION_CASES else "lora" if name in LORA_CASES else "model"


def case_candidates(name: str) -> tuple[str, ...]:
    """The candidate rows of case ``name``, in order."""
    if name in ATTENTION_CASES:
        return ATTENTION_CANDIDATES
    if name in LORA_CASES:
        return ROUTED_CANDIDATES
    if name in SERVE_CASES:
        return SERVE_CANDIDATES
    if name == "bert":
        return CANDIDATES + SAPT_CANDIDATES
    return CANDIDATES + PROMPT_CANDIDATES if name == "vit" else CANDIDATES


def _defaults(quick: bool) -> dict:
    """The values of the fields left at ``None``; ``--quick`` is the CI smoke size."""
    return {"layer_batch": 2 if quick else 4, "layer_tokens": 16 if quick else 197, "vit_batch": 2,
            "bert_batch": 2 if quick else 4, "bert_tokens": 16 if quick else 128, "warmup": 1 if quick else 2,
            "repeats": 2 if quick else 7, "model_warmup": 1, "model_repeats": 2 if quick else 3,
            "gid_tasks": 3 if quick else 10, "compile": not quick,
            # tiny ops on a loaded machine are dominated by OpenMP synchronisation
            "threads": 1 if quick else None}


@dataclass
class BenchConfig:
    """One benchmark run. Field names are the ``softtf bench`` flags (``layer_batch`` is
    ``--layer-batch``, help in :func:`softtf.bench.add_arguments`). Fields left at ``None`` get
    their defaults (which depend on ``quick``) at construction; ``batch_size`` and ``tokens`` then
    override the per-case sizes. Invalid values raise ``ValueError``. The resolved fields are the
    JSON's ``meta.args``."""

    quick: bool = False
    output: str = "bench_results"
    json: str | None = None
    cases: list[str] | None = None
    device: str | None = None
    batch_size: int | None = None
    tokens: int | None = None
    layer_batch: int | None = None
    layer_tokens: int | None = None
    vit_batch: int | None = None
    bert_batch: int | None = None
    bert_tokens: int | None = None
    warmup: int | None = None
    repeats: int | None = None
    model_warmup: int | None = None
    model_repeats: int | None = None
    gid_tasks: int | None = None
    mask_dtype: str = "float32"
    lora_r: int = 8
    adapter_m: int = 8
    prefix_len: int = 5
    compile: bool | None = None
    candidates: list[str] | None = None
    stat: str = "median"
    threads: int | None = None
    seed: int = 0
    no_progress: bool = False
    no_plot: bool = False

    def __post_init__(self) -> None:
        for k, v in _defaults(self.quick).items():
            if getattr(self, k) is None:
                setattr(self, k, v)
        if self.batch_size is not None:
            self.layer_batch = self.vit_batch = self.bert_batch = self.batch_size
        if self.tokens is not None:
            self.layer_tokens = self.bert_tokens = self.tokens
        for k in ("layer_batch", "layer_tokens", "vit_batch", "bert_batch", "bert_tokens", "repeats", "model_repeats",
                  "gid_tasks", "lora_r", "adapter_m"):
            self._at_least(k, 1)
        self._at_least("prefix_len", 0)
        for k in ("warmup", "model_warmup", "threads"):  # threads 0: torch's choice
            self._at_least(k, 0)
        self.cases = list(CASES) if self.cases is None else list(self.cases)
        self._known("cases", self.cases, CASES)
        if self.candidates is not None:
            self.candidates = list(self.candidates)
            self._known("candidates", self.candidates, ALL_CANDIDATES)
        self._known("mask_dtype", [self.mask_dtype], MASK_DTYPES)
        self._known("stat", [self.stat], STATS)

    def _at_least(self, name: str, least: int) -> None:
        v = getattr(self, name)
        if v is not None and v < least:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {least}, got {v}")

    @staticmethod
    def _known(name: str, values: list, choices) -> None:
        bad = [v for v in values if v not in choices]
        if bad:
            raise ValueError(f"--{name.replace('_', '-')}: unknown {bad}; choose from {list(choices)}")

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    @property
    def mask_torch_dtype(self) -> torch.dtype:
        return MASK_DTYPES[self.mask_dtype]

    @property
    def json_path(self) -> str:
        return self.json or os.path.join(self.output, "bench.json")

    def timing(self, level: str) -> tuple[int, int]:
        """(warm-up calls, timed calls) of a ``"layer"``, ``"attention"``, ``"lora"``, ``"model"`` or ``"serve"`` case."""
        model_sized = level in ("model", "serve")
        return (self.model_warmup, self.model_repeats) if model_sized else (self.warmup, self.repeats)
