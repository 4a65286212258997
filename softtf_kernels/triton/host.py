"""Host side of the Triton kernels: dtype checks, zero-copy row views, allocation and launch.

Signatures equal those of ``softtf_kernels.reference`` (and of ``torch.ops.softtf.*``). Shape and
device checks live in ``softtf_kernels.validate`` and run before the dispatcher calls these;
here only what the kernels themselves need is checked (dtype support, and the [out, in + 8]
layout of an int8 mask, whose tail the kernels read after the in codes of each row).
"""
from __future__ import annotations

import contextlib
import math
import os

import torch
import triton
from torch import Tensor

from ..common import acc_dtype, new_output
from ..quant import QMASK_DTYPE, QMASK_TAIL
from . import kernels as K

_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)
_MASK_ARGS = ("mask", "masks")  # these may also be int8 masks (softtf_kernels.quant's layout)
_PRECISIONS = ("ieee", "tf32", "tf32x3")


def _env_precision() -> str:
    value = os.environ.get("SOFTTF_TRITON_FP32_PRECISION", "ieee").strip().lower() or "ieee"
    if value not in _PRECISIONS:
        raise ValueError(f"SOFTTF_TRITON_FP32_PRECISION must be one of {', '.join(_PRECISIONS)}; got {value!r}")
    return value


FP32_PRECISION = _env_precision()


def set_fp32_precision(value: str) -> None:
    """How fp32 x fp32 products run on GPU: "ieee" (exact fp32 FMA, default), "tf32" (tensor
    cores, ~1e-3 relative error, ~8x faster on A100/H100) or "tf32x3" (3 tf32 passes, ~fp32)."""
    global FP32_PRECISION
    value = str(value).strip().lower()
    if value not in _PRECISIONS:
        raise ValueError(f"fp32 precision must be one of {', '.join(_PRECISIONS)}; got {value!r}")
    FP32_PRECISION = value


def get_fp32_precision() -> str:
    return FP32_PRECISION


def _precision(dtype: torch.dtype) -> str:
    # Ignored by tl.dot for 16-bit operands; fixed there so the constexpr (and compile cache) is stable.
    return FP32_PRECISION if dtype == torch.float32 else "ieee"


def _check(op: str, **tensors: Tensor) -> None:
    if K.INTERPRETER_MIXED:
        raise RuntimeError(
            f"softtf_kernels.triton.{op}: TRITON_INTERPRET=1 was set after triton had been imported, so "
            "triton's own functions were built for a GPU; set TRITON_INTERPRET=1 before anything imports "
            "triton (torch.compile, timm and transformers can import it)"
        )
    for name, t in tensors.items():
        if name in _MASK_ARGS and t.dtype == QMASK_DTYPE:
            continue
        if t.dtype not in _SUPPORTED:
            what = ", bfloat16 or int8 (a quantized mask)" if name in _MASK_ARGS else " or bfloat16"
            raise TypeError(
                f"softtf_kernels.triton.{op}: {name} must be float32, float16{what}, got {t.dtype} "
                "(use the reference backend for other dtypes)"
            )
        if K.INTERPRET and t.dtype == torch.bfloat16:
            raise TypeError(
                f"softtf_kernels.triton.{op}: {name} is bfloat16, which the Triton CPU interpreter "
                "(TRITON_INTERPRET=1) does not support; use float32/float16 or a GPU"
            )


def _check_dtype_arg(op: str, name: str, dtype: torch.dtype) -> None:
    if dtype not in _SUPPORTED:
        raise TypeError(f"softtf_kernels.triton.{op}: {name} must be float32, float16 or bfloat16, got {dtype}")


def _quantized(op: str, name: str, mask: Tensor, weight: Tensor) -> bool:
    """Whether ``mask`` is an int8 mask; if so, checked to be [..., out, in + 8], for the kernels
    read each row's scale and offset after its in codes (validate.py checks this for the ops too;
    these functions may be called directly)."""
    if mask.dtype != QMASK_DTYPE:
        return False
    want = (weight.shape[0], weight.shape[1] + QMASK_TAIL)
    if tuple(mask.shape[-2:]) != want:
        raise ValueError(f"softtf_kernels.triton.{op}: {name} is an int8 mask, so it must end in [out, in + "
                         f"{QMASK_TAIL}] = {list(want)}, got shape {tuple(mask.shape)}")
    return True


