"""Typed Python entry points of the softtf ops: what softtf and this package's own autograd call.

The primitive ops are thin wrappers of ``torch.ops.softtf.<op>`` (backend choice, validation,
fakes and autograd live behind the op, see registry.py), so they trace under torch.compile like
the op itself. ``superposed_linear`` is a composite op: a ``torch.autograd.Function`` built from
the primitives.

Input contract (every backend; checked by tests/test_reliability.py and the property-based suites
tests/test_fuzz_ops.py / test_fuzz_triton.py against the float64 reference):

- Strides: any. Every tensor argument (x, grad_out, weight, mask(s), bias, task_ids) may be
  non-contiguous, transposed, sliced with a step, start at a storage offset, or be a stride-0
  expansion; results equal those of the dense tensor with the same values. Kernels that read by
  raw pointer either pass the strides (Triton) or copy to a dense buffer first (C++ few-token
  path: the bias and the fp32 copy of x; CUDA: non-contiguous x/dy/W/M/bias/task_ids; Triton:
  task_ids, and x/dy only when their leading dims cannot be merged into two levels).
- Shapes: x / grad_out [..., F] with any number of leading dims (mixed_task_* and
  ``per_sample=True`` need [B, ..., F]). Every dim may be 0: 0 tokens or samples (empty output;
  grad_mask and the scores are 0), 0 in-features (y = bias, or 0; dM is empty), 0 out-features
  (empty y; dx = 0). masks needs at least one task.
- Dtypes: x, grad_out, weight and bias share one dtype (float32, bfloat16, float16, float64); a
  mask may have any of the four. Sums accumulate in fp32 (fp64 for fp64 inputs); outputs are in
  x's / grad_out's dtype, dM in ``mask_dtype``, mixture scores fp32 (fp64). An fp64 argument
  anywhere (x, W, a mask, bias, or ``mask_dtype``) sends the call to the reference on the GPU
  backends, in forward and backward alike. Mixed dtypes are never cast silently: a mismatch raises
  TypeError naming the argument.
- Range: the C++ CPU kernels and the reference form W ⊙ M in the accumulation dtype, so a product
  beyond fp16's range (fp16 300 * 300 = 90000) is fine wherever the result fits. The GPU kernels
  (Triton, CUDA) form it in fp32 and round it once to the operand dtype for the tensor cores:
  with fp16 operands every |W ⊙ M| must stay below 65504 (fp16 max), else that product is inf;
  bf16 has fp32's range. Results that overflow the output dtype are inf on every backend.
- task_ids: int64 or int32, one per sample, in [0, T); out of range raises ValueError (checked
  before any kernel runs).
- Backend choice: ``use_backend`` is scoped to the current thread / asyncio task
  (contextvars); ``set_backend`` sets the process default.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .common import acc_dtype, as_rows
from .quant import is_quantized, mask_codes, mask_scale_offset

__all__ = [
    "masked_linear",
    "masked_linear_grad_input",
    "masked_linear_grad_mask",
    "mask_mixture_grad",
    "mixed_task_linear",
    "mixed_task_linear_grad_input",
    "routed_lora",
    "routed_lora_backward",
    "prefix_attention_forward",
    "prefix_attention_backward",
    "prefix_attention",
    "superposed_linear",
]


# ---------------------------------------------------------------- primitive ops
def masked_linear(x: Tensor, weight: Tensor, mask: Tensor, bias: Tensor | None = None) -> Tensor:
    """y = x (W ⊙ M)^T + b in x's dtype; x [..., in], weight and mask [out, in], bias [out]."""
    return torch.ops.softtf.masked_linear(x, weight, mask, bias)


def masked_linear_grad_input(grad_out: Tensor, weight: Tensor, mask: Tensor) -> Tensor:
    """dx = dy (W ⊙ M) in grad_out's dtype."""
    return torch.ops.softtf.masked_linear_grad_input(grad_out, weight, mask)


def masked_linear_grad_mask(grad_out: Tensor, x: Tensor, weight: Tensor, mask_dtype: torch.dtype) -> Tensor:
    """dM = (dy^T x) ⊙ W summed over every leading dim, in ``mask_dtype``."""
    return torch.ops.softtf.masked_linear_grad_mask(grad_out, x, weight, mask_dtype)


