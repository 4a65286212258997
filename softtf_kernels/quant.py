"""int8 frozen masks: one byte per entry plus a per-output-row scale and offset.

A learned soft mask sits in a narrow band (Soft-TF's masks start in U(0.99, 1) and stay near it), so
``M[o, i] ≈ offset[o] + scale[o] · q[o, i]`` with ``q`` in [-127, 127] loses little. A quantized
mask is ONE int8 tensor, so it travels through every op, file and layer as a float mask does:

    mask  [out, in + 8]  int8     row o = q[o, 0..in-1], then scale[o] (fp32), offset[o] (fp32)
    masks [T, out, in + 8] int8   one such mask per task

The 8 tail bytes of a row hold the two fp32 numbers in the machine's byte order (little-endian on
every platform torch supports). Kernels read the codes and the row's two numbers and dequantize in
registers (``offset + scale · q`` in fp32); nothing dequantizes a whole mask in memory, except
:func:`dequantize_mask` here and the float64 reference, the oracle.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["QMASK_DTYPE", "QMASK_TAIL", "QMASK_LEVELS", "quantize_mask", "dequantize_mask", "mask_codes",
           "mask_scale_offset", "is_quantized", "mask_in_features"]

QMASK_DTYPE = torch.int8
QMASK_TAIL = 8  # bytes after each row's codes: fp32 scale, fp32 offset
QMASK_LEVELS = 127  # codes span [-127, 127]: symmetric around the row's mid-range


def is_quantized(mask: Tensor) -> bool:
    return mask.dtype == QMASK_DTYPE


def mask_in_features(mask: Tensor) -> int:
    """The in-features a mask covers (its last dim, less the tail for an int8 mask)."""
    return mask.shape[-1] - QMASK_TAIL if is_quantized(mask) else mask.shape[-1]


def quantize_mask(mask: Tensor) -> Tensor:
    """A float mask [..., out, in] as an int8 mask [..., out, in + 8]: per row, offset = (max + min)/2
    and scale = (max - min)/254, so every entry is within scale/2 of its original (a constant row
    is exact). Computed in float64."""
    if not isinstance(mask, Tensor) or not mask.is_floating_point():
        raise TypeError(f"quantize_mask: mask must be a floating-point Tensor, got "
                        f"{type(mask).__name__ if not isinstance(mask, Tensor) else mask.dtype}")
    if mask.dim() < 2:
        raise ValueError(f"quantize_mask: mask must be [..., out, in], got shape {tuple(mask.shape)}")
    m = mask.detach().to(torch.float64)
    if not torch.isfinite(m).all():
        raise ValueError("quantize_mask: mask holds NaN or inf")
    lo, hi = m.amin(-1, keepdim=True), m.amax(-1, keepdim=True)
    offset = ((hi + lo) / 2).to(torch.float32)
    scale = ((hi - lo) / (2 * QMASK_LEVELS)).to(torch.float32)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale)).to(torch.float64)
    q = torch.round((m - offset.to(torch.float64)) / safe).clamp_(-QMASK_LEVELS, QMASK_LEVELS).to(torch.int8)
    tail = torch.cat([scale, offset], -1).contiguous().view(torch.int8)  # [..., out, 8]
    return torch.cat([q, tail], -1).contiguous()


def mask_codes(mask: Tensor) -> Tensor:
    """The int8 codes [..., out, in] of an int8 mask (a view)."""
    return mask.narrow(-1, 0, mask_in_features(mask))


def mask_scale_offset(mask: Tensor) -> tuple[Tensor, Tensor]:
    """(scale, offset), each fp32 [..., out, 1], of an int8 mask."""
    tail = mask.narrow(-1, mask_in_features(mask), QMASK_TAIL).contiguous().view(torch.float32)
    return tail.narrow(-1, 0, 1), tail.narrow(-1, 1, 1)


def dequantize_mask(mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """The float mask an int8 mask stands for (``offset + scale · q`` in fp32, then ``dtype``); a
    float mask is returned converted to ``dtype``."""
    if not is_quantized(mask):
        return mask.to(dtype)
    scale, offset = mask_scale_offset(mask)
    work = torch.float64 if dtype == torch.float64 else torch.float32  # the oracle's is exact
    return (mask_codes(mask).to(work) * scale.to(work) + offset.to(work)).to(dtype)
