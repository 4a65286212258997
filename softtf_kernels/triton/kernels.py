"""Triton kernels of the softtf ops (the jit functions and their autotune configs).

The Python wrappers that allocate outputs, flatten leading dims and launch these live in
``host.py``. Layout conventions used below:

- A "row" operand (x, grad_out) is seen as ``[ROWS, F]`` without a copy. Its leading dims are
  collapsed on the host into at most two levels, so row ``r`` lives at
  ``(r // L1) * S0 + (r % L1) * S1`` (``FLAT``: ``r * S1``). This covers every 2-D/3-D view
  (transposed, sliced, expanded) of an activation without ``.contiguous()``.
- W and the masks are addressed through their own strides; the backward reads them
  transposed by swapping the strides, never by copying.
- Every accumulation is fp32. The masked weight ``W * M`` is formed in fp32 in registers, one
  tile at a time, and cast to the operand dtype right before ``tl.dot``: it never exists in
  memory, in full or in part.
- An int8 mask (``softtf_kernels.quant``) is read as its codes, dequantized in registers with
  its rows' scale and offset (``qmask.py``); ``QMASK`` (constexpr) says which tile axis its
  rows lie along.
"""
from __future__ import annotations

import triton
import triton.language as tl
import triton.language.standard as _std

from .qmask import dequant, qmask_rows
from .tiles import row_offsets, tokens_gemm

# Whether these kernels were built for the CPU interpreter (decided by triton at decoration,
# from TRITON_INTERPRET): then every autotuned kernel gets exactly one small config.
INTERPRET = bool(triton.knobs.runtime.interpret)
# triton decorates its own library functions (tl.cdiv, reduction combiners) once, at
# `import triton`. If TRITON_INTERPRET=1 was set only after that, interpreted kernels would fail
# deep inside triton; the wrappers raise a clear error instead.
INTERPRETER_MIXED = INTERPRET and type(_std.cdiv).__name__ != "InterpretedFunction"


# ------------------------------------------------------------------------------------ configs
def _cfg(num_warps, num_stages, **meta):
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


