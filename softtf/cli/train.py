"""``softtf train``: from parsed flags to runs (the model, the data, one run per seed, the summary).

Everything here reports misuse as a :class:`CliError`, which :func:`softtf.cli.main` prints on one
line with exit status 2. With ``--nproc N`` (or under torchrun) every worker process runs
:func:`train` with the same flags: rank 0 alone pre-trains the backbone, writes and prints.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import os
import sys

import numpy as np
import torch
from torch.utils.data import Dataset

from ..cl import RunConfig, evaluate_saved, load_data, pretrain, run_continual, text_task_files
from ..cl.config import protocol_settings
from ..cl.distributed import Ranks, init_from_env
from ..cl.labelled import LabelledData, targets_of
from ..cl.scenario import scenario_for
from ..cl.seeds import seed_directory, write_summary
from ..core import SoftConfig, load_tensors, save_tensors
from ..methods import method_class
from .launch import launch_workers, worker_threads

__all__ = ["CliError", "train", "run_config"]


class CliError(Exception):
    """A misuse of ``softtf train``: :func:`softtf.cli.main` prints it on one line and exits with status 2."""


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


def _build_vit(args, out_dir: str, data, seed: int, ranks: Ranks):
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
        if ranks.is_main and not os.path.isfile(path):  # rank 0 pretrains; the others wait, then read its file
            pretrain(model, data.train, data.num_classes, epochs=args.pretrain_epochs, seed=seed,
                     device=args.device, progress=not args.no_progress)
            model.cpu()
            save_tensors(path, model.state_dict())
            ranks.barrier()
        else:
            ranks.barrier()
            advice = ("; pass the flags the run was trained with" if args.command == "eval"
                      else "; delete it to pretrain again")
            try:
                state = load_tensors(path)
            except ValueError as exc:
                raise CliError(f"{exc}{advice}") from None
            try:
                model.load_state_dict(state)
            except RuntimeError as exc:
                first = str(exc).strip().splitlines()[0]
                raise CliError(f"{path!r} does not fit the backbone these flags build ({first}){advice}") from None
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


def _check_trained_run(args, trained: str) -> None:
    """``softtf eval``: ``trained`` must be a run directory with the backbone its ViT was warmed up to."""
    if not os.path.isdir(trained):
        raise CliError(f"--run {trained!r} is not a run directory (the --output of a softtf train run)")
    if os.path.abspath(trained) == os.path.abspath(args.output):
        raise CliError("softtf eval: --output must differ from --run (the trained run stays as it is)")
    warm = os.path.join(trained, "pretrained_backbone.safetensors")
    if args.model == "vit" and args.pretrain_epochs and not os.path.isfile(warm):
        raise CliError(f"--pretrain-epochs {args.pretrain_epochs}, but the run has no {warm!r} to start from; "
                       "pass the flags the run was trained with")


def _join(args) -> Ranks:
    """This process's place among the workers (one process: rank 0 of 1) and its torch threads."""
    world = os.environ.get("WORLD_SIZE", "1")
    if args.nproc not in (1, int(world) if world.isdigit() else None):
        raise CliError(f"--nproc {args.nproc}, but this process is one of WORLD_SIZE={world} (under torchrun leave --nproc out)")
    ranks = init_from_env(args.device)
    threads = args.threads
    if threads is None and ranks.distributed:
        threads = worker_threads(int(os.environ.get("LOCAL_WORLD_SIZE", ranks.world)))
    if threads:
        torch.set_num_threads(threads)
    return ranks


def train(args, argv: list[str]) -> int:
    """Run ``softtf train`` or ``softtf eval`` (``argv``: the flags, which ``--nproc`` workers are started with)."""
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
    evaluating = args.command == "eval"
    if evaluating and args.single_task_reference:
        raise CliError("softtf eval trains nothing: --single-task-reference is for softtf train (pass --reference-acc FILE)")
    if args.nproc > 1 and args.device.startswith("cuda:"):
        raise CliError(f"--nproc {args.nproc} with --device {args.device}: pass --device cuda, each process takes cuda:LOCAL_RANK")
    configs = {seed: run_config(args, seed) for seed in seeds}  # checks every flag (--device too) before any work
    _prepare_output(args.output)
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return launch_workers(argv, args.nproc)  # each worker runs this function again, with its rank
    ranks = _join(args)
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
            cfg = dataclasses.replace(cfg, reference_acc=_single_task_accuracies(args, cfg, data, output, seed, model, ranks))
        trained = (args.run if args.seeds is None else seed_directory(args.run, seed)) if evaluating else output
        if evaluating:
            _check_trained_run(args, trained)
        if args.model == "vit":
            run_model = _build_vit(args, trained, data, seed, ranks)
        else:  # a run adapts its backbone in place: each seed starts from the pretrained one
            run_model = copy.deepcopy(model) if len(configs) > 1 else model
        torch.manual_seed(seed)
        info = {"cli": {"model": args.model, "data": args.data}}
        note = (lambda line: print(f"softtf {args.command}: {line}", file=sys.stderr, flush=True)) if ranks.is_main else None
        if evaluating:
            res = evaluate_saved(run_model, data, cfg, trained, output_dir=output, extra_info=info)
        else:
            res = run_continual(run_model, data, cfg, output_dir=output, extra_info=info, log=note)
        records.append(res.record)
        if ranks.is_main:
            print(json.dumps({"seed": seed, **{k: res[k] for k in _SUMMARY}}, indent=2))
            note(f"results in {os.path.join(output, 'results.json')} (plots beside it)")
    if args.seeds is not None and ranks.is_main:
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


def _single_task_accuracies(args, cfg: RunConfig, data, output: str, seed: int, bert, ranks: Ranks) -> list[float]:
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
        backbone = _build_vit(args, output, data, seed, ranks) if args.model == "vit" else copy.deepcopy(bert)
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


def run_config(args, seed: int) -> RunConfig:
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
        soft_config=soft_config, device=args.device, progress=not args.no_progress, fsdp=args.fsdp, **options,
    )