def mask_mixture_grad(grad_out: Tensor, x: Tensor, weight: Tensor, masks: Tensor, per_sample: bool) -> Tensor:
    """∂H/∂α_t = Σ (dy^T x) ⊙ W ⊙ M_t for masks [T, out, in]: [T], or [B, T] when ``per_sample``."""
    return torch.ops.softtf.mask_mixture_grad(grad_out, x, weight, masks, per_sample)


def mixed_task_linear(x: Tensor, weight: Tensor, masks: Tensor, task_ids: Tensor,
                      bias: Tensor | None = None) -> Tensor:
    """y_b = x_b (W ⊙ M_{task_ids[b]})^T + b for every sample b of x [B, ..., in]."""
    return torch.ops.softtf.mixed_task_linear(x, weight, masks, task_ids, bias)


def mixed_task_linear_grad_input(grad_out: Tensor, weight: Tensor, masks: Tensor, task_ids: Tensor) -> Tensor:
    """dx_b = dy_b (W ⊙ M_{task_ids[b]})."""
    return torch.ops.softtf.mixed_task_linear_grad_input(grad_out, weight, masks, task_ids)


def routed_lora(x: Tensor, lora_a: Tensor, lora_b: Tensor, weights: Tensor, scaling: float) -> Tensor:
    """SAPT's routed LoRA: y_b = Σ_t weights[b, t] · scaling · x_b A_tᵀ B_tᵀ, in x's dtype.

    x [B, ..., in]; lora_a [T, r, in] (the T blocks' A, T >= 1); lora_b [T, out, r]; weights [B, T]
    (one routing row per sample); scaling a finite float (PEFT's lora_alpha / r). Computed as one
    rank-(T·r) LoRA, never as a loop over T nor as a per-sample [out, in] weight:
    h = x A_catᵀ [tokens, T·r], each sample's rank chunks scaled by scaling · weights[b], then one
    GEMM with B_cat [out, T·r]. Differentiable in x, lora_a, lora_b and weights (one fused backward
    op, :func:`routed_lora_backward`; not twice differentiable).

    Contract: x, lora_a, lora_b share one dtype (float32, bfloat16, float16, float64); weights may
    have any of the four (its gradient comes back in its dtype); all on one device; any strides
    (x is viewed as [tokens, in], copied only when its leading dims cannot merge; lora_b is
    permuted into B_cat, a copy of out·T·r elements). Every dim may be 0 except T (B = 0, no
    token, r = 0, in = 0 or out = 0 give an empty or zero result). Sums accumulate in fp32 (fp64
    for fp64 inputs); the rank-space activations h are kept in fp32. Kernels: CPU = C++ (BLAS);
    CUDA = Triton (default) or the C++ binding on cuBLAS; float64 on the GPU backends = the
    reference."""
    return torch.ops.softtf.routed_lora(x, lora_a, lora_b, weights, scaling)


def routed_lora_backward(grad_out: Tensor, x: Tensor, lora_a: Tensor, lora_b: Tensor, weights: Tensor,
                         scaling: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dlora_a, dlora_b, dweights) of :func:`routed_lora` for grad_out [B, ..., out], each in
    its input's dtype and shape."""
    return torch.ops.softtf.routed_lora_backward(grad_out, x, lora_a, lora_b, weights, scaling)


def prefix_attention_forward(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor, alpha: Tensor,
                             tau: Tensor, activation: str, scale: float | None = None) -> tuple[Tensor, Tensor]:
    """(out, lse) of :func:`prefix_attention`; lse [B, H, N] is the row log-sum-exp (fp32, fp64 for
    fp64 inputs) over all P + N columns, kept for the backward."""
    return torch.ops.softtf.prefix_attention_forward(q, k, v, prefix_k, prefix_v, alpha, tau, activation, scale)


def prefix_attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
                              alpha: Tensor, tau: Tensor, out: Tensor, lse: Tensor, activation: str,
                              scale: float | None = None) -> tuple[Tensor, ...]:
    """(dq, dk, dv, dprefix_k, dprefix_v, dalpha, dtau) from the forward's out and lse."""
    return torch.ops.softtf.prefix_attention_backward(grad_out, q, k, v, prefix_k, prefix_v, alpha, tau, out, lse,
                                                      activation, scale)