def _device_ctx(t: Tensor):
    # Triton launches on the current CUDA device; make it the tensors' device.
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _rows(t: Tensor) -> tuple[Tensor, int, int, int, int, bool]:
    """View ``t [..., F]`` as rows without copying: (tensor, rows, L1, S0, S1, flat).

    Leading dims are merged where their strides allow; row r is at (r // L1)*S0 + (r % L1)*S1,
    or r*S1 when flat. Only layouts needing three or more levels (rare 4-D+ permutations) are
    copied.
    """
    rows = math.prod(t.shape[:-1])
    dims: list[list[int]] = []
    for size, stride in zip(t.shape[:-1], t.stride()[:-1]):
        if size == 1:
            continue
        if dims and dims[-1][1] == stride * size:
            dims[-1] = [dims[-1][0] * size, stride]
        else:
            dims.append([size, stride])
    if len(dims) > 2:
        t = t.contiguous()
        return t, rows, 1, 0, t.shape[-1], True
    if len(dims) == 2:
        return t, rows, dims[1][0], dims[0][1], dims[1][1], False
    return t, rows, 1, 0, (dims[0][1] if dims else 0), True


def _rows_key(rows: int) -> int:
    # Autotune once per power-of-two bucket of the token count, not per exact count.
    return triton.next_power_of_2(max(int(rows), 1))


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a nominal small GPU


