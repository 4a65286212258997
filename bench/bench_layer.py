"""CPU benchmark of one SoftLinear layer against the frozen nn.Linear and the eager reference.

    python bench/bench_layer.py [--in 768 --out 2304 --tokens 8 197 1576 --repeats 20]

Prints ratios measured in this one run (machines are noisy; compare ratios, not seconds):
  fwd:      SoftLinear forward vs plain frozen nn.Linear forward and vs F.linear(x, W * M)
  fwd+bwd:  SoftLinear forward + backward (dx and dM) vs the eager reference with autograd
and the largest out x in temporary the forward allocates (must be none: panels only).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import largest_allocation_bytes, timeit  # noqa: E402

import softtf  # noqa: E402


def bench_shape(fin: int, fout: int, tokens: int, repeats: int, dtype=torch.float32) -> dict:
    torch.manual_seed(0)
    base = nn.Linear(fin, fout, dtype=dtype).requires_grad_(False)
    layer = softtf.SoftLinear(base)
    layer.add_task("t", init=("uniform", 0.99, 1.0))
    mask = layer.masks["t"]
    x = torch.randn(tokens, fin, dtype=dtype)
    w, b = base.weight, base.bias
    dy = torch.randn(tokens, fout, dtype=dtype)

    def soft_fwd():
        with torch.no_grad():
            layer(x)

    def plain_fwd():
        with torch.no_grad():
            base(x)

    def eager_fwd():
        with torch.no_grad():
            nn.functional.linear(x, w * mask, b)

    xg = x.clone().requires_grad_()

    def soft_fb():
        y = layer(xg)
        torch.autograd.grad(y, (xg, mask), dy)

    def eager_fb():
        y = nn.functional.linear(xg, w * mask, b)
        torch.autograd.grad(y, (xg, mask), dy)

    r = {"tokens": tokens, "in": fin, "out": fout}
    # Round-robin the candidates a few times and keep each one's best median (noise-robust).
    cands = {"soft_fwd": soft_fwd, "plain_fwd": plain_fwd, "eager_fwd": eager_fwd, "soft_fb": soft_fb, "eager_fb": eager_fb}
    best = {k: float("inf") for k in cands}
    for _ in range(3):
        for k, fn in cands.items():
            best[k] = min(best[k], timeit(fn, max(3, repeats // 3), warmup=3))
    r.update({k + "_ms": v for k, v in best.items()})
    r["fwd_vs_plain"] = best["soft_fwd"] / best["plain_fwd"]
    r["fwd_vs_eager"] = best["soft_fwd"] / best["eager_fwd"]
    r["fb_vs_eager"] = best["soft_fb"] / best["eager_fb"]
    r["fwd_largest_alloc_MiB"] = largest_allocation_bytes(soft_fwd) / 2**20
    r["full_mask_MiB"] = fout * fin * torch.finfo(dtype).bits / 8 / 2**20
    return r


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--in", dest="fin", type=int, default=768)
    p.add_argument("--out", dest="fout", type=int, default=2304)
    p.add_argument("--tokens", type=int, nargs="+", default=[8, 197, 1576])
    p.add_argument("--repeats", type=int, default=15)
    a = p.parse_args(argv)
    print(f"SoftLinear CPU benchmark: in={a.fin} out={a.fout} fp32, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, backend {softtf.get_backend()}")
    hdr = f"{'tokens':>7} {'fwd ms':>8} {'fwd/plain':>10} {'fwd/eager':>10} {'fb ms':>8} {'fb/eager':>9} {'max alloc MiB':>14} {'W MiB':>6}"
    print(hdr)
    rows = []
    for t in a.tokens:
        r = bench_shape(a.fin, a.fout, t, a.repeats)
        rows.append(r)
        print(f"{t:>7} {r['soft_fwd_ms']:>8.3f} {r['fwd_vs_plain']:>10.3f} {r['fwd_vs_eager']:>10.3f} "
              f"{r['soft_fb_ms']:>8.3f} {r['fb_vs_eager']:>9.3f} {r['fwd_largest_alloc_MiB']:>14.2f} {r['full_mask_MiB']:>6.2f}")
    return rows


if __name__ == "__main__":
    main()
