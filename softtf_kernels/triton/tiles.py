"""Tile-level building blocks (jit functions) of the masked-linear kernels in ``kernels.py``:
addressing the rows of an activation seen as ``[ROWS, F]``, and the fp32 dy^T x tile the dM and
Gradient-ID kernels share. (int8 mask rows: ``qmask.py``.)"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def row_offsets(rows, L1, S0, S1, FLAT: tl.constexpr):
    """Offsets of rows ``rows``: (r // L1) * S0 + (r % L1) * S1, or r * S1 when FLAT (host.py _rows)."""
    # int64: activations of big batches exceed 2^31 elements long before W does.
    r = rows.to(tl.int64)
    if FLAT:
        return r * S1
    else:
        return (r // L1) * S0 + (r % L1) * S1


@triton.jit
def tokens_gemm(dy_ptr, x_ptr, t_start, t_end, rn, n_ok, rk, k_ok,
                dy_l1, dy_s0, dy_s1, dy_sn, x_l1, x_s0, x_s1, x_sk,
                DY_FLAT: tl.constexpr, X_FLAT: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr):
    """fp32 tile of dy^T x over tokens [t_start, t_end): [BLOCK_N (out), BLOCK_K (in)]."""
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    dy_cols = rn[:, None] * dy_sn
    x_cols = rk[None, :] * x_sk
    for t0 in range(t_start, t_end, BLOCK_T):
        rt = t0 + tl.arange(0, BLOCK_T)
        t_ok = rt < t_end
        dy_rows = row_offsets(rt, dy_l1, dy_s0, dy_s1, DY_FLAT)
        x_rows = row_offsets(rt, x_l1, x_s0, x_s1, X_FLAT)
        dyt = tl.load(dy_ptr + dy_cols + dy_rows[None, :], mask=n_ok[:, None] & t_ok[None, :], other=0.0)
        xt = tl.load(x_ptr + x_rows[:, None] + x_cols, mask=t_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(dyt, xt, acc, input_precision=PRECISION)
    return acc
