"""The softtf command line: argument errors, a tiny train run on digits, the bench subcommand."""
import json
import sys

import numpy as np
import pytest
import torch

from softtf.cli import build_parser, main, run_config


pytestmark = pytest.mark.usefixtures("one_thread")


def base_args(tmp_path, *extra):
    return ["train", "--model", "vit", "--data", "digits", "--output", str(tmp_path / "run"), "--no-progress", *extra]


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--tasks", "0"], "expected a positive integer, got 0"),
        (["--epochs", "-1"], "expected an integer >= 0, got -1"),
        (["--lr", "abc"], "expected a positive number, got 'abc'"),
        (["--method", "ewc"], "invalid choice: 'ewc'"),
        (["--task-id", "magic"], "invalid choice: 'magic'"),
    ],
)
def test_argparse_errors(tmp_path, capsys, extra, match):
    with pytest.raises(SystemExit) as exc:
        main(base_args(tmp_path, *extra))
    assert exc.value.code == 2
    assert match in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--method", "finetune", "--task-id", "prompt"], "method 'finetune' supports task_id in"),
        (["--tasks", "3"], "num_classes=10 is not divisible by n_tasks=3"),
        (["--layers", "9"], "layers contains 9"),
    ],
)
def test_config_errors_exit_with_message(tmp_path, capsys, extra, match):
    with pytest.raises(SystemExit) as exc:
        main(base_args(tmp_path, "--epochs", "0", "--depth", "2", "--img-size", "16", "--patch-size", "4", *extra))
    assert exc.value.code == 2
    assert match in capsys.readouterr().err


def test_train_digits_writes_results_and_plots(tmp_path, capsys):
    args = base_args(
        tmp_path, "--tasks", "2", "--epochs", "1", "--img-size", "16", "--patch-size", "4", "--depth", "2",
        "--embed-dim", "32", "--method", "softtf", "--task-id", "oracle", "--head", "task", "--lr", "0.01", "--threads", "1",
        "--pretrain-epochs", "1",
    )
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["method"] == "softtf" and summary["task_id_mode"] == "oracle"
    run = tmp_path / "run"
    res = json.loads((run / "results.json").read_text())
    assert len(res["accuracy_matrix"]) == 2 and res["accuracy_matrix"][0][1] is None
    assert res["forgetting"] == 0.0  # oracle Soft-TF: frozen masks, untouched head rows
    for png in ("accuracy_matrix.png", "accuracy_curve.png"):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["task_000.safetensors", "task_001.safetensors"]
    warm = (run / "pretrained_backbone.safetensors").read_bytes()  # the warmed-up backbone, reused on resume
    # same command again: both tasks are finished, nothing retrains, same results
    assert main(args) == 0
    assert json.loads((run / "results.json").read_text())["accuracy_matrix"] == res["accuracy_matrix"]
    assert (run / "pretrained_backbone.safetensors").read_bytes() == warm
    # a different configuration in the same directory is refused
    with pytest.raises(SystemExit):
        main([*args[:-2], "--lr", "0.02"])
    assert "belongs to a different run" in capsys.readouterr().err


def test_bench_is_a_subcommand(monkeypatch, capsys):
    """`softtf bench` flags are parsed by the softtf parser and reach softtf.bench as a BenchConfig."""
    import softtf.bench

    seen = {}

    def fake_run(config):
        seen["config"] = config
        return 0

    monkeypatch.setattr(softtf.bench, "run", fake_run)
    assert main(["bench", "--quick", "--cases", "vit_proj", "--repeats", "5", "--no-plot"]) == 0
    cfg = seen["config"]
    assert isinstance(cfg, softtf.bench.BenchConfig)
    assert (cfg.quick, cfg.cases, cfg.repeats, cfg.no_plot, cfg.layer_batch) == (True, ["vit_proj"], 5, True, 2)
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--no-such-flag"])
    assert exc.value.code == 2 and "--no-such-flag" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--help"])
    assert exc.value.code == 0 and "--mask-dtype" in capsys.readouterr().out


def test_no_command_is_an_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2