# Output tile [BLOCK_M, BLOCK_N], reduction step BLOCK_K. 16-bit operands (tensor cores: wgmma on
# H100, mma.sync on A100). Big tiles for the compute-bound ViT/BERT GEMMs, small ones for few rows.
# Checked by compiling every config for sm_90 and sm_80 with ptxas (registers, spills, shared
# memory): 128x128 tiles need 8 warps (4 warps spill: the fp32 accumulator plus the W*M product),
# and tiles above 128x128 are kept for sm_90 only (they spill under mma.sync on sm_80).
_MM_CONFIGS_16 = [
    _cfg(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, MASKED_FIRST=False),
    _cfg(8, 3, BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, MASKED_FIRST=False),
    _cfg(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, MASKED_FIRST=False),
    _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, MASKED_FIRST=False),
    _cfg(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, MASKED_FIRST=False),
    _cfg(4, 4, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, MASKED_FIRST=False),
    _cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, MASKED_FIRST=False),
    _cfg(4, 5, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, MASKED_FIRST=False),
    _cfg(4, 5, BLOCK_M=32, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, MASKED_FIRST=False),
    _cfg(2, 5, BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, MASKED_FIRST=False),
    _cfg(2, 4, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, MASKED_FIRST=False),
    # The same big tiles computing C^T (masked tile as the dot's first operand; see the kernel).
    _cfg(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, MASKED_FIRST=True),
    _cfg(8, 3, BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, MASKED_FIRST=True),
    _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, MASKED_FIRST=True),
    _cfg(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, MASKED_FIRST=True),
]
# fp32 operands: twice the bytes per element and (ieee) FMA instead of tensor cores -> smaller K.
_MM_CONFIGS_32 = [
    _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, MASKED_FIRST=False),
    _cfg(4, 3, BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, MASKED_FIRST=False),
    _cfg(4, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, MASKED_FIRST=False),
    _cfg(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, MASKED_FIRST=False),
    _cfg(2, 4, BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, MASKED_FIRST=False),
    _cfg(2, 4, BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, MASKED_FIRST=False),
    _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, MASKED_FIRST=True),
    _cfg(4, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, MASKED_FIRST=True),
]
# Output tile [BLOCK_N (out), BLOCK_K (in)] of dy^T x, reduction over tokens in BLOCK_T steps.
_GM_CONFIGS_16 = [
    _cfg(8, 3, BLOCK_N=128, BLOCK_K=256, BLOCK_T=64, GROUP_N=8),
    _cfg(8, 3, BLOCK_N=128, BLOCK_K=128, BLOCK_T=64, GROUP_N=8),
    _cfg(4, 4, BLOCK_N=128, BLOCK_K=128, BLOCK_T=64, GROUP_N=8),
    _cfg(4, 4, BLOCK_N=128, BLOCK_K=128, BLOCK_T=32, GROUP_N=8),
    _cfg(4, 4, BLOCK_N=64, BLOCK_K=128, BLOCK_T=64, GROUP_N=8),
    _cfg(4, 4, BLOCK_N=128, BLOCK_K=64, BLOCK_T=64, GROUP_N=8),
    _cfg(4, 5, BLOCK_N=64, BLOCK_K=64, BLOCK_T=64, GROUP_N=8),
    _cfg(4, 5, BLOCK_N=64, BLOCK_K=64, BLOCK_T=32, GROUP_N=8),
]
_GM_CONFIGS_32 = [
    _cfg(8, 3, BLOCK_N=128, BLOCK_K=128, BLOCK_T=32, GROUP_N=8),
    _cfg(4, 3, BLOCK_N=64, BLOCK_K=128, BLOCK_T=32, GROUP_N=8),
    _cfg(4, 3, BLOCK_N=128, BLOCK_K=64, BLOCK_T=32, GROUP_N=8),
    _cfg(4, 4, BLOCK_N=64, BLOCK_K=64, BLOCK_T=32, GROUP_N=8),
    _cfg(4, 4, BLOCK_N=64, BLOCK_K=64, BLOCK_T=16, GROUP_N=8),
]
# Gradient-ID: the dy^T x tile, then T reductions against mask tiles; keep the tile moderate
# (it stays live in registers across the mask loop alongside G*W).
_MIX_CONFIGS_16 = [
    _cfg(8, 3, BLOCK_N=128, BLOCK_K=128, BLOCK_T=64),
    _cfg(4, 4, BLOCK_N=128, BLOCK_K=64, BLOCK_T=64),
    _cfg(4, 4, BLOCK_N=64, BLOCK_K=128, BLOCK_T=64),
    _cfg(4, 4, BLOCK_N=64, BLOCK_K=64, BLOCK_T=64),
    _cfg(4, 4, BLOCK_N=64, BLOCK_K=64, BLOCK_T=32),
    _cfg(4, 4, BLOCK_N=32, BLOCK_K=64, BLOCK_T=32),
]
_MIX_CONFIGS_32 = [
    _cfg(8, 3, BLOCK_N=128, BLOCK_K=64, BLOCK_T=32),
    _cfg(4, 3, BLOCK_N=64, BLOCK_K=64, BLOCK_T=32),
    _cfg(4, 4, BLOCK_N=64, BLOCK_K=64, BLOCK_T=16),
    _cfg(4, 4, BLOCK_N=32, BLOCK_K=64, BLOCK_T=32),
]

if INTERPRET:
    # One small config: the interpreter is slow, and 32-wide tiles still exercise every tail
    # path (tests use in=67, out=45, ...). The GPU lists above stay importable for tests.
    MM_CONFIGS = [_cfg(4, 1, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, MASKED_FIRST=False)]
    GM_CONFIGS = [_cfg(4, 1, BLOCK_N=32, BLOCK_K=32, BLOCK_T=32, GROUP_N=4)]
    MIX_CONFIGS = [_cfg(4, 1, BLOCK_N=32, BLOCK_K=32, BLOCK_T=32)]
else:
    MM_CONFIGS = _MM_CONFIGS_16 + _MM_CONFIGS_32
    GM_CONFIGS = _GM_CONFIGS_16 + _GM_CONFIGS_32
    MIX_CONFIGS = _MIX_CONFIGS_16 + _MIX_CONFIGS_32