def prefix_attention(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor, alpha: Tensor,
                     tau: Tensor, activation: str, scale: float | None = None) -> Tensor:
    """Attention with per-sample prefix keys/values and NoRGa's non-linear residual gate.

    q, k, v [B, H, N, D] (N >= 1); prefix_k, prefix_v [B, H, P, D] (P >= 0, already selected per
    sample); alpha, tau 0-dim tensors (shared by all heads); activation "none" (DualPrompt's
    prefix tuning), "sigmoid", "tanh" or "gelu" (exact erf GELU); scale defaults to D^-0.5.
    With s_p = scale q prefix_kᵀ, s_p' = s_p + alpha act(tau s_p) (s_p for "none") and
    s_t = scale q kᵀ: out = softmax([s_p', s_t]) [prefix_v; v], in q's dtype. Differentiable in
    q, k, v, prefix_k, prefix_v, alpha and tau.

    Contract: q, k, v, prefix_k, prefix_v share one dtype (float32, bfloat16, float16, float64;
    alpha / tau may have any of the four, their gradients come back in their own dtype) and one
    device; any strides. Kernels: CPU = ATen's flash attention for the token part + the prefix
    part, merged by log-sum-exp (softtf_kernels.cpu_attention, all four dtypes); CUDA = Triton
    (fp32/fp16/bf16, D <= 256); float64 on CUDA, or backend "reference", = the materializing
    reference."""
    return torch.ops.softtf.prefix_attention(q, k, v, prefix_k, prefix_v, alpha, tau, activation, scale)


