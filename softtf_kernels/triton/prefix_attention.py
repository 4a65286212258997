"""Triton kernels of the prefix-attention ops (NoRGa's gated prefix tuning; DualPrompt's with
activation "none"), with the signatures of ``softtf_kernels.reference``:

- ``prefix_attention_forward(q, k, v, prefix_k, prefix_v, alpha, tau, activation, scale=None)``
  -> (out, lse). Flash attention: one program per (batch·head, BLOCK_M query rows) keeps its q tile
  in registers and sweeps first the P prefix columns, then the N token columns, BLOCK_N at a time,
  with an online softmax. On the prefix tiles the gate s + α·σ(τ·s) is applied to the score tile
  in registers. Neither the [N, P + N] scores nor the probabilities reach memory; lse (fp32,
  [B, H, N]) is written for the backward.
- ``prefix_attention_backward(grad_out, ..., out, lse, activation, scale=None)`` -> the seven
  gradients. Δ = rowsum(dO ⊙ O) first (one small kernel), then one kernel per key/value set (the
  prefix, then the tokens) with one program per BLOCK_N keys sweeping all query rows (dk, dv; on
  the prefix also the per-program partial sums of dα and dτ, added on the host: deterministic,
  no atomics), and one kernel with one program per BLOCK_M query rows sweeping all keys (dq).
  Probabilities are recomputed from lse: P = exp(s' - lse).

Everything accumulates in fp32; p and dS are rounded to the operand dtype for ``tl.dot`` (as in
flash attention), fp32 operands use the precision of ``get_fp32_precision()`` ("ieee" by default).
Dtypes: float32, float16, bfloat16 (not bf16 under the interpreter); alpha and tau may be any of
the three. D (head dim) up to 256, any D (the tile is padded to a power of two and masked). Any
strides: every tensor is addressed through its own (B, H, N, D) strides, never copied. Outputs are
contiguous. Interpreter (TRITON_INTERPRET=1 when this module is imported): 16-wide tiles.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
import triton.language.standard as _std
from torch import Tensor

from ..common import GATES, attention_scale, new_output
from .host import get_fp32_precision

__all__ = ["prefix_attention_forward", "prefix_attention_backward"]

INTERPRET = bool(triton.knobs.runtime.interpret)
_INTERPRETER_MIXED = INTERPRET and type(_std.cdiv).__name__ != "InterpretedFunction"
_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256


# ------------------------------------------------------------------------------------ device code
@triton.jit
def _gate(s, alpha, tau, ACT: tl.constexpr):
    """(s + α σ(τ s), σ(τ s), σ'(τ s)) in fp32; ACT 1 = sigmoid, 2 = tanh, 3 = exact GELU."""
    z = tau * s
    if ACT == 1:
        a = 1.0 / (1.0 + tl.exp(-z))
        da = a * (1.0 - a)
    elif ACT == 2:
        a = 2.0 / (1.0 + tl.exp(-2.0 * z)) - 1.0
        da = 1.0 - a * a
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        a = z * cdf
        da = cdf + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
    return s + alpha * a, a, da


@triton.jit
def _tile(base, rows, cols, s_row, s_col, ok_rows, ok_cols):
    """A [len(rows), len(cols)] tile read through strides (masked entries 0)."""
    ptrs = base + rows.to(tl.int64)[:, None] * s_row + cols.to(tl.int64)[None, :] * s_col
    return tl.load(ptrs, mask=ok_rows[:, None] & ok_cols[None, :], other=0.0)


@triton.jit
def _fwd_columns(acc, m_i, l_i, q, k_base, v_base, L, k_sn, k_sd, v_sn, v_sd, rd, d_ok, scale, alpha, tau,
                 ACT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online softmax of q's rows over the L columns of one key/value set."""
    for start in range(0, L, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        c_ok = cols < L
        kt = _tile(k_base, rd, cols, k_sd, k_sn, d_ok, c_ok)  # [BLOCK_D, BLOCK_N]
        s = tl.dot(q, kt, input_precision=PRECISION) * scale
        if ACT != 0:
            s, _a, _da = _gate(s, alpha, tau, ACT)
        s = tl.where(c_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        corr = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * corr + tl.sum(p, 1)
        vt = _tile(v_base, cols, rd, v_sn, v_sd, c_ok, d_ok)  # [BLOCK_N, BLOCK_D]
        acc = acc * corr[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def fwd_kernel(q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, alpha_ptr, tau_ptr, o_ptr, lse_ptr,
               H, N, P, D, scale,
               q_sb, q_sh, q_sn, q_sd, k_sb, k_sh, k_sn, k_sd, v_sb, v_sh, v_sn, v_sd,
               pk_sb, pk_sh, pk_sn, pk_sd, pv_sb, pv_sh, pv_sn, pv_sd,
               ACT: tl.constexpr, PRECISION: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, BLOCK_D)
    m_ok, d_ok = rm < N, rd < D
    q = _tile(q_ptr + b * q_sb + h * q_sh, rm, rd, q_sn, q_sd, m_ok, d_ok)
    alpha = tl.load(alpha_ptr).to(tl.float32)
    tau = tl.load(tau_ptr).to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc, m_i, l_i = _fwd_columns(acc, m_i, l_i, q, pk_ptr + b * pk_sb + h * pk_sh, pv_ptr + b * pv_sb + h * pv_sh,
                                 P, pk_sn, pk_sd, pv_sn, pv_sd, rd, d_ok, scale, alpha, tau, ACT, PRECISION, BLOCK_N)
    acc, m_i, l_i = _fwd_columns(acc, m_i, l_i, q, k_ptr + b * k_sb + h * k_sh, v_ptr + b * v_sb + h * v_sh,
                                 N, k_sn, k_sd, v_sn, v_sd, rd, d_ok, scale, alpha, tau, 0, PRECISION, BLOCK_N)
    row = bh.to(tl.int64) * N + rm  # out and lse are contiguous
    o_ptrs = o_ptr + row[:, None] * D + rd[None, :]
    tl.store(o_ptrs, (acc / l_i[:, None]).to(o_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + row, m_i + tl.log(l_i), mask=m_ok)


@triton.jit
def delta_kernel(o_ptr, do_ptr, delta_ptr, H, N, D, o_sb, o_sh, o_sn, o_sd, do_sb, do_sh, do_sn, do_sd,
                 BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Δ[bh, n] = Σ_d dO ⊙ O, fp32."""
    bh = tl.program_id(0)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, BLOCK_D)
    m_ok, d_ok = rm < N, rd < D
    o = _tile(o_ptr + b * o_sb + h * o_sh, rm, rd, o_sn, o_sd, m_ok, d_ok).to(tl.float32)
    do = _tile(do_ptr + b * do_sb + h * do_sh, rm, rd, do_sn, do_sd, m_ok, d_ok).to(tl.float32)
    tl.store(delta_ptr + bh.to(tl.int64) * N + rm, tl.sum(o * do, 1), mask=m_ok)


@triton.jit
def _probs(q, kt, lse, r_ok, c_ok, scale, alpha, tau, ACT: tl.constexpr, PRECISION: tl.constexpr):
    """(P, raw s, σ, σ') of a [BLOCK_M, BLOCK_N] tile from the forward's lse; P = 0 off the tile."""
    s = tl.dot(q, tl.trans(kt), input_precision=PRECISION) * scale
    if ACT != 0:
        sg, a, da = _gate(s, alpha, tau, ACT)
    else:
        sg, a, da = s, s, s  # no gate: a and da are not used
    p = tl.where(r_ok[:, None] & c_ok[None, :], tl.exp(sg - lse[:, None]), 0.0)
    return p, s, a, da


@triton.jit
def bwd_kv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, alpha_ptr, tau_ptr, dk_ptr, dv_ptr, part_ptr,
                  H, N, L, D, scale, N_BLOCKS,
                  q_sb, q_sh, q_sn, q_sd, k_sb, k_sh, k_sn, k_sd, v_sb, v_sh, v_sn, v_sd,
                  do_sb, do_sh, do_sn, do_sd,
                  ACT: tl.constexpr, PRECISION: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dk, dv of BLOCK_N keys of one key/value set of L keys (the prefix with its gate, or the
    tokens), summed over all N query rows; with the gate also part[bh, block] = (dα, dτ) partials."""
    bh = tl.program_id(0)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rd = tl.arange(0, BLOCK_D)
    c_ok, d_ok = cols < L, rd < D
    kt = _tile(k_ptr + b * k_sb + h * k_sh, cols, rd, k_sn, k_sd, c_ok, d_ok)  # [BLOCK_N, BLOCK_D]
    vt = _tile(v_ptr + b * v_sb + h * v_sh, cols, rd, v_sn, v_sd, c_ok, d_ok)
    alpha = tl.load(alpha_ptr).to(tl.float32)
    tau = tl.load(tau_ptr).to(tl.float32)
    q_base, do_base = q_ptr + b * q_sb + h * q_sh, do_ptr + b * do_sb + h * do_sh
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    g_alpha = tl.zeros([BLOCK_N], tl.float32)
    g_tau = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, N, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        r_ok = rows < N
        q = _tile(q_base, rows, rd, q_sn, q_sd, r_ok, d_ok)
        do = _tile(do_base, rows, rd, do_sn, do_sd, r_ok, d_ok)
        lse = tl.load(lse_ptr + bh.to(tl.int64) * N + rows, mask=r_ok, other=0.0)
        delta = tl.load(delta_ptr + bh.to(tl.int64) * N + rows, mask=r_ok, other=0.0)
        p, s, a, da = _probs(q, kt, lse, r_ok, c_ok, scale, alpha, tau, ACT, PRECISION)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        ds = p * (tl.dot(do, tl.trans(vt), input_precision=PRECISION) - delta[:, None])
        if ACT != 0:
            g_alpha += tl.sum(ds * a, 0)
            g_tau += tl.sum(ds * da * s, 0)
            ds = ds * (1.0 + alpha * tau * da)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    out = (bh.to(tl.int64) * L + cols)[:, None] * D + rd[None, :]  # dk, dv contiguous
    ok = c_ok[:, None] & d_ok[None, :]
    tl.store(dk_ptr + out, (dk * scale).to(dk_ptr.dtype.element_ty), mask=ok)
    tl.store(dv_ptr + out, dv.to(dv_ptr.dtype.element_ty), mask=ok)
    if ACT != 0:
        part = part_ptr + (bh.to(tl.int64) * N_BLOCKS + tl.program_id(1)) * 2
        tl.store(part, tl.sum(g_alpha, 0))
        tl.store(part + 1, alpha * tl.sum(g_tau, 0))


@triton.jit
def _dq_columns(dq, q, do, lse, delta, r_ok, k_base, v_base, L, k_sn, k_sd, v_sn, v_sd, rd, d_ok, scale, alpha, tau,
                ACT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    for start in range(0, L, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        c_ok = cols < L
        kt = _tile(k_base, cols, rd, k_sn, k_sd, c_ok, d_ok)
        vt = _tile(v_base, cols, rd, v_sn, v_sd, c_ok, d_ok)
        p, s, a, da = _probs(q, kt, lse, r_ok, c_ok, scale, alpha, tau, ACT, PRECISION)
        ds = p * (tl.dot(do, tl.trans(vt), input_precision=PRECISION) - delta[:, None])
        if ACT != 0:
            ds = ds * (1.0 + alpha * tau * da)
        dq += tl.dot(ds.to(kt.dtype), kt, input_precision=PRECISION)
    return dq


@triton.jit
def bwd_q_kernel(q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, do_ptr, lse_ptr, delta_ptr, alpha_ptr, tau_ptr, dq_ptr,
                 H, N, P, D, scale,
                 q_sb, q_sh, q_sn, q_sd, k_sb, k_sh, k_sn, k_sd, v_sb, v_sh, v_sn, v_sd,
                 pk_sb, pk_sh, pk_sn, pk_sd, pv_sb, pv_sh, pv_sn, pv_sd, do_sb, do_sh, do_sn, do_sd,
                 ACT: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dq of BLOCK_M query rows over the prefix (gated) and token columns."""
    bh = tl.program_id(0)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, BLOCK_D)
    m_ok, d_ok = rm < N, rd < D
    q = _tile(q_ptr + b * q_sb + h * q_sh, rm, rd, q_sn, q_sd, m_ok, d_ok)
    do = _tile(do_ptr + b * do_sb + h * do_sh, rm, rd, do_sn, do_sd, m_ok, d_ok)
    row = bh.to(tl.int64) * N + rm
    lse = tl.load(lse_ptr + row, mask=m_ok, other=0.0)
    delta = tl.load(delta_ptr + row, mask=m_ok, other=0.0)
    alpha = tl.load(alpha_ptr).to(tl.float32)
    tau = tl.load(tau_ptr).to(tl.float32)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dq = _dq_columns(dq, q, do, lse, delta, m_ok, pk_ptr + b * pk_sb + h * pk_sh, pv_ptr + b * pv_sb + h * pv_sh,
                     P, pk_sn, pk_sd, pv_sn, pv_sd, rd, d_ok, scale, alpha, tau, ACT, PRECISION, BLOCK_N)
    dq = _dq_columns(dq, q, do, lse, delta, m_ok, k_ptr + b * k_sb + h * k_sh, v_ptr + b * v_sb + h * v_sh,
                     N, k_sn, k_sd, v_sn, v_sd, rd, d_ok, scale, alpha, tau, 0, PRECISION, BLOCK_N)
    tl.store(dq_ptr + row[:, None] * D + rd[None, :], (dq * scale).to(dq_ptr.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])


# ------------------------------------------------------------------------------------ host code
def _check(op: str, device: torch.device, head_dim: int, **tensors: Tensor) -> None:
    where = f"softtf_kernels.triton.{op}"
    if _INTERPRETER_MIXED:
        raise RuntimeError(f"{where}: TRITON_INTERPRET=1 was set after triton had been imported; set it "
                           "before anything imports triton")
    if (device.type == "cpu") != INTERPRET:
        raise RuntimeError(f"{where}: these kernels were built for {'the CPU interpreter' if INTERPRET else 'a GPU'} "
                           f"(TRITON_INTERPRET when this module was imported) but got {device} tensors")
    for name, t in tensors.items():
        if t.dtype not in _SUPPORTED or (INTERPRET and t.dtype == torch.bfloat16):
            allowed = "float32 or float16 (the CPU interpreter has no bfloat16)" if INTERPRET else \
                "float32, float16 or bfloat16"
            raise TypeError(f"{where}: {name} must be {allowed}, got {t.dtype} (use the reference backend "
                            "for other dtypes)")
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"{where}: head dim D = {head_dim} exceeds the kernel's maximum of {MAX_HEAD_DIM} "
                         "(use the reference backend)")


# (BLOCK_M, BLOCK_N, num_warps) per kernel, by operand width and padded head dim. Chosen with
# ptxas (triton 3.8, sm_90 and sm_80, no GPU run): the largest tiles that compile without register
# spills. fp32 ("ieee" FMA dots) needs small tiles; its dk/dv kernel still spills a little
# (~70 bytes at D <= 128, ~2 KiB at D = 256) on every tile tried. Not timed on a GPU.
_GPU_TILES = {  # (16-bit operands?, BLOCK_D cap) -> {kernel: (BLOCK_M, BLOCK_N, num_warps)}
    (True, 64): {"fwd": (128, 64, 8), "kv": (32, 32, 8), "q": (64, 64, 8)},
    (True, 128): {"fwd": (64, 64, 8), "kv": (32, 32, 8), "q": (32, 32, 8)},
    (True, 256): {"fwd": (32, 32, 8), "kv": (32, 32, 8), "q": (32, 32, 8)},
    (False, 64): {"fwd": (32, 32, 4), "kv": (16, 16, 8), "q": (32, 32, 4)},
    (False, 128): {"fwd": (16, 16, 4), "kv": (16, 16, 8), "q": (16, 16, 4)},
    (False, 256): {"fwd": (16, 16, 8), "kv": (16, 16, 8), "q": (16, 16, 8)},
}


def _config(kernel: str, head_dim: int, dtype: torch.dtype) -> dict:
    block_d = max(16, triton.next_power_of_2(head_dim))
    if INTERPRET:  # small tiles: fast in numpy, and N, P = 17.. cover the tails
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=block_d)
    bm, bn, warps = _GPU_TILES[(dtype != torch.float32, max(block_d, 64))][kernel]
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, num_warps=warps, num_stages=2)


def _strides(t: Tensor) -> tuple[int, ...]:
    return tuple(t.stride())


def _device_ctx(t: Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _act(activation: str) -> int:
    return GATES.index(activation)  # none 0, sigmoid 1, tanh 2, gelu 3


def _precision(dtype: torch.dtype) -> str:
    return get_fp32_precision() if dtype == torch.float32 else "ieee"


def prefix_attention_forward(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor, alpha: Tensor,
                             tau: Tensor, activation: str, scale: float | None = None) -> tuple[Tensor, Tensor]:
    b, h, n, d = q.shape
    _check("prefix_attention_forward", q.device, d, q=q, k=k, v=v, prefix_k=prefix_k, prefix_v=prefix_v,
           alpha=alpha, tau=tau)
    out = new_output((b, h, n, d), q.dtype, q.device)
    lse = new_output((b, h, n), torch.float32, q.device)
    if b * h == 0:
        return out, lse
    cfg = _config("fwd", d, q.dtype)
    with _device_ctx(q):
        fwd_kernel[(b * h, triton.cdiv(n, cfg["BLOCK_M"]))](
            q, k, v, prefix_k, prefix_v, alpha, tau, out, lse,
            h, n, prefix_k.shape[2], d, attention_scale(q, scale),
            *_strides(q), *_strides(k), *_strides(v), *_strides(prefix_k), *_strides(prefix_v),
            ACT=_act(activation), PRECISION=_precision(q.dtype), **cfg,
        )
    return out, lse


def prefix_attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
                              alpha: Tensor, tau: Tensor, out: Tensor, lse: Tensor, activation: str,
                              scale: float | None = None) -> tuple[Tensor, ...]:
    b, h, n, d = q.shape
    n_prefix = prefix_k.shape[2]
    _check("prefix_attention_backward", q.device, d, grad_out=grad_out, q=q, k=k, v=v, prefix_k=prefix_k,
           prefix_v=prefix_v, alpha=alpha, tau=tau, out=out)
    grads = [new_output(t.shape, t.dtype, t.device) for t in (q, k, v, prefix_k, prefix_v)]
    dq, dk, dv, dpk, dpv = grads
    dalpha, dtau = torch.zeros_like(alpha), torch.zeros_like(tau)
    if b * h == 0:
        return (*(g.zero_() for g in grads), dalpha, dtau)
    kv_cfg, q_cfg = _config("kv", d, q.dtype), _config("q", d, q.dtype)
    sc, act, precision = attention_scale(q, scale), _act(activation), _precision(q.dtype)
    lse = lse.contiguous()  # [B, H, N] fp32: read as rows bh * N + n
    delta = new_output((b, h, n), torch.float32, q.device)
    m_blocks = triton.cdiv(n, q_cfg["BLOCK_M"])
    p_blocks = triton.cdiv(n_prefix, kv_cfg["BLOCK_N"])
    part = new_output((b * h, max(p_blocks, 1), 2), torch.float32, q.device)
    with _device_ctx(q):
        delta_kernel[(b * h, triton.cdiv(n, 16))](out, grad_out, delta, h, n, d, *_strides(out), *_strides(grad_out),
                                                  BLOCK_M=16, BLOCK_D=q_cfg["BLOCK_D"])
        for kk, vv, dkk, dvv, length, gate in ((k, v, dk, dv, n, 0), (prefix_k, prefix_v, dpk, dpv, n_prefix, act)):
            if length == 0:
                continue
            bwd_kv_kernel[(b * h, triton.cdiv(length, kv_cfg["BLOCK_N"]))](
                q, kk, vv, grad_out, lse, delta, alpha, tau, dkk, dvv, part,
                h, n, length, d, sc, p_blocks,
                *_strides(q), *_strides(kk), *_strides(vv), *_strides(grad_out),
                ACT=gate, PRECISION=precision, **kv_cfg,
            )
        bwd_q_kernel[(b * h, m_blocks)](
            q, k, v, prefix_k, prefix_v, grad_out, lse, delta, alpha, tau, dq,
            h, n, n_prefix, d, sc,
            *_strides(q), *_strides(k), *_strides(v), *_strides(prefix_k), *_strides(prefix_v), *_strides(grad_out),
            ACT=act, PRECISION=precision, **q_cfg,
        )
    if act != 0 and n_prefix > 0:
        sums = part.sum((0, 1))
        dalpha, dtau = sums[0].to(alpha.dtype), sums[1].to(tau.dtype)
    return dq, dk, dv, dpk, dpv, dalpha, dtau
