"""The argument parser of ``softtf``: ``train`` and ``bench`` (bench's flags come from :mod:`softtf.bench`)."""
from __future__ import annotations

import argparse

from .. import bench
from ..cl import TASK_ID_MODES
from ..cl.config import (CLASSES_PER_TASK, HEAD_MODES, PROMPT_ACTIVATIONS, PROTOCOLS, TASK_ID_INFO, TII_COVARIANCES, TRANSFER_METRICS)
from ..methods import method_names
from ..version import VERSION

__all__ = ["build_parser", "add_run_arguments"]


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
    add_run_arguments(t)
    t.add_argument("--output", required=True, help="run directory (results, plots, checkpoints; resumable)")
    ev = sub.add_parser("eval", formatter_class=_HelpFormatter,
                        help="score a trained run's checkpoints with other evaluation settings (task inference, head, "
                             "batch), without training",
                        description="softtf eval --run DIR <the train command's flags> --task-id MODE --output NEW: "
                                    "every task's checkpoint in DIR is scored as the run scored it; only the evaluation "
                                    "flags may differ from the run's")
    ev.add_argument("--run", required=True, metavar="DIR", help="the trained run's directory (its --output)")
    add_run_arguments(ev)
    ev.add_argument("--output", required=True, help="directory for the new results.json and plots (not DIR)")

    b = sub.add_parser("bench", help="throughput and peak memory of Soft-TF against LoRA, Adapters and eager (softtf.bench)")
    bench.add_arguments(b)
    return p


def add_run_arguments(t: argparse.ArgumentParser) -> None:
    """The flags of ``softtf train`` (and of ``softtf eval``, which rebuilds the same run)."""
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
    t.add_argument("--threads", type=_positive_int, default=None,
                   help="torch CPU threads per process (default: torch's choice; with --nproc N: the cores / N)")
    t.add_argument("--nproc", type=_positive_int, default=1,
                   help="data-parallel worker processes on this machine (DDP; gloo on cpu, nccl on cuda); "
                        "under torchrun leave it out: RANK / WORLD_SIZE come from the environment")
    t.add_argument("--fsdp", action="store_true",
                   help="with several processes: shard the backbone's frozen blocks across them with FSDP2 "
                        "(for backbones too large for one device; same results as DDP alone)")
    t.add_argument("--no-progress", action="store_true", help="hide tqdm progress bars")
