"""int8 masks in the Triton kernels (layout: softtf_kernels.quant): each mask row's fp32 scale and
offset, read from the row's 8 tail bytes inside the kernel.

The tail is read as one [rows, 8] byte tile and reassembled little-endian, as quant.py writes it,
so any int8 view works: the tail of a row of ``in + 8`` bytes is not 4-byte aligned in general, and
in a strided view the 4 bytes of one float are not even adjacent. No host copy, no extra launch.
(Built with ptxas for sm_90 and sm_80, this form spilled about as little as fp32 loads of
host-prepared scales; eight separate byte vectors spilled several times more in grad input.)
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def qmask_rows(m_base, rows, ok, m_sr, m_sc, IN):
    """(scale, offset), fp32 vectors, of rows ``rows`` (where ``ok``) of the int8 mask at ``m_base``
    with row stride ``m_sr`` and column stride ``m_sc``: row r's entry i is offset + scale * code."""
    j = tl.arange(0, 8)
    # int32 offsets within one mask, as for its codes (the kernels add a task's offset in int64).
    tail = m_base + rows[:, None] * m_sr + (IN + j)[None, :] * m_sc
    byte = tl.load(tail.to(tl.pointer_type(tl.uint8), bitcast=True), mask=ok[:, None], other=0)
    # Byte j goes to bits 8 (j % 4) .. 8 (j % 4) + 7 of word j // 4: disjoint bits, so summing is OR.
    shifted = byte.to(tl.uint32) << ((j % 4) * 8).to(tl.uint32)[None, :]
    words = tl.sum(tl.reshape(shifted, (rows.shape[0], 2, 4)), axis=2)
    scale, offset = tl.split(words.to(tl.float32, bitcast=True))
    return scale, offset


@triton.jit
def dequant(codes, scale, offset, ROWS_AXIS: tl.constexpr):
    """fp32 mask values of an int8 code tile whose mask rows lie along tile axis ROWS_AXIS, from
    those rows' scale and offset (``qmask_rows``): offset + scale * code, as quant.py computes it."""
    if ROWS_AXIS == 0:
        return codes.to(tl.float32) * scale[:, None] + offset[:, None]
    else:
        return codes.to(tl.float32) * scale[None, :] + offset[None, :]
