"""Triton kernels of the softtf ops, callable directly with the signatures of
``softtf_kernels.reference`` (and of ``torch.ops.softtf.*``):

- ``masked_linear(x, weight, mask, bias=None)``: y = x (W ⊙ M)^T + b. Tiled GEMM
  (BLOCK_M x BLOCK_N output tile, BLOCK_K reduction steps, GROUP_M swizzle for L2 reuse). Each
  W and M tile is loaded, multiplied in fp32 registers, cast to the operand dtype and fed to
  ``tl.dot`` (tensor cores for fp16/bf16) with fp32 accumulation; bias in the epilogue. W ⊙ M
  never exists in memory. x may have any leading dims and strides (no copy for 2-D/3-D views).
- ``masked_linear_grad_input(grad_out, weight, mask)``: dx = dy (W ⊙ M), the same kernel with
  W and M read transposed through their strides.
- ``masked_linear_grad_mask(grad_out, x, weight, mask_dtype)``: dM = (dy^T x) ⊙ W, a GEMM
  reducing over all tokens with W applied in the epilogue, written in ``mask_dtype``. When the
  [out, in] output has too few tiles to fill the GPU, the tokens are split into chunks whose
  fp32 partials a second small kernel sums (deterministic, no atomics) before applying W.
- ``mask_mixture_grad(grad_out, x, weight, masks, per_sample)``: Gradient-ID scores. Each
  program computes one (out, in) tile of dy^T x for its token group (a sample when
  ``per_sample``), multiplies by the W tile, then reduces it against each of the T mask tiles;
  the per-tile partials ([groups, T, tiles] fp32) are summed afterwards. Returns fp32.
- ``mixed_task_linear(x, weight, masks, task_ids, bias=None)`` and
  ``mixed_task_linear_grad_input(grad_out, weight, masks, task_ids)``: one launch over
  (sample, row tile, column tile); each program loads its sample's task id and uses that mask.
- ``routed_lora`` / ``routed_lora_backward`` (module ``lora``): SAPT's weighted sum of T
  LoRA blocks as one rank-(T·r) LoRA, two strided GEMM launches forward (the per-sample routing
  weights applied in the first one's epilogue), five backward.
- ``prefix_attention_forward`` / ``prefix_attention_backward`` (module ``prefix_attention``):
  flash attention over the P prefix columns (NoRGa's gate fused into the score tile) and the N
  token columns, online softmax, log-sum-exp out; backward recomputes the probabilities from it.

Precision: fp16/bf16 operands go through tensor cores with fp32 accumulation (the masked
weight tile is rounded once to the operand dtype). fp32 operands use ``input_precision="ieee"``
by default so results match the fp32 oracle to ~1e-5; set the environment variable
``SOFTTF_TRITON_FP32_PRECISION=tf32`` (or ``tf32x3``) before import, or call
``set_fp32_precision("tf32")``, to trade ~1e-3 relative error for tensor-core speed.

Supported dtypes: float32, float16, bfloat16 (float64 raises TypeError here; the backend
dispatcher sends float64 to the reference). Masks may also be int8 (``softtf_kernels.quant``,
[out, in + 8] or [T, out, in + 8], any strides): the kernels load the codes and each row's scale
and offset bytes and dequantize in registers (``qmask.py``), so ``auto`` on CUDA sends int8 masks
here. Under ``TRITON_INTERPRET=1`` (set before triton is imported) the kernels run on CPU
tensors, without bf16 and with one small autotune config.

torch.compile: the public entry points are opaque ``torch.library`` custom ops
(``torch.ops.softtf.*``) with fake kernels, so compiled graphs keep them as extern calls to
these kernels rather than tracing into Triton.

Importing this package (``softtf_kernels`` does, for backend choice) is cheap: triton and the
kernels load on first attribute access.
"""
from __future__ import annotations

import importlib

from ..table import ALL_NAMES, PYTHON_NAMES

# One kernel per op of the table (signatures of the ops), plus the fp32 precision switch.
__all__ = [*ALL_NAMES, "set_fp32_precision", "get_fp32_precision"]


# The kernel module of each op: the masked-linear family in host.py (kernels.py), the others beside.
_MODULES = {"routed_lora": ".lora", "routed_lora_backward": ".lora"}


def __getattr__(name: str):
    if name in __all__:
        module = importlib.import_module(
            _MODULES.get(name, ".prefix_attention" if name in PYTHON_NAMES else ".host"), __name__)
        value = getattr(module, name)
        globals()[name] = value
        return value
    if name == "INTERPRET":
        return importlib.import_module(".kernels", __name__).INTERPRET
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