_FP32_ONLY = {id(c) for c in _MM_CONFIGS_32 + _GM_CONFIGS_32 + _MIX_CONFIGS_32} - {
    id(c) for c in _MM_CONFIGS_16 + _GM_CONFIGS_16 + _MIX_CONFIGS_16
}
_FP16_ONLY = {id(c) for c in _MM_CONFIGS_16 + _GM_CONFIGS_16 + _MIX_CONFIGS_16} - {
    id(c) for c in _MM_CONFIGS_32 + _GM_CONFIGS_32 + _MIX_CONFIGS_32
}

_DEVICE_CACHE: dict = {}


def _device_info(t) -> tuple[int, int]:
    """(shared memory per block, opt-in; compute capability major) of the tensor's GPU:
    ~227 KiB and 9 on H100, ~163 KiB and 8 on A100."""
    dev = t.device.index if t.device.index is not None else 0
    if dev not in _DEVICE_CACHE:
        try:
            props = triton.runtime.driver.active.utils.get_device_properties(dev)
            import torch

            _DEVICE_CACHE[dev] = (int(props["max_shared_mem"]), torch.cuda.get_device_capability(dev)[0])
        except Exception:  # pragma: no cover - unknown driver: do not prune on smem
            _DEVICE_CACHE[dev] = (1 << 30, 9)
    return _DEVICE_CACHE[dev]


def _cap(n: int) -> int:
    return max(16, triton.next_power_of_2(max(int(n), 1)))


def _prune(configs, nargs, a_name, w_name, m_name, dims, smem_fn):
    """Keep configs for the operand width whose tiles fit the problem and shared memory.

    ``dims`` maps a block name to the extent it tiles; blocks much larger than that extent only
    add masked-out work. ``smem_fn(cfg, a_bytes, w_bytes, m_bytes)`` estimates the pipelined
    shared memory of a config (loads are multi-buffered ``num_stages`` deep).
    """
    a, w, m = nargs[a_name], nargs[w_name], nargs[m_name]
    wide = a.dtype.itemsize == 4
    drop = _FP16_ONLY if wide else _FP32_ONLY
    limit, major = _device_info(a)
    kept = []
    for cfg in configs:
        if id(cfg) in drop:
            continue
        if any(cfg.kwargs[name] > _cap(nargs[ext]) for name, ext in dims.items()):
            continue
        blocks = [v for k, v in cfg.kwargs.items() if k.startswith("BLOCK")]
        if major < 9 and blocks[0] * blocks[1] > 128 * 128:
            continue
        if smem_fn(cfg, a.element_size(), w.element_size(), m.element_size(), major) > limit:
            continue
        kept.append(cfg)
    if not kept:  # tiny problem: the smallest tiles of the right width (that fit, if any do)
        pool = [c for c in configs if id(c) not in drop] or list(configs)
        fits = [c for c in pool if smem_fn(c, a.element_size(), w.element_size(), m.element_size(), major) <= limit]
        kept = [min(fits or pool, key=lambda c: (sum(v for k, v in c.kwargs.items() if k.startswith("BLOCK")),
                                                 c.num_warps))]
    return kept


def _mm_smem(cfg, a_b, w_b, m_b, major=9):
    bm, bn, bk = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
    # Matches what triton 3.8 allocates (checked with ptxas builds): num_stages-1 buffers of the A,
    # W and mask tiles; on sm_90 also the wgmma operand buffers (A and the W*M product). MASKED_FIRST
    # keeps the product in registers, so for it this over-counts: a conservative prune.
    smem = (cfg.num_stages - 1) * (bm * bk * a_b + bk * bn * (w_b + m_b))
    return smem + ((bm * bk + bk * bn) * a_b if major >= 9 else 0)


def _gm_smem(cfg, a_b, w_b, m_b, major=9):
    bn, bk, bt = cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"], cfg.kwargs["BLOCK_T"]
    return cfg.num_stages * (bn * bt + bt * bk) * a_b


def _mm_prune(configs, nargs, **kwargs):
    return _prune(configs, nargs, "a_ptr", "w_ptr", "m_ptr",
                  {"BLOCK_M": "ROWS", "BLOCK_N": "N", "BLOCK_K": "K"}, _mm_smem)