def test_pretrained_vit_weights_errors(tmp_path, capsys):
    from safetensors.torch import save_file

    _fails(base_args(tmp_path, "--pretrained", str(tmp_path / "missing.pt"), "--vit-arch", "vit_tiny_patch16_224"),
           capsys, "missing.pt' is not a file")
    save_file({"foo": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
    _fails(base_args(tmp_path, "--pretrained", str(tmp_path / "w.safetensors"), "--vit-arch", "vit_tiny_patch16_224"),
           capsys, "weights do not fit vit_tiny_patch16_224: missing ['cls_token'")


# ---------------------------------------------------------------- misuse: one line on stderr, exit status 2
def _fails(argv, capsys, *needles):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert err.startswith("softtf train: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


TINY = ["--epochs", "0", "--tasks", "2", "--img-size", "8", "--patch-size", "4", "--depth", "1", "--embed-dim", "16",
        "--heads", "2", "--task-id", "oracle"]


def test_bad_output_and_device_are_one_line_errors(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for output in (blocker, blocker / "run"):
        _fails(["train", "--model", "vit", "--data", "digits", "--output", str(output), *TINY], capsys, f"--output {str(output)!r}")
    _fails(base_args(tmp_path, *TINY, "--device", "bogus"), capsys, "device must be a torch device", "'bogus'")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _fails(base_args(tmp_path, *TINY, "--device", "cuda"), capsys, "device 'cuda'", "no CUDA GPU is available")
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_corrupt_progress_json_names_the_file(tmp_path, capsys):
    assert main(base_args(tmp_path, *TINY)) == 0
    capsys.readouterr()  # the run's own lines (where it wrote its results)
    progress = tmp_path / "run" / "progress.json"
    for text in ("{}", progress.read_text()[:25], '{"finished_tasks": 7}', '{"finished_tasks": "2"}'):
        progress.write_text(text)
        _fails(base_args(tmp_path, *TINY), capsys, f"{str(progress)!r}", "delete")
    (tmp_path / "run" / "run_config.json").write_text('{"run_config": {"meth')
    _fails(base_args(tmp_path, *TINY), capsys, "run_config.json' is not valid JSON")


def test_truncated_weight_files_name_the_file(tmp_path, capsys):
    from safetensors.torch import save_file

    run = tmp_path / "run"
    run.mkdir()
    backbone = run / "pretrained_backbone.safetensors"
    save_file({"w": torch.zeros(64)}, str(backbone))
    backbone.write_bytes(backbone.read_bytes()[:-40])
    _fails(base_args(tmp_path, *TINY, "--pretrain-epochs", "1"), capsys, f"{str(backbone)!r}", "delete it")
    save_file({"pos_embed": torch.zeros(2)}, str(backbone))  # readable, but not this model's weights
    _fails(base_args(tmp_path, *TINY, "--pretrain-epochs", "1"), capsys, f"{str(backbone)!r}", "does not fit")
    for name in ("w.safetensors", "w.pth"):
        weights = tmp_path / name
        weights.write_bytes(b"\x80\x02truncated")
        _fails(base_args(tmp_path, *TINY, "--pretrained", str(weights), "--vit-arch", "vit_tiny_patch16_224"),
               capsys, f"--pretrained {str(weights)!r}")


@pytest.mark.parametrize("argv, package", [
    (["--model", "vit", "--data", "digits"], "matplotlib"),
    (["--model", "vit", "--data", "digits"], "timm"),
    (["--model", "vit", "--data", "digits", "--method", "lora"], "peft"),
    (["--model", "bert", "--data", "csv:x.csv", "--pretrained", "bert_dir"], "transformers"),
])
def test_missing_optional_package_is_named_at_start(tmp_path, capsys, monkeypatch, argv, package):
    monkeypatch.setitem(sys.modules, package, None)  # what `import package` sees when it is not installed
    out = tmp_path / "run"
    _fails(["train", *argv, "--output", str(out), "--no-progress"], capsys, package, "pip install 'softtf[models]'")
    assert not out.exists()  # checked before any work, not after the run


def test_usage_errors_exit_2_with_one_line(tmp_path, capsys):
    _fails(["train", "--model", "bert", "--data", "digits", "--output", str(tmp_path)], capsys, "--model bert needs text data")
    _fails(["train", "--model", "vit", "--data", "csv:x.csv", "--output", str(tmp_path)], capsys, "--model vit needs image data")
    _fails(base_args(tmp_path, "--patch-size", "5"), capsys, "must be divisible by --patch-size 5")
    _fails(base_args(tmp_path, "--pretrained", "w.pt"), capsys, "--pretrained with --model vit needs --vit-arch")


def test_seeds_run_per_seed_directories_and_a_summary(tmp_path, capsys):
    args = base_args(
        tmp_path, "--tasks", "2", "--epochs", "1", "--img-size", "16", "--patch-size", "4", "--depth", "2",
        "--embed-dim", "32", "--method", "softtf", "--task-id", "gradient-sample", "--lr", "0.01", "--threads", "1",
        "--seeds", "0", "1",
    )
    assert main(args) == 0
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    per_seed = [json.loads((run / f"seed-{s}" / "results.json").read_text()) for s in (0, 1)]
    assert summary["seeds"] == [0, 1] and summary["task_id_mode"] == "gradient-sample"
    accs = [r["acc"] for r in per_seed]
    assert summary["metrics"]["acc"]["values"] == accs
    assert summary["metrics"]["acc"]["mean"] == pytest.approx(np.mean(accs))
    assert summary["metrics"]["acc"]["std"] == pytest.approx(np.std(accs, ddof=1))
    assert set(summary["heads"]) == {"full", "task"}
    aps = [r["sapt"]["AP"] for r in per_seed]  # SAPT's metrics are summarized too
    assert summary["sapt"]["AP"]["values"] == aps and summary["sapt"]["AP"]["mean"] == pytest.approx(np.mean(aps))
    assert summary["heads"]["task"]["sapt"]["F.Ra"]["values"] == [r["heads"]["task"]["sapt"]["F.Ra"] for r in per_seed]
    assert per_seed[0]["run_config"]["seed"] == 0 and per_seed[1]["run_config"]["seed"] == 1
    printed = capsys.readouterr().out
    assert '"seeds": [' in printed and "summary.json" in printed
    # the same command again resumes every seed: nothing changes
    assert main(args) == 0
    assert json.loads((run / "summary.json").read_text())["metrics"] == summary["metrics"]


def test_protocol_official_flags(tmp_path, capsys):
    args = base_args(
        tmp_path, "--tasks", "2", "--epochs", "0", "--img-size", "16", "--patch-size", "4", "--depth", "2",
        "--embed-dim", "32", "--method", "softtf", "--task-id", "gradient-sample", "--threads", "1",
        "--protocol", "official", "--eval-batch-size", "30",
    )
    assert main(args) == 0
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    cfg = res["run_config"]
    assert res["task_id_mode"] == "gradient" and "batch-grouped" in res["task_id_label"]
    assert (cfg["protocol"], cfg["k_shot"], cfg["gradient_topk"], cfg["gradient_logits"], cfg["head"]) == (
        "official", 7, "classes-per-task", "all", "full")
    assert cfg["eval_batch_size"] == 30  # an explicit flag wins over the preset


def test_prompt_method_flags(tmp_path, capsys):
    """--masks and --prompt-activation reach the run; l2p --masks defaults to Prompt ID."""
    args = base_args(
        tmp_path, "--tasks", "2", "--epochs", "1", "--img-size", "16", "--patch-size", "4", "--depth", "2",
        "--embed-dim", "32", "--method", "norga", "--masks", "--prompt-activation", "tanh", "--threads", "1",
    )
    assert main(args) == 0
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert (res["run_config"]["masks"], res["run_config"]["prompt_activation"], res["task_id_mode"]) == (True, "tanh", "prompt")
    assert res["method_info"]["activation"] == "tanh" and res["method_info"]["mask_layers"]
    parser_args = build_parser().parse_args(["train", "--model", "vit", "--data", "digits", "--output", "x", "--method", "l2p", "--masks"])
    parser_args.tasks = 5  # main() fills it in from the data
    assert run_config(parser_args, 0).task_id == "prompt"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(base_args(tmp_path / "b", "--epochs", "0", "--depth", "2", "--img-size", "16", "--patch-size", "4",
                       "--method", "softtf", "--masks"))
    assert exc.value.code == 2 and "masks=True (--masks)" in capsys.readouterr().err


def test_version(capsys):
    import softtf

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"softtf {softtf.__version__}"


def test_every_train_option_has_help_with_its_default():
    import argparse

    parser = build_parser()
    train = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    text = " ".join(train.format_help().split())
    for action in train._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{action.option_strings} has no help text"
        if action.default not in (None, False) and not action.required:
            assert "default" in train._get_formatter()._get_help_string(action).lower(), action.option_strings
    assert "(default: 20)" in text  # --epochs
    assert "upper bound (oracle: true task given)" in text  # each task-id mode: what it is (how)