# ---------------------------------------------------------------- composite ops
class _SuperposedLinear(torch.autograd.Function):
    """y = x (W ⊙ Σ_t α_t M_t)^T + b; ∂/∂α through the fused mask_mixture_grad op."""

    @staticmethod
    def forward(ctx, x, weight, masks, alpha, bias):
        a = alpha if alpha.dim() == 1 else alpha[0]
        acc = acc_dtype(x.dtype)
        # M̄ = Σ_t α_t M_t: one [out, in] buffer. fp32 masks: one GEMV reading each mask once;
        # low-precision masks: accumulate task by task rather than upcasting all T at once.
        a = a.detach().to(acc)
        if is_quantized(masks):  # Σ_t α_t (o_t + s_t q_t): the codes are read as int8, never dequantized whole
            scale, offset = mask_scale_offset(masks)  # [T, out, 1]
            codes = mask_codes(masks)
            mbar = torch.einsum("t,toi->oi", a, offset.to(acc)).expand(codes.shape[1:]).contiguous()
            for t in range(codes.shape[0]):
                mbar.addcmul_(codes[t], a[t] * scale[t].to(acc))
        elif masks.dtype == acc:
            mbar = torch.mv(masks.reshape(masks.shape[0], -1).t(), a).view(masks.shape[1:])
        else:
            mbar = torch.zeros(masks.shape[1:], dtype=acc, device=masks.device)
            for t in range(masks.shape[0]):  # a[t] stays a tensor: no host read, so torch.compile traces it
                mbar.addcmul_(masks[t], a[t])
        ctx.save_for_backward(x, weight, masks, mbar)
        ctx.per_sample = alpha.dim() == 2
        ctx.alpha_dtype = alpha.dtype
        ctx.has_bias = bias is not None
        return masked_linear(x, weight, mbar, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight, masks, mbar = ctx.saved_tensors
        dy = dy.contiguous()
        dx = masked_linear_grad_input(dy, weight, mbar) if ctx.needs_input_grad[0] else None
        dalpha = None
        if ctx.needs_input_grad[3]:
            dalpha = mask_mixture_grad(dy, x, weight, masks, ctx.per_sample).to(ctx.alpha_dtype)
        db = as_rows(dy).sum(0) if ctx.has_bias and ctx.needs_input_grad[4] else None
        return dx, None, None, dalpha, db


class _PerSampleSuperposedLinear(torch.autograd.Function):
    """y_b = x_b (W ⊙ Σ_t α_bt M_t)^T + b for a per-sample α [B, T] whose rows differ, as
    Σ_t α_bt · x_b (W ⊙ M_t)^T: T masked GEMMs over the whole batch, each result scaled per sample
    and summed in the accumulation dtype. No masked weight per sample ([B, out, in]) is formed.
    ∂/∂x = Σ_t α_bt · dy_b (W ⊙ M_t) (T grad-input GEMMs), ∂/∂α per sample from mask_mixture_grad."""

    @staticmethod
    def forward(ctx, x, weight, masks, alpha, bias):
        acc = acc_dtype(x.dtype)
        a = alpha.detach().to(acc)
        rows = (x.shape[0],) + (1,) * (x.dim() - 1)  # α_bt broadcast over sample b's tokens
        y = None
        for t in range(masks.shape[0]):
            term = masked_linear(x, weight, masks[t]).to(acc) * a[:, t].view(rows)
            y = term if y is None else y.add_(term)
        if bias is not None:
            y.add_(bias.to(acc))
        ctx.save_for_backward(x, weight, masks, alpha)
        ctx.has_bias = bias is not None
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight, masks, alpha = ctx.saved_tensors
        dy = dy.contiguous()
        dx = None
        if ctx.needs_input_grad[0]:
            acc = acc_dtype(dy.dtype)
            a = alpha.detach().to(acc)
            rows = (dy.shape[0],) + (1,) * (dy.dim() - 1)
            for t in range(masks.shape[0]):
                term = masked_linear_grad_input(dy, weight, masks[t]).to(acc) * a[:, t].view(rows)
                dx = term if dx is None else dx.add_(term)
            dx = dx.to(x.dtype)
        dalpha = None
        if ctx.needs_input_grad[3]:
            dalpha = mask_mixture_grad(dy, x, weight, masks, True).to(alpha.dtype)
        db = as_rows(dy).sum(0) if ctx.has_bias and ctx.needs_input_grad[4] else None
        return dx, None, None, dalpha, db


def _rows_equal(alpha: Tensor) -> bool:
    """Whether every row of α [B, T] is the same, known without reading data where possible: by
    construction for B <= 1 or a stride-0 batch dim (one row expanded). Otherwise by value in eager
    mode; under torch.compile (values unknown while tracing: ``torch.equal`` would break the graph)
    such a tensor counts as rows that differ."""
    if alpha.shape[0] <= 1 or alpha.stride(0) == 0:
        return True
    if torch.compiler.is_compiling():
        return False
    return torch.equal(alpha, alpha[:1].expand_as(alpha))


def superposed_linear(x: Tensor, weight: Tensor, masks: Tensor, alpha: Tensor, bias: Tensor | None = None) -> Tensor:
    """x (W ⊙ Σ_t α_t M_t)^T + b with α [T] (one mixture), or α [B, T] (one mixture per sample,
    with ∂/∂α per sample).

    α [T], or [B, T] with equal rows: W ⊙ M̄ is formed once ([out, in]) and one masked GEMM runs.
    α [B, T] whose rows differ (SAPT over Soft-TF masks): y_b = Σ_t α_bt · x_b (W ⊙ M_t)^T + b, T
    masked GEMMs over the whole batch, no per-sample masked weight. Both are differentiable in x,
    α and bias (the weight and the masks get no gradient here).

    Which of the two runs is decided without a graph break: one row expanded to B rows (stride 0,
    ``a.expand(B, T)``: what Gradient ID passes) or B = 1 take the first without reading α; other
    [B, T] tensors are compared by value in eager mode, and take the second under torch.compile,
    whose graph cannot branch on data (same result up to rounding, T GEMMs)."""
    if alpha.dim() == 2:
        if x.dim() < 2 or alpha.shape[0] != x.shape[0]:
            raise ValueError(f"superposed_linear: alpha [B, T] needs x [B, ...] with the same B, got "
                             f"alpha {tuple(alpha.shape)} and x {tuple(x.shape)}")
        if not _rows_equal(alpha):
            if masks.dim() != 3 or alpha.shape[1] != masks.shape[0]:
                raise ValueError(f"superposed_linear: alpha [B, T] needs masks [T, out, in] with the same T, got "
                                 f"alpha {tuple(alpha.shape)} and masks {tuple(masks.shape)}")
            return _PerSampleSuperposedLinear.apply(x, weight, masks, alpha, bias)
    return _SuperposedLinear.apply(x, weight, masks, alpha, bias)
