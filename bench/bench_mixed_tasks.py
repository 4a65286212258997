"""Serving a mixed batch: each sample its own task, on a wrapped model with T frozen tasks.

    python bench/bench_mixed_tasks.py [--tasks 10 --batch 32 --repeats 5 --threads N]

Model: a timm ViT (default: ViT-S/16-like, 224 px, dim 384, depth 12, 6 heads, random init) wrapped
by ``softtf.wrap`` (qkv + proj of the last 3 blocks) with T frozen tasks; a batch whose task ids
are drawn at random. Candidates, each giving the same logits:
  task_names  one call, ``model(x, task_names=names)`` (``mixed_task_linear`` per layer)
  grouped     one call per task present, on that task's samples (``use_task``), scattered back
  per_sample  one call per sample
  frozen      the unwrapped model on the whole batch (no masks: the floor)
Prints time per batch, samples per second and peak extra memory, with ratios to the floor and to
the grouped calls measured in this one run.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import peak_extra_bytes, timeit  # noqa: E402

import softtf  # noqa: E402
from softtf.bench.serving import grouped_forward  # noqa: E402


def build(n_tasks: int, img: int, dim: int, depth: int, heads: int):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=img, patch_size=16, embed_dim=dim, depth=depth, num_heads=heads, num_classes=10).eval()
    model = softtf.wrap(vit)
    for t in range(n_tasks):
        model.add_task(f"t{t}", init=("uniform", 0.9, 1.1), seed=t)
        model.freeze_task(f"t{t}")
    return model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=10)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    model = build(a.tasks, a.img, a.dim, a.depth, a.heads)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(a.batch, 3, a.img, a.img, generator=gen)
    ids = torch.randint(0, a.tasks, (a.batch,), generator=gen)
    names = [f"t{i}" for i in ids.tolist()]

    def task_names():
        return model(x, task_names=names)

    def grouped():
        return grouped_forward(model, x, ids)

    def per_sample():
        return torch.cat([model(x[b:b + 1], task_names=names[b]) for b in range(a.batch)])

    def frozen():
        with model.disable_masks():
            return model(x)

    cands = {"frozen": frozen, "task_names": task_names, "grouped": grouped, "per_sample": per_sample}
    with torch.no_grad():
        ref = grouped()
        for k in ("task_names", "per_sample"):
            err = (cands[k]() - ref).abs().max().item()
            if err > 1e-3:
                raise SystemExit(f"{k} differs from grouped by {err}")
        ms = {k: timeit(fn, a.repeats) for k, fn in cands.items()}
        mem = {k: peak_extra_bytes(fn) / 2**20 for k, fn in cands.items()}
    load = os.getloadavg()
    print(f"ViT dim {a.dim} depth {a.depth} {a.img}px, {a.tasks} frozen tasks, batch {a.batch} "
          f"({len(ids.unique())} tasks present), torch threads {torch.get_num_threads()}, "
          f"load avg {load[0]:.2f}")
    print(f"{'candidate':<12} {'ms/batch':>10} {'samples/s':>10} {'x frozen':>9} {'x grouped':>10} {'peak MiB':>9}")
    for k in cands:
        print(f"{k:<12} {ms[k]:>10.1f} {a.batch / ms[k] * 1000:>10.1f} {ms[k] / ms['frozen']:>9.2f} "
              f"{ms[k] / ms['grouped']:>10.2f} {mem[k]:>9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
