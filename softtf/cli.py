"""The ``softtf`` command line: ``softtf train ...`` and ``softtf bench ...``.

    softtf train --model vit --data digits --tasks 5 --method softtf --task-id prompt --output runs/d
    softtf train --model bert --pretrained /path/to/bert --data csv:/data/agnews --tasks 2 ...
    softtf bench [--quick] [--output DIR] ...   (softtf bench --help)

``train`` writes ``results.json``, ``accuracy_matrix.png`` and ``accuracy_curve.png`` (plus
checkpoints and progress) into ``--output``; re-running the same command resumes.

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

import argparse
import importlib.util
import json
import os
import sys
from typing import Sequence

import torch

from . import bench
from .cl import TASK_ID_MODES, RunConfig, load_data, pretrain, run_continual
from .core import SoftConfig, load_tensors, save_tensors
from .methods import method_names

__all__ = ["main", "build_parser", "CliError"]


class CliError(Exception):
    """A misuse of ``softtf train``: :func:`main` prints it on one line and exits with status 2."""


def _number(parse, ok, expected: str):
    """An argparse type: ``parse(text)`` that must satisfy ``ok``, else "expected <expected>"."""

    def convert(text: str):
        try:
            v = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {v}")
        return v

    return convert


_positive_int = _number(int, lambda v: v >= 1, "a positive integer")
_nonneg_int = _number(int, lambda v: v >= 0, "an integer >= 0")
_positive_float = _number(float, lambda v: v > 0, "a positive number")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="softtf", description="Soft-TransFormers continual learning")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="run a class-incremental continual-learning experiment")
    t.add_argument("--model", choices=("vit", "bert"), required=True)
    t.add_argument("--data", required=True, help="digits | cifar100:PATH | folder:PATH | csv:PATH")
    t.add_argument("--tasks", type=_positive_int, default=5, help="number of tasks (default 5)")
    t.add_argument("--method", choices=method_names(), default="softtf")
    t.add_argument("--task-id", choices=TASK_ID_MODES, default=None, help="task inference at test time (default: prompt; finetune: none)")
    t.add_argument("--output", required=True, help="run directory (results, plots, checkpoints; resumable)")
    t.add_argument("--epochs", type=_nonneg_int, default=20)
    t.add_argument("--batch-size", type=_positive_int, default=24)
    t.add_argument("--lr", type=_positive_float, default=None, help="default 0.03*batch_size/256")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="cpu")
    t.add_argument("--pretrained", default=None, help="local weights: ViT state dict file or HF BERT directory")
    t.add_argument("--vit-arch", default=None, help="timm model name for --pretrained ViT weights (e.g. vit_base_patch16_224)")
    t.add_argument("--img-size", type=_positive_int, default=32)
    t.add_argument("--patch-size", type=_positive_int, default=8)
    t.add_argument("--depth", type=_positive_int, default=4)
    t.add_argument("--embed-dim", type=_positive_int, default=64)
    t.add_argument("--heads", type=_positive_int, default=4)
    t.add_argument("--pretrain-epochs", type=_nonneg_int, default=0, help="warm up a random-init ViT on all training data first")
    t.add_argument("--max-length", type=_positive_int, default=128, help="token length for text data")
    t.add_argument("--layers", type=int, nargs="+", default=None, help="block indices to mask (default: last 3)")
    t.add_argument("--target-modules", nargs="+", default=None, help="module name suffixes to mask")
    t.add_argument("--k-shot", type=_positive_int, default=7)
    t.add_argument("--lora-r", type=_positive_int, default=8)
    t.add_argument("--adapter-bottleneck", type=_positive_int, default=16, help="bottleneck width of --method adapter")
    t.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    t.add_argument("--no-progress", action="store_true", help="hide tqdm progress bars")

    b = sub.add_parser("bench", help="throughput and peak memory of Soft-TF against LoRA, Adapters and eager (softtf.bench)")
    bench.add_arguments(b)
    return p


# Optional packages (the ``models`` extra) a run needs: (module, what needs it, does this run need it).
_OPTIONAL = (
    ("matplotlib", "the plots of softtf train", lambda a: True),
    ("timm", "--model vit", lambda a: a.model == "vit"),
    ("transformers", "--model bert", lambda a: a.model == "bert"),
    ("peft", "--method lora", lambda a: a.method == "lora"),
    ("sklearn", "--data digits", lambda a: a.data == "digits"),
    ("PIL", "--data folder:PATH", lambda a: a.data.startswith("folder:")),
)


def _check_optional_packages(args) -> None:
    missing = [f"{mod} (for {why})" for mod, why, needed in _OPTIONAL if needed(args) and importlib.util.find_spec(mod) is None]
    if missing:
        raise CliError(f"missing optional packages: {', '.join(missing)}; install them with: pip install 'softtf[models]'")


def _prepare_output(path: str) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise CliError(f"--output {path!r} is a file; expected a run directory (created if missing)")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise CliError(f"--output {path!r}: cannot create the run directory ({exc.strerror or exc})") from None


def _load_weights(path: str, what: str) -> dict:
    """A state dict from a ``.safetensors`` or torch file, or a CliError naming ``what`` and the file."""
    try:
        if path.endswith(".safetensors"):
            return load_tensors(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged file makes torch.load raise nearly any type (IndexError, EOFError, ...)
        raise CliError(f"{what} {path!r} is not a readable weights file ({type(exc).__name__}: {exc})") from None


def _build_vit(args, out_dir: str, data):
    if args.pretrained:
        import timm  # optional heavy dependency: only ViT runs need it

        if not args.vit_arch:
            raise CliError("--pretrained with --model vit needs --vit-arch (the timm model name)")
        if not os.path.isfile(args.pretrained):
            raise CliError(f"--pretrained {args.pretrained!r} is not a file")
        model = timm.create_model(args.vit_arch, pretrained=False, num_classes=0, img_size=args.img_size)
        state = _load_weights(args.pretrained, "--pretrained")
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CliError(f"--pretrained weights do not fit {args.vit_arch}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return model
    from timm.models.vision_transformer import VisionTransformer  # optional, as above

    if args.img_size % args.patch_size:
        raise CliError(f"--img-size {args.img_size} must be divisible by --patch-size {args.patch_size}")
    if args.embed_dim % args.heads:
        raise CliError(f"--embed-dim {args.embed_dim} must be divisible by --heads {args.heads}")
    torch.manual_seed(args.seed)
    model = VisionTransformer(
        img_size=args.img_size, patch_size=args.patch_size, num_classes=0,
        embed_dim=args.embed_dim, depth=args.depth, num_heads=args.heads,
    )
    if args.pretrain_epochs:
        path = os.path.join(out_dir, "pretrained_backbone.safetensors")
        if os.path.isfile(path):
            advice = "; delete it to pretrain again"
            try:
                state = load_tensors(path)
            except ValueError as exc:
                raise CliError(f"{exc}{advice}") from None
            try:
                model.load_state_dict(state)
            except RuntimeError as exc:
                first = str(exc).strip().splitlines()[0]
                raise CliError(f"{path!r} does not fit the backbone these flags build ({first}){advice}") from None
        else:
            pretrain(model, data.train, data.num_classes, epochs=args.pretrain_epochs, seed=args.seed,
                     device=args.device, progress=not args.no_progress)
            model.cpu()
            save_tensors(path, model.state_dict())
    return model


def _train(args) -> int:
    if args.model == "bert" and not args.data.startswith("csv:"):
        raise CliError(f"--model bert needs text data (--data csv:PATH), got {args.data!r}")
    if args.model == "vit" and args.data.startswith("csv:"):
        raise CliError("--model vit needs image data (digits, cifar100:PATH, folder:PATH)")
    _check_optional_packages(args)
    soft_config = None
    if args.layers is not None or args.target_modules is not None:
        soft_config = SoftConfig(target_modules=args.target_modules, layers=args.layers).to_dict()
    cfg = RunConfig(  # checks the flags it holds (--device included) before any work
        method=args.method, n_tasks=args.tasks, task_id=args.task_id, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, seed=args.seed, k_shot=args.k_shot, lora_r=args.lora_r,
        adapter_bottleneck=args.adapter_bottleneck,
        soft_config=soft_config, device=args.device, progress=not args.no_progress,
    )
    _prepare_output(args.output)
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = model = None
    if args.model == "bert":
        if not args.pretrained:
            raise CliError("--model bert needs --pretrained DIR (a local HF BERT directory)")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoTokenizer, BertModel  # optional heavy dependency: BERT runs only

        if not os.path.isdir(args.pretrained):
            raise CliError(f"--pretrained {args.pretrained!r} is not a directory")
        try:
            tokenizer = AutoTokenizer.from_pretrained(args.pretrained)
            model = BertModel.from_pretrained(args.pretrained, add_pooling_layer=False)
        except (OSError, ValueError) as exc:
            raise CliError(f"--pretrained {args.pretrained!r} is not a readable HF BERT directory ({exc})") from None
    data = load_data(args.data, img_size=args.img_size, tokenizer=tokenizer, seed=args.seed, max_length=args.max_length)
    if args.model == "vit":
        model = _build_vit(args, args.output, data)
    torch.manual_seed(args.seed)
    res = run_continual(model, data, cfg, output_dir=args.output, extra_info={"cli": {"model": args.model, "data": args.data}})
    summary = {k: res[k] for k in ("method", "task_id_mode", "acc", "forgetting", "bwt", "task_id_accuracy")}
    print(json.dumps(summary, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``softtf`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "train":
        try:
            return _train(args)
        except (CliError, ValueError, FileNotFoundError, TypeError) as exc:
            message = " ".join(str(exc).split())  # one line, whatever the exception held
            parser.exit(2, f"softtf train: error: {message}\n")
    if args.command == "bench":
        return bench.run(bench.config_from_args(args))
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
