"""Triton kernels of the routed-LoRA ops (SAPT), with the signatures of ``softtf_kernels.reference``:

- ``routed_lora(x, lora_a, lora_b, weights, scaling)``: y_b = Σ_t w[b, t] · s · x_b A_tᵀ B_tᵀ as
  one rank-(T·r) LoRA in two launches of one strided GEMM kernel: h = x A_catᵀ with the per-sample
  chunk scale s · w[b, t] applied in the epilogue (h kept in fp32, [tokens, T·r]), then
  y = h B_catᵀ written in x's dtype.
- ``routed_lora_backward(grad_out, x, lora_a, lora_b, weights, scaling)`` -> (dx, dlora_a,
  dlora_b, dweights): h = x A_catᵀ and dg = dy B_cat (GEMMs), then on the [tokens, T·r]
  rank-space tensors (torch elementwise: they are T·r wide) dw = s Σ dg ⊙ h per sample and task,
  h ⊙ S and dg ⊙ S; then dB_cat = dyᵀ (h ⊙ S), dx = (dg ⊙ S) A_cat, dA_cat = (dg ⊙ S)ᵀ x (GEMMs; the
  two reducing over tokens split K over extra programs when their [out or T·r, ·] output has few
  tiles, fp32 partials summed afterwards: deterministic, no atomics).

The kernel ``scaled_mm_kernel`` computes C = A B (+ optional epilogue scale of column chunks of
RANK per row sample of ROWS_PER rows) with every operand addressed through its strides, so the
transposed operands are never copied. Operands of one dtype go to ``tl.dot`` as they are (tensor
cores for fp16/bf16, fp32 accumulation); an fp32 operand beside a 16-bit one makes both fp32
(precision of ``get_fp32_precision()``). Copies: x is viewed as [tokens, in] (reshape: a copy only
when its leading dims cannot merge), A_cat is lora_a viewed as [T·r, in] (a copy only for a
layout that does not merge T and r), B_cat = lora_b permuted to [out, T·r] (a copy of out·T·r).

Tiles: chosen per call by ``_tiles`` (16 to 64 wide, the GEMMs are thin in T·r; no autotune).
Dtypes: float32, float16, bfloat16 (not bf16 under the interpreter); weights any of the three.
Interpreter (TRITON_INTERPRET=1 when this module is imported): the same tiles.
"""
from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl
import triton.language.standard as _std
from torch import Tensor

from ..common import new_output
from .host import get_fp32_precision

__all__ = ["routed_lora", "routed_lora_backward"]

