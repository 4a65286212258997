"""The README's reproduction table: every method x task-inference mode x head on the bundled digits.

    python tools/digits_table.py --output runs/table            # ~50 min on a 2-core CPU (75 runs)
    python tools/digits_table.py --output runs/table --seeds 0  # one seed, a quick look

Each row is one ``softtf train`` experiment (the README's digits command: 5 tasks, a small ViT
warmed up for 8 epochs, 20 epochs per task) run with ``--seeds`` into ``OUTPUT/<row>/seed-S``;
the warmed-up backbone of each seed is computed once and reused by every row (the run directory's
``pretrained_backbone.safetensors``). Rows already finished are read back, not rerun (every run
resumes). The table (mean ± sample std over seeds) is printed and written to ``OUTPUT/table.md``.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys

from softtf.cli import main as softtf_main
from softtf.cl.seeds import seed_directory

BASE = ["--model", "vit", "--data", "digits", "--tasks", "5", "--pretrain-epochs", "8", "--no-progress", "--threads", "1"]
# (row label, flags); same-budget baselines: LoRA rank and adapter bottleneck matched to the masks
ROWS = [
    ("finetune / none", ["--method", "finetune", "--task-id", "none"]),
    ("finetune / oracle", ["--method", "finetune", "--task-id", "oracle"]),
    ("softtf / oracle", ["--method", "softtf", "--task-id", "oracle"]),
    ("softtf / prompt", ["--method", "softtf", "--task-id", "prompt"]),
    ("softtf / prompt-vote", ["--method", "softtf", "--task-id", "prompt-vote"]),
    ("softtf / gradient-sample", ["--method", "softtf", "--task-id", "gradient-sample"]),
    ("softtf / gradient-binary", ["--method", "softtf", "--task-id", "gradient-binary"]),
    ("softtf / gradient (k-shot)", ["--method", "softtf", "--task-id", "gradient"]),
    ("softtf / prompt, --protocol official", ["--method", "softtf", "--task-id", "prompt", "--protocol", "official"]),
    ("softtf / gradient, --protocol official", ["--method", "softtf", "--task-id", "gradient", "--protocol", "official"]),
    ("lora matched / oracle", ["--method", "lora", "--lora-r", "matched", "--task-id", "oracle"]),
    ("lora matched / prompt", ["--method", "lora", "--lora-r", "matched", "--task-id", "prompt"]),
    ("lora matched / prompt-vote", ["--method", "lora", "--lora-r", "matched", "--task-id", "prompt-vote"]),
    ("adapter matched / oracle", ["--method", "adapter", "--adapter-bottleneck", "matched", "--task-id", "oracle"]),
    ("adapter matched / prompt", ["--method", "adapter", "--adapter-bottleneck", "matched", "--task-id", "prompt"]),
    ("adapter matched / prompt-vote", ["--method", "adapter", "--adapter-bottleneck", "matched", "--task-id", "prompt-vote"]),
    # the prompt family, alone and with Soft-TF masks on the last 3 blocks (--masks)
    ("l2p / none", ["--method", "l2p", "--task-id", "none"]),
    ("l2p + masks / prompt", ["--method", "l2p", "--masks", "--task-id", "prompt"]),
    ("dualprompt / prompt", ["--method", "dualprompt", "--task-id", "prompt"]),
    ("dualprompt + masks / prompt", ["--method", "dualprompt", "--masks", "--task-id", "prompt"]),
    ("norga / prompt", ["--method", "norga", "--task-id", "prompt"]),
    ("norga + masks / prompt", ["--method", "norga", "--masks", "--task-id", "prompt"]),
    # HiDe-Prompt's task-identity classifier as task inference
    ("softtf / classifier", ["--method", "softtf", "--task-id", "classifier"]),
    ("dualprompt + masks / classifier", ["--method", "dualprompt", "--masks", "--task-id", "classifier"]),
    ("norga / classifier", ["--method", "norga", "--task-id", "classifier"]),
]


def slug(label: str) -> str:
    return "-".join("".join(c if c.isalnum() else " " for c in label).split())


def cell(stat: dict, digits: int = 1) -> str:
    """``mean ± std`` of a summary.json metric, in its unit (percent for every accuracy)."""
    if stat["mean"] is None:
        return "–"
    if stat["std"] is None:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def run_row(output: str, flags: list[str], seeds: list[int], warm: dict[int, str]) -> dict:
    """One row's experiment over every seed; returns its summary.json."""
    for s in seeds:
        run_dir = seed_directory(output, s)
        os.makedirs(run_dir, exist_ok=True)
        target = os.path.join(run_dir, "pretrained_backbone.safetensors")
        if s in warm and not os.path.exists(target):
            shutil.copyfile(warm[s], target)
    with contextlib.redirect_stdout(io.StringIO()):
        status = softtf_main(["train", *BASE, *flags, "--output", output, "--seeds", *map(str, seeds)])
    if status != 0:
        raise SystemExit(f"softtf train {' '.join(flags)} failed with status {status}")
    for s in seeds:
        warm.setdefault(s, os.path.join(seed_directory(output, s), "pretrained_backbone.safetensors"))
    with open(os.path.join(output, "summary.json")) as fh:
        return json.load(fh)


def table(summaries: list[tuple[str, dict]], seeds: list[int]) -> str:
    lines = [
        f"| method / task inference | how it decides | ACC, head full | ACC, head task | forgetting (standard) "
        f"| forgetting (official) | task-id acc. |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for label, s in summaries:
        heads = s["heads"]
        how = s["task_id_label"].split("(", 1)[1].rstrip(")")
        task_acc = cell(heads["task"]["acc"]) if "task" in heads else "–"
        lines.append(
            f"| {label} | {how} | {cell(heads['full']['acc'])} | {task_acc} | {cell(heads['full']['forgetting'])} "
            f"| {cell(heads['full']['forgetting_official'])} | {cell(s['metrics']['task_id_accuracy'])} |"
        )
    lines.append("")
    lines.append(f"Mean ± sample std over seeds {seeds}; forgetting of the full head; task-id accuracy per sample, in %.")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", required=True, help="directory of the runs (resumable) and table.md")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rows", nargs="+", default=None, help="only rows whose label contains one of these words")
    args = p.parse_args(argv)
    rows = [r for r in ROWS if args.rows is None or any(w in r[0] for w in args.rows)]
    warm: dict[int, str] = {}
    summaries = []
    for i, (label, flags) in enumerate(rows, 1):
        print(f"[{i}/{len(rows)}] {label}", file=sys.stderr, flush=True)
        summaries.append((label, run_row(os.path.join(args.output, slug(label)), flags, args.seeds, warm)))
    text = table(summaries, args.seeds)
    with open(os.path.join(args.output, "table.md"), "w") as fh:
        fh.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
