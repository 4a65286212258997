"""``softtf bench``: throughput and peak memory of Soft-TF against LoRA, Adapters and the eager reference,
and of ``softtf.prefix_attention`` against the eager composite and SDPA without prefix, and of SAPT's
``routed_lora`` against the official loop over T PEFT LoRA modules (``lora_t5``, ``lora_t10``,
``lora_t20``).

    softtf bench [--quick] [--output DIR] [--json PATH] [--cases vit_qkv vit ...] [--device cpu]
    python -m softtf.bench ...                         (same thing without the console script)

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
  Soft-TF on query/key/value of layers 9-11); attention: ``attn_dualprompt`` (activation "none") and
  ``attn_norga`` (sigmoid gate), one attention call at ViT-B/16 shapes (H 12, D 64, ``--layer-batch``
  x ``--layer-tokens``) with a ``--prefix-len`` (5) prompt; ``train`` there is forward + backward
  (to qkv and the prompt, + Adam on the prompt, α, τ); routed LoRA: ``lora_t5``, ``lora_t10``,
  ``lora_t20``, SAPT's mixture of T LoRA blocks (r 4, alpha 32) on one frozen 768->768 projection (BERT
  batch and sequence length): floor = the frozen nn.Linear, ``softtf[<b>]`` = ``routed_lora`` under
  backend b, ``eager`` = the official loop over the T adapters of a PEFT LoraLayer; ``train`` there is
  forward + backward to x, A, B and the [B, T] routing weights (+ Adam on A, B, weights).
  serving: ``serve_t10``, the ``vit`` case's model wrapped with 10 frozen tasks answering a batch of
  4 x ``--vit-batch`` samples with random task ids (inference only): floor = masks off,
  ``task_names`` = one ``model(x, task_names=...)`` call, ``eager`` = one call per task present
  ("grouped"), ``per_sample`` = one call per sample (softtf.bench.serving).

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

prompt candidates of the ViT model case (PROMPT_CANDIDATES; softtf.bench.prompted)
  ``dualprompt``       DualPrompt's prefixes (G 0-1, E 2-4, length 5) through ``softtf.prefix_attention``
  ``norga``            NoRGa's gated prefixes (E 0-4, length 5, sigmoid gate, alpha / tau learned)
  ``<method>+softtf``  the same with Soft-TF masks on the case's targets (the paper's "+ Soft-TF" rows)

SAPT candidate of the BERT model case (SAPT_CANDIDATES; softtf.bench.sapt_rows)
  ``sapt``             routed LoRA (r 4, alpha 32) on query + value of every layer, T = 5 blocks (block 4
                       and key 4 train), routed per sample by SAPT's router through ``routed_lora``

attention candidates (ATTENTION_CANDIDATES)
  ``floor``            ``F.scaled_dot_product_attention(q, k, v)`` without prefix: the frozen model's cost
  ``softtf[<b>]``      ``softtf.prefix_attention`` under backend b (cpp on CPU, triton on CUDA, reference)
  ``eager``            the composite of the reference code: prefixes concatenated to k and v, explicit
                       [N, P + N] scores, the gate on the scaled prefix columns, softmax, matmul
  ``compiled``         ``torch.compile`` of it

Timing: every candidate is warmed up, then timed ``--repeats`` times with the candidates of a task
interleaved round-robin (rotating start), so load from other processes hits all of them alike;
the median is reported, with ratios to the floor, to ``lora[matched]`` and to ``eager`` of the same run.

Peak memory (bytes allocated during one call above what was live before it: activations saved for
backward, gradients, temporaries; weights and optimizer state are listed separately as static
bytes). CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation before the call. CPU:
allocation events of ``torch.profiler.profile(profile_memory=True)`` (every allocation and free of
the CPU allocator, in time order); the peak of their running sum. Allocations that bypass the
c10 allocator (e.g. oneDNN / OpenMP scratch) are not seen on CPU.

Output: a table on stdout, JSON (``--json``, default ``DIR/bench.json``), a PNG bar chart
(``DIR/bench.png``), the table as text (``DIR/bench.txt``) and as Markdown (``DIR/bench.md``);
progress on stderr (tqdm).

Modules: ``config`` (names, :class:`BenchConfig`), ``cases``, ``modules`` (eager / compiled /
SoftLinear / LoRA layers), ``attention`` (the attention cases' modules), ``routed`` (the routed-LoRA
cases' modules), ``steps`` (the timed calls), ``candidates``, ``memory``, ``harness`` (timing),
``ratios``, ``runner`` (a whole run), ``meta``,
``report`` (text and Markdown), ``chart`` (PNG), ``suite`` (pytest-benchmark glue), ``cli`` (flags ->
BenchConfig, outputs).
"""
from __future__ import annotations

from .candidates import Candidate, build_candidates, install, matched_lora_rank
from .cases import Case, build_case
from .cli import add_arguments, build_parser, config_from_args, main, run
from .config import (ATTENTION_CANDIDATES, ATTENTION_CASES, CANDIDATES, CASES, LAYER_CASES, LORA_CASES, MODEL_CASES,
                     PROMPT_CANDIDATES, ROUTED_CANDIDATES, SAPT_CANDIDATES, TASKS, BenchConfig, case_candidates)
from .harness import measure_case
from .memory import cpu_allocation_profile, measure_peak_bytes
from .chart import plot
from .ratios import add_ratios, targets
from .report import format_markdown, format_table
from .runner import measure
from .suite import Suite

__all__ = [
    "ATTENTION_CANDIDATES", "ATTENTION_CASES", "BenchConfig", "CANDIDATES", "CASES", "Candidate", "Case",
    "LAYER_CASES", "LORA_CASES", "MODEL_CASES", "PROMPT_CANDIDATES", "ROUTED_CANDIDATES", "SAPT_CANDIDATES",
    "Suite", "TASKS", "add_arguments", "add_ratios", "build_candidates", "build_case",
    "build_parser", "case_candidates", "config_from_args",
    "cpu_allocation_profile", "format_markdown", "format_table", "install", "main", "matched_lora_rank", "measure",
    "measure_case", "measure_peak_bytes", "plot", "run", "targets",
]
