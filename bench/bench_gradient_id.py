"""Per-sample Gradient ID on ViT-B/16 layer shapes: the fused pass against the naive ways.

    python bench/bench_gradient_id.py [--batch 16 --tokens 197 --tasks 5 10 20]

For each T, over the masked layers of one ViT-B/16 block (qkv 768->2304 and proj 768->768), with
the same x [B, N, in] and upstream gradient dy for every candidate:
  fused     SoftLinear superposed forward + backward with α [B, T]: dx and ∂H/∂α per sample through
            masked_linear_grad_input and mask_mixture_grad (no per-sample weights)
  floor     one forward + backward of the same layers as plain trainable nn.Linear (dx and dW)
  explicit  autograd over an explicit per-sample α with materialized W ⊙ M̄_b ([B, out, in])
  loop      the per-sample loop the paper's code implies: B one-sample passes, each autograd over
            an explicit α [T] with a materialized W ⊙ M̄
Prints times and peak extra memory, with ratios measured in this one run.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import peak_extra_bytes, timeit  # noqa: E402

import softtf  # noqa: E402
from softtf.core.layer import superposed_linear  # noqa: E402

LAYERS = [(768, 2304), (768, 768)]  # ViT-B/16 attn.qkv, attn.proj


def setup(batch, tokens, n_tasks, gen):
    layers = []
    for fin, fout in LAYERS:
        w = torch.randn(fout, fin, generator=gen) * fin**-0.5
        b = torch.randn(fout, generator=gen) * 0.01
        masks = torch.rand(n_tasks, fout, fin, generator=gen) * 0.02 + 0.99
        x = torch.randn(batch, tokens, fin, generator=gen)
        dy = torch.randn(batch, tokens, fout, generator=gen)
        layers.append((x, w, b, masks, dy))
    return layers


def fused(layers, n_tasks):
    out = []
    for x, w, b, masks, dy in layers:
        xg = x.requires_grad_()
        alpha = torch.full((x.shape[0], n_tasks), 1.0 / n_tasks, requires_grad=True)
        y = superposed_linear(xg, w, masks, alpha, b)
        out.append(torch.autograd.grad(y, (xg, alpha), dy))
    return out


def floor(linears, layers):
    out = []
    for lin, (x, _, _, _, dy) in zip(linears, layers):
        xg = x.requires_grad_()
        y = lin(xg)
        out.append(torch.autograd.grad(y, (xg, lin.weight), dy))
    return out


def explicit(layers, n_tasks):
    out = []
    for x, w, b, masks, dy in layers:
        xg = x.requires_grad_()
        alpha = torch.full((x.shape[0], n_tasks), 1.0 / n_tasks, requires_grad=True)
        wb = w * torch.einsum("bt,toi->boi", alpha, masks)  # [B, out, in] per-sample weights
        y = torch.baddbmm(b, xg, wb.transpose(1, 2))
        out.append(torch.autograd.grad(y, (xg, alpha), dy))
    return out


def loop(layers, n_tasks):
    out = []
    for x, w, b, masks, dy in layers:
        for s in range(x.shape[0]):
            xs = x[s].requires_grad_()
            alpha = torch.full((n_tasks,), 1.0 / n_tasks, requires_grad=True)
            wbar = w * torch.einsum("t,toi->oi", alpha, masks)
            y = nn.functional.linear(xs, wbar, b)
            out.append(torch.autograd.grad(y, (xs, alpha), dy[s]))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--tokens", type=int, default=197)
    p.add_argument("--tasks", type=int, nargs="+", default=[5, 10, 20])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-explicit", action="store_true", help="skip the memory-hungry explicit-α baseline")
    a = p.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    print(f"Per-sample Gradient ID, ViT-B/16 qkv+proj, B={a.batch} N={a.tokens}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, backend {softtf.get_backend()}")
    print(f"{'T':>3} {'fused ms':>9} {'floor ms':>9} {'fused/floor':>12} {'loop/fused':>11} {'explicit/fused':>15} "
          f"{'fused MiB':>10} {'floor MiB':>10} {'explicit MiB':>13}")
    rows = []
    for t in a.tasks:
        layers = setup(a.batch, a.tokens, t, gen)
        linears = []
        for x, w, b, _, _ in layers:
            lin = nn.Linear(w.shape[1], w.shape[0])
            with torch.no_grad():
                lin.weight.copy_(w)
                lin.bias.copy_(b)
            linears.append(lin)
        cands = {"fused": lambda: fused(layers, t), "floor": lambda: floor(linears, layers), "loop": lambda: loop(layers, t)}
        if not a.skip_explicit:
            cands["explicit"] = lambda: explicit(layers, t)
        best = {k: float("inf") for k in cands}
        for _ in range(2):  # round-robin so machine noise hits every candidate alike
            for k, fn in cands.items():
                best[k] = min(best[k], timeit(fn, a.repeats))
        mem = {k: peak_extra_bytes(fn) / 2**20 for k, fn in cands.items() if k != "loop"}
        r = {"tasks": t, **{f"{k}_ms": v for k, v in best.items()}, **{f"{k}_MiB": v for k, v in mem.items()}}
        rows.append(r)
        ex_ratio = f"{best['explicit'] / best['fused']:>15.2f}" if "explicit" in best else f"{'-':>15}"
        ex_mem = f"{mem['explicit']:>13.1f}" if "explicit" in mem else f"{'-':>13}"
        print(f"{t:>3} {best['fused']:>9.1f} {best['floor']:>9.1f} {best['fused'] / best['floor']:>12.2f} "
              f"{best['loop'] / best['fused']:>11.2f} {ex_ratio} {mem['fused']:>10.1f} {mem['floor']:>10.1f} {ex_mem}")
    return rows


if __name__ == "__main__":
    main()
