"""Roofline and GPU timings of masked_linear (forward, backward dx + dM) on ViT-B/16 and BERT-base.

    python bench/gpu_bench.py            # roofline table; on a CUDA GPU also measured timings
    python bench/gpu_bench.py --roofline # the analytic table only (what bench/ROOFLINE.md holds)

Without a GPU it prints the analytic table, says so and exits 0. With one it times, per shape:
the Triton kernels, the CUDA C++ kernels (when built), cuBLAS ``F.linear`` on the unmasked weight
(the speed-of-light baseline: same GEMMs, no mask) and the eager reference ``F.linear(x, W * M)``
with autograd (what a user writes without softtf). Timings are medians of
``triton.testing.do_bench`` (which also flushes L2 between runs), over a pool of distinct input
sets rotated call by call so no run finds its operands in L2. No asserts on time.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from dataclasses import dataclass

# H100 SXM nominal peaks used for the floor (dense bf16 tensor-core math, HBM3 bandwidth).
PEAK_TFLOPS = 800.0
PEAK_TBPS = 3.0
ELT = 2  # bytes per bf16 element (x, W, M, y, grads all bf16)


@dataclass(frozen=True)
class Shape:
    name: str
    tokens: int  # all leading dims flattened
    fin: int
    fout: int


SHAPES = [
    Shape("ViT-B/16 qkv (64x197, 768->2304)", 64 * 197, 768, 2304),
    Shape("ViT-B/16 proj (64x197, 768->768)", 64 * 197, 768, 768),
    Shape("BERT-base q/k/v (32x128, 768->768)", 32 * 128, 768, 768),
]


def traffic(s: Shape) -> dict[str, tuple[float, float]]:
    """(FLOPs, minimum bytes) per pass; every tensor read or written exactly once per kernel.

    fused fwd   : read x, W, M, b; write y.                         2 T I O flops
    fused dx    : read dy, W, M; write dx.                          2 T I O
    fused dM    : read dy, x, W; write dM (W applied in epilogue).  2 T I O (+ I O multiplies)
    eager fwd   : W*M (read W, M, write WM) + F.linear (read x, WM, b, write y)
    eager bwd   : dx = dy WM (read dy, WM, write dx); dWM = dy^T x (read dy, x, write dWM);
                  dM = dWM * W (read dWM, W, write dM)
    cuBLAS      : F.linear(x, W) and its dx, dW GEMMs on the unmasked weight (no mask at all).
    """
    t, i, o = s.tokens, s.fin, s.fout
    x, y, w = t * i * ELT, t * o * ELT, i * o * ELT
    gemm = 2.0 * t * i * o
    return {
        "fused fwd": (gemm, x + 2 * w + o * ELT + y),
        "fused dx": (gemm, y + 2 * w + x),
        "fused dM": (gemm + i * o, y + x + 2 * w),
        "fused bwd (dx+dM)": (2 * gemm + i * o, (y + 2 * w + x) + (y + x + 2 * w)),
        "eager fwd": (gemm + i * o, 3 * w + (x + w + o * ELT + y)),
        "eager bwd": (2 * gemm + i * o, (y + w + x) + (y + x + w) + 3 * w),
        "cuBLAS fwd": (gemm, x + w + o * ELT + y),
        "cuBLAS bwd (dx+dW)": (2 * gemm, (y + w + x) + (y + x + w)),
    }


def floor_us(flops: float, nbytes: float) -> tuple[float, float, float]:
    tc = flops / (PEAK_TFLOPS * 1e12) * 1e6
    tm = nbytes / (PEAK_TBPS * 1e12) * 1e6
    return tc, tm, max(tc, tm)


def roofline_table() -> str:
    lines = []
    for s in SHAPES:
        tr = traffic(s)
        lines.append(f"\n### {s.name}: tokens={s.tokens}, in={s.fin}, out={s.fout}\n")
        lines.append("| pass | GFLOP | min MB | AI (FLOP/B) | compute floor us | memory floor us | floor us |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|")
        for k, (f, b) in tr.items():
            tc, tm, fl = floor_us(f, b)
            lines.append(f"| {k} | {f / 1e9:.2f} | {b / 1e6:.1f} | {f / b:.0f} | {tc:.1f} | {tm:.1f} | {fl:.1f} |")
        # The eager path also launches separate elementwise kernels whose time is memory bound on
        # their own, so its floor is the sum of per-kernel floors, not the max over the total.
        t, i, o = s.tokens, s.fin, s.fout
        w = i * o * ELT
        mul_us = floor_us(i * o, 3 * w)[2]
        fwd_eager = floor_us(*tr["cuBLAS fwd"])[2] + mul_us
        bwd_eager = floor_us(*tr["cuBLAS bwd (dx+dW)"])[2] + mul_us
        fwd_fused = floor_us(*tr["fused fwd"])[2]
        bwd_fused = floor_us(*tr["fused dx"])[2] + floor_us(*tr["fused dM"])[2]
        lines.append("")
        lines.append(f"- eager floor (GEMM floor + W*M / dWM*W elementwise floor {mul_us:.1f} us): "
                     f"fwd {fwd_eager:.1f} us, bwd {bwd_eager:.1f} us")
        lines.append(f"- fused floor: fwd {fwd_fused:.1f} us, bwd {bwd_fused:.1f} us -> "
                     f"expected gain at the roofline: fwd {fwd_eager / fwd_fused:.3f}x, "
                     f"bwd {bwd_eager / bwd_fused:.3f}x, fwd+bwd {(fwd_eager + bwd_eager) / (fwd_fused + bwd_fused):.3f}x")
        lines.append(f"- memory the eager path keeps alive for autograd per layer: W*M = {w / 1e6:.2f} MB "
                     "(the fused op saves only x, W, M, which already exist)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ measurement
def _pool(make, nbytes_one: int, l2_bytes: int) -> itertools.cycle:
    """Enough distinct input sets that the pool is >= 3x L2: rotating defeats residual caching."""
    n = max(2, min(64, -(-3 * l2_bytes // max(nbytes_one, 1))))
    return itertools.cycle([make() for _ in range(n)])


def measure(device: str = "cuda", dt=None, shapes=None, do_bench=None) -> None:
    """Time every implementation on ``device`` (arguments other than the default exist only for
    a CPU smoke run of this function under TRITON_INTERPRET=1)."""
    import torch
    import torch.nn.functional as F

    import softtf_kernels
    import softtf_kernels.triton as TK
    import softtf_kernels.triton.kernels as TKK  # the jit kernels, for their autotuned configs

    if do_bench is None:
        from triton.testing import do_bench
    dev = torch.device(device)
    dt = dt or torch.bfloat16
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        l2 = getattr(props, "L2_cache_size", 50 * 2**20)
        where = f"{props.name} ({props.multi_processor_count} SMs, L2 {l2 / 2**20:.0f} MiB)"
    else:
        l2, where = 1 << 20, f"{dev} (smoke run, not a measurement)"
    cuda_cpp = dev.type == "cuda" and softtf_kernels.cuda_available("masked_linear")
    print(f"\n## Measured on {where}, {str(dt).replace('torch.', '')}, "
          f"median of triton.testing.do_bench; ratios are against the eager reference of the same pass\n")
    print("| shape | pass | impl | us | TB/s (min bytes) | TFLOP/s | vs eager | vs cuBLAS |")
    print("|---|---|---|---:|---:|---:|---:|---:|")

    for s in shapes or SHAPES:
        t, i, o = s.tokens, s.fin, s.fout
        tr = traffic(s)

        def make():
            x = torch.randn(t, i, device=dev, dtype=dt)
            w = torch.randn(o, i, device=dev, dtype=dt) * i**-0.5
            m = torch.rand(o, i, device=dev, dtype=dt)
            b = torch.randn(o, device=dev, dtype=dt)
            dy = torch.randn(t, o, device=dev, dtype=dt)
            return x, w, m, b, dy

        one = (t * i + 2 * o * i + o + t * o) * 2
        pool = _pool(make, one, l2)

        def bench(fn):
            return do_bench(lambda: fn(*next(pool)), return_mode="median") * 1e3  # ms -> us

        def eager_bwd(x, w, m, b, dy):
            xr, mr = x.detach().requires_grad_(), m.detach().requires_grad_()
            y = F.linear(xr, w * mr, b)
            return torch.autograd.grad(y, (xr, mr), dy)

        def eager_fwd_bwd(x, w, m, b, dy):
            return eager_bwd(x, w, m, b, dy)

        def cublas_bwd(x, w, m, b, dy):
            return dy @ w, dy.T @ x

        rows = {
            "fwd": {
                "eager F.linear(x, W*M)": lambda x, w, m, b, dy: F.linear(x, w * m, b),
                "cuBLAS F.linear(x, W)": lambda x, w, m, b, dy: F.linear(x, w, b),
                "triton": lambda x, w, m, b, dy: TK.masked_linear(x, w, m, b),
            },
            "bwd (dx+dM)": {
                # eager backward alone = (forward+backward) - forward, measured below
                "eager autograd fwd+bwd": eager_fwd_bwd,
                "cuBLAS dx, dW GEMMs": cublas_bwd,
                "triton": lambda x, w, m, b, dy: (TK.masked_linear_grad_input(dy, w, m),
                                                  TK.masked_linear_grad_mask(dy, x, w, m.dtype)),
            },
        }
        if cuda_cpp:
            rows["fwd"]["cuda C++"] = lambda x, w, m, b, dy: torch.ops.softtf._cuda_masked_linear(x, w, m, b)
            rows["bwd (dx+dM)"]["cuda C++"] = lambda x, w, m, b, dy: (
                torch.ops.softtf._cuda_masked_linear_grad_input(dy, w, m),
                torch.ops.softtf._cuda_masked_linear_grad_mask(dy, x, w, m.dtype))

        times = {}
        for pas, impls in rows.items():
            for name, fn in impls.items():
                times[(pas, name)] = bench(fn)
        # Eager backward alone, so it compares with the kernels' backward.
        times[("bwd (dx+dM)", "eager autograd bwd")] = (times.pop(("bwd (dx+dM)", "eager autograd fwd+bwd"))
                                                       - times[("fwd", "eager F.linear(x, W*M)")])
        keys = {"fwd": ("fused fwd", "eager fwd", "cuBLAS fwd"),
                "bwd (dx+dM)": ("fused bwd (dx+dM)", "eager bwd", "cuBLAS bwd (dx+dW)")}
        for pas in rows:
            fused_k, eager_k, cublas_k = keys[pas]
            eager_name = "eager F.linear(x, W*M)" if pas == "fwd" else "eager autograd bwd"
            cublas_name = "cuBLAS F.linear(x, W)" if pas == "fwd" else "cuBLAS dx, dW GEMMs"
            for (p, name), us in times.items():
                if p != pas:
                    continue
                key = eager_k if name.startswith("eager") else cublas_k if name.startswith("cuBLAS") else fused_k
                f, nb = tr[key]
                print(f"| {s.name} | {pas} | {name} | {us:.1f} | {nb / us / 1e6:.2f} | {f / us / 1e6:.0f} | "
                      f"{times[(pas, eager_name)] / us:.2f}x | {times[(pas, cublas_name)] / us:.2f}x |")
    print("\nTriton autotuned configs:", {k: str(getattr(getattr(TKK, k), "best_config", None))
                                         for k in ("masked_mm_kernel", "grad_mask_kernel")})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--roofline", action="store_true", help="print the analytic table only")
    args = ap.parse_args(argv)
    print(f"# masked_linear roofline (H100 SXM: {PEAK_TFLOPS:.0f} dense bf16 TFLOP/s, {PEAK_TBPS} TB/s; bf16 tensors)")
    print(roofline_table())
    if args.roofline:
        return 0
    try:
        import torch
    except ImportError:
        print("\ntorch is not installed: analytic table only")
        return 0
    if not torch.cuda.is_available():
        print("\nNo CUDA GPU present: analytic table only (no timings).")
        return 0
    measure()
    return 0


if __name__ == "__main__":
    sys.exit(main())