def _choose_split(tokens: int, n: int, k: int, device: torch.device) -> int:
    """Split-K over tokens when the [n, k] output has too few tiles to fill the GPU.

    Counted with a nominal 128x128 tile; each chunk keeps >= 512 tokens so that the fp32 partials
    (SPLIT * n * k * 4 bytes, written and read back once, mostly from L2) stay small next to the
    GEMM work. ViT-B qkv (108 tiles on 132 SMs) runs unsplit; 768x768 layers split ~4 ways.
    """
    tiles = triton.cdiv(n, 128) * triton.cdiv(k, 128)
    sms = _num_sms(device)
    if 2 * tiles > sms or tokens < 1024:
        return 1
    return max(1, min(triton.cdiv(sms, tiles), tokens // 512, 16))


# ------------------------------------------------------------------------------- masked GEMM
def _masked_mm(op: str, a: Tensor, weight: Tensor, masks: Tensor, bias: Tensor | None,
               task_ids: Tensor | None, transpose_w: bool, n_groups: int) -> Tensor:
    """Shared launcher: forward (transpose_w=False) and grad-input (True), single or mixed task.

    ``masks`` is [T, out, in] (T = 1 for a single mask, as a view), or [T, out, in + 8] int8.
    """
    out_f, in_f = weight.shape
    quant = _quantized(op, "mask" if task_ids is None else "masks", masks, weight)
    if transpose_w:  # dx = dy (W ⊙ M): reduce over out, columns over in
        red, cols = out_f, in_f
        w_sk, w_sn = weight.stride(0), weight.stride(1)
        m_sk, m_sn = masks.stride(1), masks.stride(2)
    else:  # y = x (W ⊙ M)^T: reduce over in, columns over out
        red, cols = in_f, out_f
        w_sk, w_sn = weight.stride(1), weight.stride(0)
        m_sk, m_sn = masks.stride(2), masks.stride(1)
    if task_ids is not None:
        # The kernel reads task_ids[b] at b (unit stride): a strided or expanded view is copied
        # (B elements) rather than read as if dense.
        task_ids = task_ids.contiguous()
    out = new_output((*a.shape[:-1], cols), dtype=a.dtype, device=a.device)
    total_rows = math.prod(a.shape[:-1])
    if out.numel() == 0:
        return out
    if red == 0:  # empty reduction: y = bias (or 0)
        out.zero_()
        if bias is not None:
            out += bias
        return out
    a, _, l1, s0, s1, flat = _rows(a)
    rows = total_rows // n_groups
    grid = lambda meta: (n_groups * triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(cols, meta["BLOCK_N"]),)  # noqa: E731
    with _device_ctx(a):
        K.masked_mm_kernel[grid](
            a, weight, masks,
            bias if bias is not None else a,  # dummy pointers are never read (constexpr flags)
            task_ids if task_ids is not None else a,
            out,
            rows, cols, red, n_groups,
            l1, s0, s1, a.stride(-1),
            w_sk, w_sn,
            masks.stride(0), m_sk, m_sn,
            bias.stride(0) if bias is not None else 0, cols, 1,
            _rows_key(rows), int(w_sk == 1),
            A_FLAT=flat, HAS_BIAS=bias is not None, HAS_TASKS=task_ids is not None,
            PRECISION=_precision(a.dtype), QMASK=(2 if transpose_w else 1) if quant else 0,
        )
    return out


def masked_linear(x: Tensor, weight: Tensor, mask: Tensor, bias: Tensor | None = None) -> Tensor:
    """y = x (W ⊙ M)^T + b in x's dtype; fp32 accumulation, W ⊙ M formed per tile in registers."""
    _check("masked_linear", x=x, weight=weight, mask=mask, **({} if bias is None else {"bias": bias}))
    return _masked_mm("masked_linear", x, weight, mask.unsqueeze(0), bias, None, False, 1)


def masked_linear_grad_input(grad_out: Tensor, weight: Tensor, mask: Tensor) -> Tensor:
    """dx = dy (W ⊙ M) in grad_out's dtype; W and M read transposed through strides."""
    _check("masked_linear_grad_input", grad_out=grad_out, weight=weight, mask=mask)
    return _masked_mm("masked_linear_grad_input", grad_out, weight, mask.unsqueeze(0), None, None, True, 1)


def mixed_task_linear(x: Tensor, weight: Tensor, masks: Tensor, task_ids: Tensor,
                      bias: Tensor | None = None) -> Tensor:
    """y_b = x_b (W ⊙ M_{task_ids[b]})^T + b; one launch, each sample's tiles load their task id."""
    _check("mixed_task_linear", x=x, weight=weight, masks=masks, **({} if bias is None else {"bias": bias}))
    if x.shape[0] == 0:
        return new_output((*x.shape[:-1], weight.shape[0]), dtype=x.dtype, device=x.device)
    return _masked_mm("mixed_task_linear", x, weight, masks, bias, task_ids, False, x.shape[0])


def mixed_task_linear_grad_input(grad_out: Tensor, weight: Tensor, masks: Tensor, task_ids: Tensor) -> Tensor:
    """dx_b = dy_b (W ⊙ M_{task_ids[b]})."""
    _check("mixed_task_linear_grad_input", grad_out=grad_out, weight=weight, masks=masks)
    if grad_out.shape[0] == 0:
        return new_output((*grad_out.shape[:-1], weight.shape[1]), dtype=grad_out.dtype, device=grad_out.device)
    return _masked_mm("mixed_task_linear_grad_input", grad_out, weight, masks, None, task_ids, True,
                      grad_out.shape[0])


# ------------------------------------------------------------------------------- dy^T x GEMMs
def masked_linear_grad_mask(grad_out: Tensor, x: Tensor, weight: Tensor, mask_dtype: torch.dtype) -> Tensor:
    """dM = (dy^T x) ⊙ W over all tokens, in mask_dtype; split-K over tokens when tiles are few."""
    op = "masked_linear_grad_mask"
    _check(op, grad_out=grad_out, x=x, weight=weight)
    _check_dtype_arg(op, "mask_dtype", mask_dtype)
    out_f, in_f = weight.shape
    out = new_output((out_f, in_f), dtype=mask_dtype, device=x.device)
    if out.numel() == 0:
        return out
    tokens = math.prod(x.shape[:-1])
    if tokens == 0:
        return out.zero_()
    dy, _, dl1, ds0, ds1, dflat = _rows(grad_out)
    xx, _, xl1, xs0, xs1, xflat = _rows(x)
    split = _choose_split(tokens, out_f, in_f, x.device)
    chunk = triton.cdiv(triton.cdiv(tokens, split), 128) * 128  # whole BLOCK_T steps per chunk
    split = triton.cdiv(tokens, chunk)
    target = out if split == 1 else new_output((split, out_f, in_f), dtype=acc_dtype(x.dtype), device=x.device)
    o_ss = 0 if split == 1 else target.stride(0)
    o_sn, o_sk = target.stride(-2), target.stride(-1)
    grid = lambda meta: (triton.cdiv(out_f, meta["BLOCK_N"]) * triton.cdiv(in_f, meta["BLOCK_K"]), split)  # noqa: E731
    with _device_ctx(x):
        K.grad_mask_kernel[grid](
            dy, xx, weight, target,
            tokens, out_f, in_f, chunk, split,
            dl1, ds0, ds1, dy.stride(-1),
            xl1, xs0, xs1, xx.stride(-1),
            weight.stride(0), weight.stride(1),
            o_ss, o_sn, o_sk,
            _rows_key(chunk),
            DY_FLAT=dflat, X_FLAT=xflat, PARTIAL=split > 1, PRECISION=_precision(x.dtype),
        )
        if split > 1:
            nk = out_f * in_f
            block = 1024
            K.split_reduce_kernel[(triton.cdiv(nk, block),)](
                target, weight, out, split, nk, in_f, weight.stride(0), weight.stride(1), BLOCK=block,
            )
    return out


def mask_mixture_grad(grad_out: Tensor, x: Tensor, weight: Tensor, masks: Tensor, per_sample: bool) -> Tensor:
    """∂H/∂α_t = Σ (dy^T x) ⊙ W ⊙ M_t, [T] or per sample [B, T], fp32.

    One program per (token group, out tile, in tile) writes T partial sums; the tiny
    [groups, T, tiles] fp32 partial buffer is then summed (deterministic, no atomics).
    """
    _check("mask_mixture_grad", grad_out=grad_out, x=x, weight=weight, masks=masks)
    quant = _quantized("mask_mixture_grad", "masks", masks, weight)
    out_f, in_f = weight.shape
    n_tasks = masks.shape[0]
    tokens = math.prod(x.shape[:-1])
    batch = x.shape[0] if per_sample else None
    if tokens == 0 or out_f == 0 or in_f == 0:
        shape = (batch, n_tasks) if per_sample else (n_tasks,)
        return torch.zeros(shape, dtype=acc_dtype(x.dtype), device=x.device)
    dy, _, dl1, ds0, ds1, dflat = _rows(grad_out)
    xx, _, xl1, xs0, xs1, xflat = _rows(x)
    if per_sample:
        groups, chunk = batch, tokens // batch  # sample b owns rows [b*S, (b+1)*S)
    else:
        split = _choose_split(tokens, out_f, in_f, x.device)
        chunk = triton.cdiv(triton.cdiv(tokens, split), 128) * 128
        groups = triton.cdiv(tokens, chunk)
    # Tile count depends on the autotuned tile; allocate for the smallest tile and read back the
    # used prefix (n_tiles = grid axis 1, recorded by the grid function).
    min_bn = min(c.kwargs["BLOCK_N"] for c in K.MIX_CONFIGS)
    min_bk = min(c.kwargs["BLOCK_K"] for c in K.MIX_CONFIGS)
    max_tiles = triton.cdiv(out_f, min_bn) * triton.cdiv(in_f, min_bk)
    part = new_output((groups, n_tasks, max_tiles), dtype=acc_dtype(x.dtype), device=x.device)
    used = {}

    def grid(meta):
        used["tiles"] = triton.cdiv(out_f, meta["BLOCK_N"]) * triton.cdiv(in_f, meta["BLOCK_K"])
        return (groups, used["tiles"])

    with _device_ctx(x):
        K.mixture_grad_kernel[grid](
            dy, xx, weight, masks, part,
            tokens, out_f, in_f, n_tasks, chunk,
            dl1, ds0, ds1, dy.stride(-1),
            xl1, xs0, xs1, xx.stride(-1),
            weight.stride(0), weight.stride(1),
            masks.stride(0), masks.stride(1), masks.stride(2),
            _rows_key(chunk),
            DY_FLAT=dflat, X_FLAT=xflat, PRECISION=_precision(x.dtype), QMASK=quant,
        )
    # Partials are laid out [g, t, tile] with the launched tile count as row length.
    tiles = used["tiles"]
    flat = part.reshape(-1)[: groups * n_tasks * tiles].view(groups, n_tasks, tiles)
    scores = flat.sum(-1)
    return scores if per_sample else scores.sum(0)