INTERPRET = bool(triton.knobs.runtime.interpret)
_INTERPRETER_MIXED = INTERPRET and type(_std.cdiv).__name__ != "InterpretedFunction"
_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def scaled_mm_kernel(a_ptr, b_ptr, s_ptr, c_ptr, M, N, K, K_PER, scaling, ROWS_PER, RANK,
                     a_sm, a_sk, b_sk, b_sn, c_ss, c_sm, c_sn, s_sb, s_st,
                     HAS_SCALE: tl.constexpr, F32: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """C[split, m, n] = Σ_{k in split's K_PER chunk} A[m, k] B[k, n] (fp32 accumulation); with
    HAS_SCALE times scaling · s[m // ROWS_PER, n // RANK]."""
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok, n_ok = rm < M, rn < N
    k0 = pid_k.to(tl.int64) * K_PER
    k_end = tl.minimum(K, k0 + K_PER)
    a_ptrs = a_ptr + rm.to(tl.int64)[:, None] * a_sm + (k0 + rk)[None, :] * a_sk
    b_ptrs = b_ptr + (k0 + rk)[:, None] * b_sk + rn.to(tl.int64)[None, :] * b_sn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(0, tl.cdiv(K_PER, BLOCK_K)):
        k_ok = k0 + kt * BLOCK_K + rk < k_end
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if F32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * a_sk
        b_ptrs += BLOCK_K * b_sk
    if HAS_SCALE:
        s_ptrs = s_ptr + (rm // ROWS_PER).to(tl.int64)[:, None] * s_sb + (rn // RANK)[None, :] * s_st
        acc = acc * (tl.load(s_ptrs, mask=m_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32) * scaling)
    c_ptrs = c_ptr + pid_k * c_ss + rm.to(tl.int64)[:, None] * c_sm + rn[None, :] * c_sn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# ------------------------------------------------------------------------------------ host
def _check(op: str, **tensors: Tensor) -> None:
    if _INTERPRETER_MIXED:
        raise RuntimeError(f"softtf_kernels.triton.{op}: TRITON_INTERPRET=1 was set after triton had been "
                           "imported; set it before anything imports triton")
    for name, t in tensors.items():
        if t.dtype not in _SUPPORTED:
            raise TypeError(f"softtf_kernels.triton.{op}: {name} must be float32, float16 or bfloat16, got "
                            f"{t.dtype} (use the reference backend for other dtypes)")
        if INTERPRET and t.dtype == torch.bfloat16:
            raise TypeError(f"softtf_kernels.triton.{op}: {name} is bfloat16, which the Triton CPU interpreter "
                            "(TRITON_INTERPRET=1) does not support; use float32/float16 or a GPU")


def _block(n: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(max(int(n), 1))))


def _tiles(m: int, n: int, k: int) -> tuple[int, int, int]:
    return _block(m, 64), _block(n, 64), _block(k, 32)


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


# Tests set this to force K splitting on small problems (None: choose by occupancy).
FORCE_SPLIT: int | None = None


def _split(k: int, tiles: int, block_k: int, device: torch.device, allow: bool) -> tuple[int, int]:
    """(splits, K per split): more programs along K when the output has too few tiles."""
    if not allow:
        return 1, max(k, 1)
    want = FORCE_SPLIT or max(1, min(triton.cdiv(k, 8 * block_k), 2 * _num_sms(device) // max(tiles, 1)))
    per = triton.cdiv(triton.cdiv(k, want), block_k) * block_k
    return triton.cdiv(k, per), per


def _mm(a: Tensor, b: Tensor, out: Tensor, scale: tuple[Tensor, float, int, int] | None = None,
        split_k: bool = False) -> Tensor:
    """out [M, N] = a [M, K] @ b [K, N] (strided views), optionally chunk-scaled; returns out."""
    m, k = a.shape
    n = b.shape[1]
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_()
    bm, bn, bk = _tiles(m, n, k)
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    splits, per = _split(k, tiles, bk, a.device, split_k and scale is None)
    f32 = a.dtype != b.dtype or a.dtype == torch.float32
    dst = out if splits == 1 else torch.empty((splits, m, n), dtype=torch.float32, device=a.device)
    if splits == 1:
        c_ss, c_sm, c_sn = 0, out.stride(0), out.stride(1)
    else:
        c_ss, c_sm, c_sn = dst.stride()
    s, sc, rows_per, rank = scale if scale is not None else (a, 1.0, 1, 1)
    s_sb, s_st = (s.stride(0), s.stride(1)) if scale is not None else (0, 0)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn), splits)
    dev = torch.cuda.device(a.device) if a.device.type == "cuda" else contextlib.nullcontext()
    with dev:
        scaled_mm_kernel[grid](a, b, s, dst, m, n, k, per, float(sc), rows_per, rank,
                               a.stride(0), a.stride(1), b.stride(0), b.stride(1), c_ss, c_sm, c_sn, s_sb, s_st,
                               HAS_SCALE=scale is not None, F32=f32,
                               PRECISION=get_fp32_precision() if f32 else "ieee",
                               BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=4)
    if splits > 1:
        out.copy_(dst.sum(0))
    return out


def _operands(x: Tensor, lora_a: Tensor, lora_b: Tensor):
    n_tasks, rank, in_f = lora_a.shape
    out_f = lora_b.shape[1]
    tokens = math.prod(x.shape[:-1])
    x2 = x.reshape(tokens, in_f)
    a_cat = lora_a.reshape(n_tasks * rank, in_f)
    b_cat = lora_b.permute(1, 0, 2).reshape(out_f, n_tasks * rank)
    return x2, a_cat, b_cat, tokens


def routed_lora(x: Tensor, lora_a: Tensor, lora_b: Tensor, weights: Tensor, scaling: float) -> Tensor:
    _check("routed_lora", x=x, lora_a=lora_a, lora_b=lora_b, weights=weights)
    n_tasks, rank, _ = lora_a.shape
    out_f = lora_b.shape[1]
    y = new_output((*x.shape[:-1], out_f), x.dtype, x.device)
    x2, a_cat, b_cat, tokens = _operands(x, lora_a, lora_b)
    y2 = y.view(tokens, out_f)
    if tokens == 0 or out_f == 0:
        return y
    if rank == 0:
        return y.zero_()
    h = torch.empty((tokens, n_tasks * rank), dtype=torch.float32, device=x.device)
    _mm(x2, a_cat.t(), h, scale=(weights, scaling, tokens // x.shape[0], rank))
    return _mm(h, b_cat.t(), y2).view(y.shape)


def routed_lora_backward(grad_out: Tensor, x: Tensor, lora_a: Tensor, lora_b: Tensor, weights: Tensor,
                         scaling: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _check("routed_lora_backward", grad_out=grad_out, x=x, lora_a=lora_a, lora_b=lora_b, weights=weights)
    n_tasks, rank, in_f = lora_a.shape
    out_f = lora_b.shape[1]
    dx = new_output(x.shape, x.dtype, x.device)
    da = new_output(lora_a.shape, lora_a.dtype, lora_a.device)
    db = new_output(lora_b.shape, lora_b.dtype, lora_b.device)
    dw = new_output(weights.shape, weights.dtype, weights.device)
    x2, a_cat, b_cat, tokens = _operands(x, lora_a, lora_b)
    if tokens == 0:
        return dx, da.zero_(), db.zero_(), dw.zero_()
    batch, tr = x.shape[0], n_tasks * rank
    dy2 = grad_out.reshape(tokens, out_f)
    h = _mm(x2, a_cat.t(), torch.empty((tokens, tr), dtype=torch.float32, device=x.device))
    dg = _mm(dy2, b_cat, torch.empty((tokens, tr), dtype=torch.float32, device=x.device))
    h4, dg4 = h.view(batch, tokens // batch, n_tasks, rank), dg.view(batch, tokens // batch, n_tasks, rank)
    dw.copy_((dg4 * h4).sum((1, 3)) * scaling)
    scales = (weights.float() * scaling).view(batch, 1, n_tasks, 1)
    h4.mul_(scales)
    dg4.mul_(scales)
    db_cat = _mm(dy2.t(), h, torch.empty((out_f, tr), dtype=torch.float32, device=x.device), split_k=True)
    db.copy_(db_cat.view(out_f, n_tasks, rank).permute(1, 0, 2))
    _mm(dg, a_cat, dx.view(tokens, in_f))
    _mm(dg.t(), x2, da.view(tr, in_f), split_k=True)
    return dx, da, db, dw
