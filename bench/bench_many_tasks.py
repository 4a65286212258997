"""Resident memory of a wrapped model with many frozen tasks: masks loaded into RAM, or kept in the
memory-mapped mask file (``load_masks(..., mmap=True)``) and read when a forward uses them.

    python bench/bench_many_tasks.py [--tasks 100 --mask-dtype float32 --use 3 --batch 4 --dir DIR]

Model: timm ``vit_base_patch16_224`` (random init, no download) wrapped by ``softtf.wrap`` with
its defaults (qkv + proj of blocks 9-11: 7.08 M mask elements per task, 27 MiB in fp32). The parent
writes one mask file with ``--tasks`` frozen tasks (uniform masks, seeded), then measures each mode
in a fresh process, reading ``/proc/self/status`` (VmRSS = RssAnon + RssFile + RssShmem; VmHWM:
the peak) at each step:
  model    the wrapped ViT-B, no task (the baseline)
  loaded   after ``softtf.load_masks(model, file, mmap=...)``
  served   after ``model(x, task_names=...)`` on a batch using ``--use`` tasks
  all      after one forward per task, every task once (every mask page touched)
and times the served call (median of ``--repeats``, after one warm-up) with outputs checked to be
bit-identical between the modes. File-backed pages (RssFile) are clean page cache: the kernel
drops them under memory pressure and reads them again on use; anonymous memory (RssAnon) stays.
Linux only (``/proc``). Writes about ``--tasks`` x 27 MiB to ``--dir`` (removed afterwards unless
``--keep``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import softtf

MIB = 2 ** 20
FIELDS = ("VmRSS", "RssAnon", "RssFile", "VmHWM")


def status() -> dict[str, float]:
    """The process's memory figures from /proc/self/status, in MiB."""
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in FIELDS:
                out[key] = int(value.split()[0]) / 1024  # kB -> MiB
    return out


def vit_b():
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_base_patch16_224", pretrained=False).eval()


def write_file(path: str, tasks: int, mask_dtype: torch.dtype) -> dict:
    """A mask file with ``tasks`` frozen tasks for the default-wrapped ViT-B."""
    model = softtf.wrap(vit_b(), mask_dtype=mask_dtype)
    gen = torch.Generator().manual_seed(0)
    elements = 0
    for layer in model.soft_layers.values():  # one stack per layer (freezing task by task re-copies the store)
        masks = {f"t{t}": torch.empty(layer.weight.shape).uniform_(0.5, 1.5, generator=gen).to(mask_dtype)
                 for t in range(tasks)}
        layer.stage_tasks(masks, frozen=list(masks))()
        elements += layer.weight.numel()
        del masks
    model.save_masks(path)
    return {"layers": len(model.soft_layers), "elements_per_task": elements,
            "mib_per_task": elements * mask_dtype.itemsize / MIB, "file_mib": os.path.getsize(path) / MIB}


def child(path: str, mmap: bool, use: int, batch: int, repeats: int) -> dict:
    torch.set_num_threads(1)
    rows = {}
    model = softtf.wrap(vit_b())
    rows["model"] = status()
    softtf.load_masks(model, path, mmap=mmap)
    rows["loaded"] = status()
    tasks = model.frozen_tasks
    names = [tasks[(i * 37) % len(tasks)] for i in range(use)]
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    per_sample = [names[i % use] for i in range(batch)]
    times = []
    with torch.no_grad():
        out = model(x, task_names=per_sample)  # warm-up (first touch of the used masks' pages)
        rows["served"] = status()
        for _ in range(repeats):
            start = time.perf_counter()
            again = model(x, task_names=per_sample)
            times.append(time.perf_counter() - start)
        assert torch.equal(out, again)
        one = x[:1]
        for t in tasks:
            model(one, task_names=t)
        rows["all"] = status()
    layer = next(iter(model.soft_layers.values()))
    return {"rows": rows, "served_s": statistics.median(times), "mapped_tasks": len(layer.mapped_tasks),
            "tasks": len(tasks), "used": names, "logits": out.flatten()[:64].tolist()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=100)
    p.add_argument("--mask-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--use", type=int, default=3, help="distinct tasks in the served batch")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=tempfile.gettempdir())
    p.add_argument("--keep", action="store_true", help="keep the mask file")
    p.add_argument("--child", choices=["copy", "mmap"], help=argparse.SUPPRESS)
    p.add_argument("--file", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.file, a.child == "mmap", a.use, a.batch, a.repeats)))
        return 0
    path = os.path.join(a.dir, f"softtf_many_tasks_{a.tasks}_{a.mask_dtype}_{os.getpid()}.safetensors")
    try:
        start = time.perf_counter()
        info = write_file(path, a.tasks, getattr(torch, a.mask_dtype))
        print(f"wrote {path}: {a.tasks} frozen tasks x {info['layers']} layers, {info['elements_per_task'] / 1e6:.2f} M "
              f"mask elements per task ({info['mib_per_task']:.1f} MiB in {a.mask_dtype}), file {info['file_mib']:.0f} MiB, "
              f"{time.perf_counter() - start:.0f} s", flush=True)
        results = {}
        for mode in ("copy", "mmap"):
            cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--file", path, "--use", str(a.use),
                   "--batch", str(a.batch), "--repeats", str(a.repeats)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        if not a.keep and os.path.exists(path):
            os.remove(path)
    same = results["copy"]["logits"] == results["mmap"]["logits"]
    print(f"\nViT-B/16, softtf.wrap defaults, {a.tasks} frozen tasks in {a.mask_dtype}; served batch: {a.batch} images, "
          f"{a.use} tasks; 1 torch thread; MiB from /proc/self/status")
    print(f"{'mode':<6} {'step':<8} " + " ".join(f"{f:>8}" for f in FIELDS) + f" {'RSS - model':>12}")
    for mode, res in results.items():
        base = res["rows"]["model"]["VmRSS"]
        for step, row in res["rows"].items():
            print(f"{mode:<6} {step:<8} " + " ".join(f"{row[f]:8.0f}" for f in FIELDS) + f" {row['VmRSS'] - base:12.0f}")
    c, m = results["copy"], results["mmap"]
    print(f"\nserved call (median of {a.repeats}): copy {c['served_s'] * 1000:.0f} ms, mmap {m['served_s'] * 1000:.0f} ms "
          f"(x{m['served_s'] / c['served_s']:.2f}); file-backed tasks per layer: copy {c['mapped_tasks']}, mmap "
          f"{m['mapped_tasks']}; outputs bit-identical: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
