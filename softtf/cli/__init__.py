"""The ``softtf`` command line: ``softtf train ...``, ``softtf eval ...`` and ``softtf bench ...``.

    softtf train --model vit --data digits --tasks 5 --method softtf --task-id prompt --output runs/d
    softtf train ... --protocol official --seeds 0 1 2 --output runs/official
    softtf train --model bert --pretrained /path/to/bert --data csv:/data/agnews --tasks 2 ...
    softtf train --model bert --pretrained /path/to/bert --data textdir:/data/text5 [--task-order agnews yelp ...]
    softtf eval --run runs/d <the train flags> --task-id gradient-sample --output runs/d-gradient
    softtf bench [--quick] [--output DIR] ...   (softtf bench --help)

``train`` writes ``results.json``, ``accuracy_matrix.png`` and ``accuracy_curve.png`` (plus
checkpoints and progress) into ``--output``; re-running the same command resumes. With
``--seeds S1 S2 ...`` each seed runs into ``--output/seed-S`` and ``--output/summary.json`` holds
the mean and standard deviation of every metric (:mod:`softtf.cl.seeds`).

Evaluation: both heads (``full``, ``task``) are scored; ``--head`` picks the one the summary
shows. ``--protocol official`` presets the official Soft-TF code's evaluation
(:func:`softtf.cl.config.protocol_settings`); flags given explicitly win over the preset.

Models: ``--model vit`` without ``--pretrained`` builds a random-init timm VisionTransformer of
``--img-size/--patch-size/--depth/--embed-dim/--heads`` (small enough for a CPU);
``--pretrain-epochs N`` then warms it up on the whole training set (a stand-in for pretrained
weights when nothing can be downloaded; saved in the output directory so a resumed run reuses
it). ``--pretrained PATH`` loads local weights: for ViT a timm model name via ``--vit-arch``
plus a ``.safetensors``/``.pth`` state dict; for BERT an HF model directory.

Misuse (bad flags, an ``--output`` that cannot be a directory, an unusable ``--device``, a missing
optional package, a corrupt file in the run directory or given as weights) is reported on one
line on stderr with exit status 2, before any work where it can be known before.
"""
from __future__ import annotations

import sys
from typing import Sequence

from .. import bench
from .parser import build_parser
from .train import CliError, run_config, train

__all__ = ["main", "build_parser", "CliError", "run_config"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``softtf`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("train", "eval"):
        try:
            return train(args, argv)
        except (CliError, ValueError, FileNotFoundError, TypeError) as exc:
            message = " ".join(str(exc).split())  # one line, whatever the exception held
            parser.exit(2, f"softtf {args.command}: error: {message}\n")
    if args.command == "bench":
        return bench.run(bench.config_from_args(args))
    parser.error(f"unknown command {args.command!r}")
    return 2
