"""The ``softtf`` command line: ``softtf train ...`` and ``softtf bench ...``.

    softtf train --model vit --data digits --tasks 5 --method softtf --task-id prompt --output runs/d
    softtf train ... --protocol official --seeds 0 1 2 --output runs/official
    softtf train --model bert --pretrained /path/to/bert --data csv:/data/agnews --tasks 2 ...
    softtf train --model bert --pretrained /path/to/bert --data textdir:/data/text5 [--task-order agnews yelp ...]
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

import argparse
import copy
import dataclasses
import importlib.util
import json
import os
import sys
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from . import bench
from .cl import TASK_ID_MODES, RunConfig, load_data, pretrain, run_continual, text_task_files
from .cl.config import (CLASSES_PER_TASK, HEAD_MODES, PROMPT_ACTIVATIONS, PROTOCOLS, TASK_ID_INFO, TII_COVARIANCES, TRANSFER_METRICS,
                        protocol_settings)
from .cl.labelled import LabelledData, targets_of
from .cl.scenario import scenario_for
from .cl.seeds import seed_directory, write_summary
from .core import SoftConfig, load_tensors, save_tensors
from .methods import method_class, method_names
from .version import VERSION

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
_size_or_matched = _number(lambda t: t if t == "matched" else int(t), lambda v: v == "matched" or v >= 1,
                           "a positive integer or 'matched'")
_topk = _number(lambda t: t if t == CLASSES_PER_TASK else int(t), lambda v: v == CLASSES_PER_TASK or v >= 2,
                f"an integer >= 2 or {CLASSES_PER_TASK!r}")
_TASK_ID_HELP = "; ".join(f"{m}: {what} ({how})" for m, (how, what) in TASK_ID_INFO.items())


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the help already states one."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text.lower() or action.default in (None, False, argparse.SUPPRESS)
                or action.option_strings == [] or action.required):
            return text
        return f"{text} (default: %(default)s)".lstrip()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="softtf", description="Soft-TransFormers continual learning")
    p.add_argument("--version", action="version", version=f"softtf {VERSION}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="run a class-incremental continual-learning experiment", formatter_class=_HelpFormatter)
    t.add_argument("--model", choices=("vit", "bert"), required=True,
                   help="backbone: a timm ViT (random init or --pretrained) or a Hugging Face BERT (--pretrained DIR)")
    t.add_argument("--data", required=True, help="digits | cifar100:PATH | folder:PATH | csv:PATH | textdir:PATH (one CSV per task)")
    t.add_argument("--task-order", nargs="+", default=None, metavar="TASK",
                   help="textdir: the tasks (file stems) in order (default: PATH/order.txt, else sorted names)")
    t.add_argument("--tasks", type=_positive_int, default=None,
                   help="number of tasks (default 5; textdir: the number of tasks in the folder, which it must equal)")
    t.add_argument("--method", choices=method_names(), default="softtf", help="continual-learning method")
    t.add_argument("--masks", action="store_true",
                   help="prompt methods (l2p, dualprompt, norga): add Soft-TF masks (--layers/--target-modules; default qkv + proj "
                        "of the last 3 blocks); the inferred task picks the E-prompt and the mask")
    t.add_argument("--prompt-activation", choices=PROMPT_ACTIVATIONS, default="sigmoid",
                   help="norga: the gate's activation (default sigmoid, the official Sup-21K scripts)")
    t.add_argument("--task-id", choices=TASK_ID_MODES, default=None,
                   help=f"task inference at test time (default: prompt; finetune, l2p, sapt, sapt-softtf: none; l2p --masks: prompt). "
                        f"{_TASK_ID_HELP}")
    t.add_argument("--output", required=True, help="run directory (results, plots, checkpoints; resumable)")
    t.add_argument("--epochs", type=_nonneg_int, default=20, help="training epochs per task")
    t.add_argument("--batch-size", type=_positive_int, default=24, help="training batch size")
    t.add_argument("--lr", type=_positive_float, default=None, help="default 0.03*batch_size/256")
    t.add_argument("--seed", type=int, default=0, help="seed of the class order, data split, init and training")
    t.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="run once per seed into OUTPUT/seed-S (each resumable) and write OUTPUT/summary.json (mean, std)")
    t.add_argument("--device", default="cpu", help="cpu | cuda[:i]")
    t.add_argument("--pretrained", default=None, help="local weights: ViT state dict file or HF BERT directory")
    t.add_argument("--vit-arch", default=None, help="timm model name for --pretrained ViT weights (e.g. vit_base_patch16_224)")
    t.add_argument("--img-size", type=_positive_int, default=32, help="ViT input size (digits are resized to it)")
    t.add_argument("--patch-size", type=_positive_int, default=8, help="ViT patch size (random-init ViT)")
    t.add_argument("--depth", type=_positive_int, default=4, help="ViT blocks (random-init ViT)")
    t.add_argument("--embed-dim", type=_positive_int, default=64, help="ViT width (random-init ViT)")
    t.add_argument("--heads", type=_positive_int, default=4, help="ViT attention heads (random-init ViT)")
    t.add_argument("--pretrain-epochs", type=_nonneg_int, default=0, help="warm up a random-init ViT on all training data first")
    t.add_argument("--max-length", type=_positive_int, default=128, help="token length for text data")
    t.add_argument("--layers", type=int, nargs="+", default=None, help="block indices to mask (default: last 3)")
    t.add_argument("--target-modules", nargs="+", default=None, help="module name suffixes to mask")
    e = t.add_argument_group("evaluation (default: RunConfig's; --protocol official presets the official code's)")
    e.add_argument("--protocol", choices=PROTOCOLS, default="default",
                   help="official: test batches of 24, whole head, Prompt-ID vote over each batch against every pool key "
                        "(U(-1,1) init), Gradient ID from 7 samples per batch, entropy over the top C/T logits of the head")
    e.add_argument("--head", choices=HEAD_MODES, default=None,
                   help="head the summary shows (results.json holds both): full = argmax over every seen class (default), "
                        "task = over the inferred task's classes")
    e.add_argument("--eval-batch-size", type=_positive_int, default=None, help="test batch size (default 64)")
    e.add_argument("--k-shot", type=_positive_int, default=None, help="samples per test batch of --task-id gradient (default 7)")
    e.add_argument("--gradient-topk", type=_topk, default=None,
                   help=f"Gradient-ID entropy over the top-k logits: an int or {CLASSES_PER_TASK} (C/T); default all")
    e.add_argument("--gradient-logits", choices=("seen", "all"), default=None,
                   help="logits of the Gradient-ID entropy: seen classes (default) or the whole head")
    e.add_argument("--prompt-key-init", choices=("normal", "uniform"), default=None, help="Prompt-ID keys N(0, 0.02^2) or U(-1, 1)")
    e.add_argument("--prompt-pool", action=argparse.BooleanOptionalAction, default=None,
                   help="create every task's Prompt-ID key up front and match against all of them, untrained ones too")
    c = t.add_argument_group("task-identity classifier (--task-id classifier; HiDe-Prompt's defaults)")
    c.add_argument("--tii-epochs", type=_nonneg_int, default=20, help="epochs on each task's pretrained features (default 20)")
    c.add_argument("--tii-ca-epochs", type=_nonneg_int, default=30,
                   help="epochs of alignment on Gaussian samples of every seen class, from task 2 on (default 30)")
    c.add_argument("--tii-lr", type=_positive_float, default=None, help="Adam lr on the features (default 0.0005*batch_size/256)")
    c.add_argument("--tii-ca-lr", type=_positive_float, default=None, help="SGD lr of the alignment (default 0.005*batch_size/256)")
    c.add_argument("--tii-samples-per-class", type=_positive_int, default=None,
                   help="Gaussian samples per class and alignment epoch (default: --batch-size)")
    c.add_argument("--tii-covariance", choices=TII_COVARIANCES, default="full",
                   help="class statistics: full covariance (default) or diagonal (d numbers per class instead of d^2)")
    t.add_argument("--lora-r", type=_size_or_matched, default=8, help="LoRA rank, or 'matched' (Soft-TF's parameters per task)")
    t.add_argument("--adapter-bottleneck", type=_size_or_matched, default=16,
                   help="bottleneck width of --method adapter, or 'matched' (Soft-TF's parameters per task)")
    sa = t.add_argument_group("SAPT (--method sapt, the official code's defaults; sapt-softtf: Soft-TF masks on --layers/--target-modules "
                               "instead of LoRA) and its transfer metrics (every method)")
    sa.add_argument("--sapt-r", type=_positive_int, default=4, help="LoRA rank of each task's block on q and v (default 4)")
    sa.add_argument("--sapt-alpha", type=_positive_float, default=32.0, help="LoRA alpha; scaling alpha/r (default 32)")
    sa.add_argument("--sapt-kl-ratio", type=_number(float, lambda v: v >= 0, "a number >= 0"), default=0.5,
                    help="weight of the attentive reflection's KL term (default 0.5)")
    sa.add_argument("--sapt-replay-size", type=_nonneg_int, default=32,
                    help="training inputs stored per task and replayed for the reflection (default 32; 0: none)")
    sa.add_argument("--reference-acc", default=None, metavar="FILE",
                    help="JSON file of single-task accuracies (%%) for FWT: a list in task order or {task name: acc}")
    sa.add_argument("--single-task-reference", action="store_true",
                    help="first train each task alone (same method and flags; OUTPUT/single-task/TASK, resumable) and use "
                         "their accuracies as --reference-acc")
    sa.add_argument("--transfer-metrics", choices=TRANSFER_METRICS, default="paper",
                    help="paper: FWT against --reference-acc, BWT over T-1 tasks; official: SAPT score.py's "
                         "(FWT = mean diagonal - 50.94, BWT over all T tasks)")
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


def _build_vit(args, out_dir: str, data, seed: int):
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
    torch.manual_seed(seed)
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
            pretrain(model, data.train, data.num_classes, epochs=args.pretrain_epochs, seed=seed,
                     device=args.device, progress=not args.no_progress)
            model.cpu()
            save_tensors(path, model.state_dict())
    return model


def _task_count(args) -> int:
    """``--tasks`` (default 5); with ``--data textdir:PATH`` the folder's number of tasks, which
    ``--tasks`` must equal when given (the listing and ``order.txt`` are read, nothing else)."""
    if not args.data.startswith("textdir:"):
        if args.task_order is not None:
            raise CliError(f"--task-order applies to --data textdir:PATH only, got --data {args.data!r}")
        return 5 if args.tasks is None else args.tasks
    root = args.data[len("textdir:"):]
    if not root:
        raise CliError("--data textdir: needs a path, as in textdir:/data/text_tasks")
    names = [name for name, _ in text_task_files(root, args.task_order)]
    if args.tasks is not None and args.tasks != len(names):
        raise CliError(
            f"--tasks {args.tasks} does not match --data {args.data!r}, which holds {len(names)} tasks "
            f"({', '.join(names)}); leave --tasks out, pass --tasks {len(names)}, or pick tasks with --task-order"
        )
    return len(names)


def _train(args) -> int:
    text = args.data.startswith(("csv:", "textdir:"))
    if args.model == "bert" and not text:
        raise CliError(f"--model bert needs text data (--data csv:PATH or textdir:PATH), got {args.data!r}")
    if args.model == "vit" and text:
        raise CliError("--model vit needs image data (digits, cifar100:PATH, folder:PATH)")
    args.tasks = _task_count(args)
    _check_optional_packages(args)
    seeds = args.seeds if args.seeds is not None else [args.seed]
    if len(set(seeds)) != len(seeds):
        raise CliError(f"--seeds must be distinct, got {seeds}")
    if args.single_task_reference and args.reference_acc:
        raise CliError("--single-task-reference computes the reference accuracies; do not also pass --reference-acc")
    configs = {seed: _run_config(args, seed) for seed in seeds}  # checks every flag (--device too) before any work
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
    records = []
    for seed, cfg in configs.items():
        output = args.output if args.seeds is None else seed_directory(args.output, seed)
        if args.seeds is not None:
            _prepare_output(output)
        data = load_data(args.data, img_size=args.img_size, tokenizer=tokenizer, seed=seed, max_length=args.max_length,
                         task_order=args.task_order)
        if args.single_task_reference:
            cfg = dataclasses.replace(cfg, reference_acc=_single_task_accuracies(args, cfg, data, output, seed, model))
        if args.model == "vit":
            run_model = _build_vit(args, output, data, seed)
        else:  # a run adapts its backbone in place: each seed starts from the pretrained one
            run_model = copy.deepcopy(model) if len(configs) > 1 else model
        torch.manual_seed(seed)
        res = run_continual(run_model, data, cfg, output_dir=output, extra_info={"cli": {"model": args.model, "data": args.data}})
        records.append(res.record)
        print(json.dumps({"seed": seed, **{k: res[k] for k in _SUMMARY}}, indent=2))
    if args.seeds is not None:
        summary = write_summary(args.output, records, seeds)
        brief = {m: {k: summary["metrics"][m][k] for k in ("mean", "std")} for m in _SUMMARY if m in summary["metrics"]}
        print(json.dumps({"seeds": seeds, "summary": os.path.join(args.output, "summary.json"), **brief}, indent=2))
    return 0


_SUMMARY = ("method", "task_id_mode", "task_id_label", "protocol", "head", "acc", "forgetting", "forgetting_official", "bwt",
            "task_id_accuracy", "task_id_accuracy_per_task")
# flag -> RunConfig field of the evaluation options a --protocol preset may set
_EVAL_FLAGS = {"head": "head", "eval_batch_size": "eval_batch_size", "k_shot": "k_shot", "gradient_topk": "gradient_topk",
               "gradient_logits": "gradient_logits", "prompt_key_init": "prompt_key_init", "prompt_pool": "prompt_pool"}


class _TaskOnly(Dataset):
    """The samples of ``classes`` in ``ds``, relabelled 0..k-1 in that order (a single-task run's data)."""

    def __init__(self, ds: Dataset, classes: list[int]):
        targets = targets_of(ds)
        self.index = np.flatnonzero(np.isin(targets, classes))
        remap = {c: k for k, c in enumerate(classes)}
        self.ds, self.remap = ds, remap
        self.targets = np.asarray([remap[int(y)] for y in targets[self.index]], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i):
        x, y = self.ds[int(self.index[i])]
        return x, self.remap[int(y)]


def _single_task_accuracies(args, cfg: RunConfig, data, output: str, seed: int, bert) -> list[float]:
    """``--single-task-reference``: each task of the run trained alone from the pretrained backbone
    (its classes relabelled, one task, the run's method and recipe) into OUTPUT/single-task/TASK;
    returns their accuracies, the reference of SAPT's FWT."""
    scenario = scenario_for(data, cfg.n_tasks, seed=cfg.seed)
    one = dataclasses.replace(cfg, n_tasks=1, reference_acc=None)
    accs = []
    for t in range(cfg.n_tasks):
        classes, name = scenario.task_classes[t], scenario.task_name(t)
        sub = LabelledData(_TaskOnly(data.train, classes), _TaskOnly(data.test, classes), len(classes),
                           [data.class_names[c] for c in classes], data.kind, {**data.info, "single_task_of": name})
        backbone = _build_vit(args, output, data, seed) if args.model == "vit" else copy.deepcopy(bert)
        torch.manual_seed(seed)
        res = run_continual(backbone, sub, one, output_dir=os.path.join(output, "single-task", name),
                            extra_info={"cli": {"model": args.model, "data": args.data, "single_task_of": name}})
        accs.append(float(res["acc"]))
    return accs


def _reference_acc(args) -> list | None:
    """``--reference-acc FILE``: a JSON list (task order) or ``{task name: accuracy}`` -> a list."""
    if args.reference_acc is None:
        return None
    try:
        with open(args.reference_acc) as fh:
            ref = json.load(fh)
    except (OSError, ValueError) as exc:
        raise CliError(f"--reference-acc {args.reference_acc!r} is not a readable JSON file ({exc})") from None
    if isinstance(ref, dict):
        names = ([n for n, _ in text_task_files(args.data[len("textdir:"):], args.task_order)] if args.data.startswith("textdir:")
                 else [f"task{t}" for t in range(args.tasks)])
        missing = [n for n in names if n not in ref]
        if missing:
            raise CliError(f"--reference-acc {args.reference_acc!r} has no accuracy for tasks {missing} (it has {sorted(ref)})")
        ref = [ref[n] for n in names]
    return ref


def _run_config(args, seed: int) -> RunConfig:
    """The RunConfig of one seed: the --protocol preset, then every evaluation flag given explicitly."""
    soft_config = None
    if args.layers is not None or args.target_modules is not None:
        soft_config = SoftConfig(target_modules=args.target_modules, layers=args.layers).to_dict()
    options = {"task_id": args.task_id or method_class(args.method).resolve_task_id(args)}
    options.update(protocol_settings(args.protocol, options["task_id"]))
    options.update({field: getattr(args, flag) for flag, field in _EVAL_FLAGS.items() if getattr(args, flag) is not None})
    return RunConfig(
        method=args.method, n_tasks=args.tasks, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, seed=seed, lora_r=args.lora_r,
        adapter_bottleneck=args.adapter_bottleneck, masks=args.masks, prompt_activation=args.prompt_activation, tii_epochs=args.tii_epochs, tii_ca_epochs=args.tii_ca_epochs,
        tii_lr=args.tii_lr, tii_ca_lr=args.tii_ca_lr, tii_samples_per_class=args.tii_samples_per_class,
        tii_covariance=args.tii_covariance, sapt_r=args.sapt_r, sapt_alpha=args.sapt_alpha, sapt_kl_ratio=args.sapt_kl_ratio,
        sapt_replay_size=args.sapt_replay_size, reference_acc=_reference_acc(args), transfer_metrics=args.transfer_metrics,
        soft_config=soft_config, device=args.device, progress=not args.no_progress, **options,
    )


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
