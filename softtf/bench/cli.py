"""The ``softtf bench`` command: its flags, their mapping to :class:`BenchConfig`, and the outputs."""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields
from typing import Sequence

from .config import ALL_CANDIDATES, CASES, MASK_DTYPES, STATS, BenchConfig
from .chart import plot
from .report import format_markdown, format_table
from .runner import measure

__all__ = ["DESCRIPTION", "EPILOG", "add_arguments", "build_parser", "config_from_args", "main", "run"]

DESCRIPTION = ("``softtf bench``: throughput and peak memory of Soft-TF against LoRA, Adapters and the eager "
               "reference, and of softtf.prefix_attention against the eager composite and SDPA without prefix.")
EPILOG = "Ratios, not seconds, are the result: they are measured in one run."


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``softtf bench`` flags on ``parser`` (dests are the BenchConfig fields), and its
    description and epilog where the parser has none."""
    if parser.description is None:
        parser.description = DESCRIPTION
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
    if parser.epilog is None:
        parser.epilog = EPILOG
    p = parser
    p.add_argument("--quick", action="store_true", help="CI smoke test: tiny shapes and models, few iterations")
    p.add_argument("--output", default="bench_results", help="directory for bench.json, bench.png, bench.txt")
    p.add_argument("--json", default=None, help="JSON path (default OUTPUT/bench.json)")
    p.add_argument("--cases", nargs="+", choices=CASES, default=None, help=f"subset of {', '.join(CASES)} (default all)")
    p.add_argument("--device", default=None, help="cpu | cuda[:i] (default: cuda if available, else cpu)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size of every case (overrides the per-case ones)")
    p.add_argument("--tokens", type=int, default=None,
                   help="tokens per sample of the layer and attention cases and BERT (ViT: 197 fixed)")
    p.add_argument("--layer-batch", type=int, default=None, help="layer and attention cases batch (default 4; quick 2)")
    p.add_argument("--layer-tokens", type=int, default=None,
                   help="ViT layer and attention cases tokens (default 197; quick 16)")
    p.add_argument("--vit-batch", type=int, default=None, help="ViT model batch (default 2; quick 2)")
    p.add_argument("--bert-batch", type=int, default=None, help="BERT model and bert_query batch (default 4; quick 2)")
    p.add_argument("--bert-tokens", type=int, default=None, help="BERT sequence length (default 128; quick 16)")
    p.add_argument("--warmup", type=int, default=None, help="layer-level warm-up calls (default 2; quick 1)")
    p.add_argument("--repeats", type=int, default=None, help="layer-level timed calls (default 7; quick 2)")
    p.add_argument("--model-warmup", type=int, default=None, help="model-level warm-up calls (default 1)")
    p.add_argument("--model-repeats", type=int, default=None, help="model-level timed calls (default 3; quick 2)")
    p.add_argument("--gid-tasks", type=int, default=None, help="learned tasks for Gradient ID (default 10; quick 3)")
    p.add_argument("--mask-dtype", choices=sorted(MASK_DTYPES), default="float32", help="dtype of stored (frozen) masks")
    p.add_argument("--lora-r", type=int, default=8, help="rank of lora[small]")
    p.add_argument("--adapter-m", type=int, default=8, help="bottleneck of adapter[small]")
    p.add_argument("--prefix-len", type=int, default=5,
                   help="prefix (prompt) length P of the attention cases (default 5, DualPrompt's and NoRGa's)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="include torch.compile rows (default on, off with --quick)")
    g.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--candidates", nargs="+", choices=ALL_CANDIDATES, default=None,
                   help="subset of candidates (default all; the floor and lora[matched] always run, ratios need them)")
    p.add_argument("--stat", choices=STATS, default="median",
                   help="statistic of the timed calls used for the table and ratios (JSON has both)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for the run, restored afterwards (default: torch's choice; --quick: 1, "
                        "since tiny ops on a loaded machine are dominated by OpenMP synchronisation)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    return parser


def build_parser() -> argparse.ArgumentParser:
    """A stand-alone ``softtf bench`` parser (``python -m softtf.bench``)."""
    return add_arguments(argparse.ArgumentParser(prog="softtf bench"))


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The BenchConfig of parsed ``softtf bench`` flags (other attributes of ``args`` are ignored);
    an invalid value exits with the message, as argparse does."""
    try:
        return BenchConfig(**{f.name: getattr(args, f.name) for f in fields(BenchConfig)})
    except ValueError as exc:
        raise SystemExit(f"softtf bench: {exc}") from None


def run(config: BenchConfig) -> int:
    """Run, print the table, write JSON/text/Markdown/PNG into ``config.output``; the exit status."""
    os.makedirs(config.output, exist_ok=True)
    result = measure(config)
    table = format_table(result)
    print(table)
    json_path = config.json_path
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1, default=str)
    with open(os.path.join(config.output, "bench.txt"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(config.output, "bench.md"), "w") as f:
        f.write(format_markdown(result))
    if not config.no_plot:
        try:
            plot(result, os.path.join(config.output, "bench.png"))
        except Exception as exc:  # the numbers matter more than the picture
            print(f"softtf bench: plot failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    written = [json_path] + ([] if config.no_plot else [os.path.join(config.output, "bench.png")])
    print(f"\nwrote {' and '.join(written)}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``softtf bench`` without the ``softtf`` CLI: parse ``argv`` (default ``sys.argv[1:]``) and run."""
    return run(config_from_args(build_parser().parse_args(argv)))