def _gm_prune(configs, nargs, **kwargs):
    return _prune(configs, nargs, "x_ptr", "w_ptr", "x_ptr",
                  {"BLOCK_N": "N", "BLOCK_K": "K", "BLOCK_T": "CHUNK"}, _gm_smem)


def _mix_prune(configs, nargs, **kwargs):
    return _prune(configs, nargs, "x_ptr", "w_ptr", "masks_ptr",
                  {"BLOCK_N": "N", "BLOCK_K": "K", "BLOCK_T": "CHUNK"}, _gm_smem)


# ------------------------------------------------------------------------------------ kernels
@triton.autotune(
    configs=MM_CONFIGS,
    key=["ROWS_KEY", "N", "K", "W_RED_CONTIG"],
    prune_configs_by={"early_config_prune": _mm_prune},
)
@triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})
@triton.jit
def masked_mm_kernel(
    a_ptr, w_ptr, m_ptr, bias_ptr, tid_ptr, c_ptr,
    ROWS, N, K, N_GROUPS,
    a_l1, a_s0, a_s1, a_sk,
    w_sk, w_sn,
    m_st, m_sk, m_sn,
    bias_s, c_sm, c_sn,
    ROWS_KEY, W_RED_CONTIG,  # autotune keys only
    A_FLAT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_TASKS: tl.constexpr,
    PRECISION: tl.constexpr, EVEN_K: tl.constexpr, QMASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    MASKED_FIRST: tl.constexpr,
):
    """C[r, n] = sum_k A[r, k] * (W ⊙ M)[k, n] (+ bias[n]), W/M read through (w_sk, w_sn).

    Forward: A = x, (W ⊙ M)[k, n] = W[n, k] M[n, k]. Grad input: A = dy and the strides are
    swapped so the same code reads (W ⊙ M) untransposed. With HAS_TASKS the rows form N_GROUPS
    groups (samples) of ROWS rows each and group g uses masks[tid[g]] (mixed-task batches);
    otherwise there is one group of ROWS rows. QMASK: 0 a float mask; 1 an int8 mask, rows along N
    (forward); 2 an int8 mask, rows along K (grad input, columns N = in, its tail after them).
    """
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(ROWS, BLOCK_M)
    num_pid_m = N_GROUPS * tiles_m
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # GROUP_M swizzle: consecutive programs sweep GROUP_M row tiles per column tile, so the
    # A rows and the W/M column tiles they share stay in L2.
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    size_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m

    g = pid_m // tiles_m
    local = (pid_m % tiles_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = local < ROWS
    rows = g * ROWS + local
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = rn < N
    rk = tl.arange(0, BLOCK_K)

    if HAS_TASKS:
        m_base = m_ptr + tl.load(tid_ptr + g).to(tl.int64) * m_st
    else:
        m_base = m_ptr
    a_rows = row_offsets(rows, a_l1, a_s0, a_s1, A_FLAT)
    if QMASK == 1:  # int8 forward: the mask rows are the output columns, one scale/offset for all K
        ns, no = qmask_rows(m_base, rn, col_ok, m_sn, m_sk, K)
    if MASKED_FIRST:
        # C^T = (W ⊙ M) A^T: the masked tile, made in registers, is the dot's first operand, which
        # Hopper's wgmma may take from registers; as the second operand it must go through shared
        # memory first. Measured faster on an H100 for most shapes, not all: autotuning picks.
        at_ptrs = a_ptr + a_rows[None, :] + rk[:, None] * a_sk
        w_ptrs = w_ptr + rn[:, None] * w_sn + rk[None, :] * w_sk
        mk_ptrs = m_base + rn[:, None] * m_sn + rk[None, :] * m_sk
        acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for kt in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                at = tl.load(at_ptrs, mask=row_ok[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=col_ok[:, None], other=0.0)
                mk = tl.load(mk_ptrs, mask=col_ok[:, None], other=0.0)
            else:
                k_ok = rk < K - kt * BLOCK_K
                at = tl.load(at_ptrs, mask=k_ok[:, None] & row_ok[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
                mk = tl.load(mk_ptrs, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            if QMASK == 2:  # int8 grad input: the mask rows are this step's reduction rows
                ns, no = qmask_rows(m_base, kt * BLOCK_K + rk, rk < K - kt * BLOCK_K, m_sk, m_sn, N)
            if QMASK != 0:
                mk = dequant(mk, ns, no, QMASK - 1)  # tile [N, K]: rows on axis 0 forward, 1 grad input
            # The fusion: W ⊙ M in fp32 registers, rounded once to the operand dtype.
            bt = (w.to(tl.float32) * mk.to(tl.float32)).to(at.dtype)
            acc_t = tl.dot(bt, at, acc_t, input_precision=PRECISION)
            at_ptrs += BLOCK_K * a_sk
            w_ptrs += BLOCK_K * w_sk
            mk_ptrs += BLOCK_K * m_sk
        acc = tl.trans(acc_t)
    else:
        a_ptrs = a_ptr + a_rows[:, None] + rk[None, :] * a_sk
        w_ptrs = w_ptr + rk[:, None] * w_sk + rn[None, :] * w_sn
        mk_ptrs = m_base + rk[:, None] * m_sk + rn[None, :] * m_sn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kt in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
                w = tl.load(w_ptrs, mask=col_ok[None, :], other=0.0)
                mk = tl.load(mk_ptrs, mask=col_ok[None, :], other=0.0)
            else:
                k_ok = rk < K - kt * BLOCK_K
                a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                mk = tl.load(mk_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if QMASK == 2:
                ns, no = qmask_rows(m_base, kt * BLOCK_K + rk, rk < K - kt * BLOCK_K, m_sk, m_sn, N)
            if QMASK != 0:
                mk = dequant(mk, ns, no, 2 - QMASK)  # tile [K, N]: rows on axis 1 forward, 0 grad input
            b = (w.to(tl.float32) * mk.to(tl.float32)).to(a.dtype)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
            a_ptrs += BLOCK_K * a_sk
            w_ptrs += BLOCK_K * w_sk
            mk_ptrs += BLOCK_K * m_sk

    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn * bias_s, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + rows.to(tl.int64)[:, None] * c_sm + rn[None, :] * c_sn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.autotune(
    configs=GM_CONFIGS,
    key=["TOK_KEY", "N", "K", "SPLIT"],
    prune_configs_by={"early_config_prune": _gm_prune},
)
@triton.jit
def grad_mask_kernel(
    dy_ptr, x_ptr, w_ptr, out_ptr,
    TOKENS, N, K, CHUNK, SPLIT,
    dy_l1, dy_s0, dy_s1, dy_sn,
    x_l1, x_s0, x_s1, x_sk,
    w_sn, w_sk,
    o_ss, o_sn, o_sk,
    TOK_KEY,  # autotune key only
    DY_FLAT: tl.constexpr, X_FLAT: tl.constexpr, PARTIAL: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr, GROUP_N: tl.constexpr,
):
    """dM[n, k] = W[n, k] * sum_t dy[t, n] x[t, k]: one [BLOCK_N, BLOCK_K] tile per program.

    Axis 1 splits the tokens into SPLIT chunks of CHUNK rows. PARTIAL (SPLIT > 1): write the raw
    fp32 chunk sum to out[s]; ``split_reduce_kernel`` adds the chunks and applies W. Otherwise
    W is applied here and the tile is written in the output (mask) dtype.
    """
    pid = tl.program_id(0)
    s = tl.program_id(1)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_k = tl.cdiv(K, BLOCK_K)
    width = GROUP_N * num_pid_k
    first_n = (pid // width) * GROUP_N
    size_n = min(num_pid_n - first_n, GROUP_N)
    pid_n = first_n + (pid % width) % size_n
    pid_k = (pid % width) // size_n

    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok = rn < N
    k_ok = rk < K
    t_start = s * CHUNK
    t_end = min(t_start + CHUNK, TOKENS)
    acc = tokens_gemm(dy_ptr, x_ptr, t_start, t_end, rn, n_ok, rk, k_ok,
                      dy_l1, dy_s0, dy_s1, dy_sn, x_l1, x_s0, x_s1, x_sk,
                      DY_FLAT, X_FLAT, PRECISION, BLOCK_N, BLOCK_K, BLOCK_T)
    ok = n_ok[:, None] & k_ok[None, :]
    o_ptrs = out_ptr + s.to(tl.int64) * o_ss + rn[:, None] * o_sn + rk[None, :] * o_sk
    if PARTIAL:
        tl.store(o_ptrs, acc, mask=ok)
    else:
        w = tl.load(w_ptr + rn[:, None] * w_sn + rk[None, :] * w_sk, mask=ok, other=0.0)
        tl.store(o_ptrs, (acc * w.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def split_reduce_kernel(part_ptr, w_ptr, out_ptr, SPLIT, NK, K, w_sn, w_sk, BLOCK: tl.constexpr):
    """out[n, k] = W[n, k] * sum_s part[s, n, k] (deterministic split-K epilogue)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < NK
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    p = part_ptr + offs
    for _ in range(0, SPLIT):  # pointer steps, so SPLIT * NK may exceed 2^31
        acc += tl.load(p, mask=ok, other=0.0)
        p += NK
    w = tl.load(w_ptr + (offs // K) * w_sn + (offs % K) * w_sk, mask=ok, other=0.0)
    tl.store(out_ptr + offs, (acc * w.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=ok)


@triton.autotune(
    configs=MIX_CONFIGS,
    key=["TOK_KEY", "N", "K", "T"],
    prune_configs_by={"early_config_prune": _mix_prune},
)
@triton.jit
def mixture_grad_kernel(
    dy_ptr, x_ptr, w_ptr, masks_ptr, part_ptr,
    TOKENS, N, K, T, CHUNK,
    dy_l1, dy_s0, dy_s1, dy_sn,
    x_l1, x_s0, x_s1, x_sk,
    w_sn, w_sk,
    m_st, m_sn, m_sk,
    TOK_KEY,  # autotune key only
    DY_FLAT: tl.constexpr, X_FLAT: tl.constexpr, PRECISION: tl.constexpr, QMASK: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """part[g, t, tile] = sum_{tile} (dy_g^T x_g) ⊙ W ⊙ M_t for token group g.

    Axis 0 = token group (a sample when per_sample, else a split-K chunk) and varies fastest,
    so the programs resident together share one (out, in) tile of W and of the T masks in L2.
    Each program forms G = dy_g^T x_g for its tile in registers, multiplies by W once, then
    reads each of the T mask tiles once. Neither dy^T x nor W ⊙ M_t ever reaches memory.
    """
    g = tl.program_id(0)
    tile = tl.program_id(1)
    n_tiles = tl.num_programs(1)
    num_pid_k = tl.cdiv(K, BLOCK_K)
    pid_n = tile // num_pid_k
    pid_k = tile % num_pid_k
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok = rn < N
    k_ok = rk < K
    t_start = g * CHUNK
    t_end = min(t_start + CHUNK, TOKENS)
    acc = tokens_gemm(dy_ptr, x_ptr, t_start, t_end, rn, n_ok, rk, k_ok,
                      dy_l1, dy_s0, dy_s1, dy_sn, x_l1, x_s0, x_s1, x_sk,
                      DY_FLAT, X_FLAT, PRECISION, BLOCK_N, BLOCK_K, BLOCK_T)
    ok = n_ok[:, None] & k_ok[None, :]
    tile_off = rn[:, None] * m_sn + rk[None, :] * m_sk
    gw = acc * tl.load(w_ptr + rn[:, None] * w_sn + rk[None, :] * w_sk, mask=ok, other=0.0).to(tl.float32)
    out = part_ptr + g.to(tl.int64) * T * n_tiles + tile
    for t in range(0, T):
        mk = tl.load(masks_ptr + t * m_st + tile_off, mask=ok, other=0.0)
        if QMASK:  # int8: each task's rows have their own scale/offset
            ms, mo = qmask_rows(masks_ptr + t * m_st, rn, n_ok, m_sn, m_sk, K)
            mk = dequant(mk, ms, mo, 0)
        mk = mk.to(tl.float32)
        tl.store(out + t * n_tiles, tl.sum(tl.sum(gw * mk, axis=1), axis=0))
