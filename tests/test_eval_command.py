"""``softtf eval``: a trained run's checkpoints scored with another task inference, no training;
and the lines ``softtf train`` prints about resuming and where the results are (issue 17)."""
import json

import pytest

from softtf.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

FLAGS = ["--model", "vit", "--data", "digits", "--tasks", "2", "--epochs", "2", "--img-size", "16", "--patch-size", "4",
         "--depth", "2", "--embed-dim", "32", "--method", "softtf", "--lr", "0.01", "--pretrain-epochs", "1",
         "--no-progress", "--threads", "1"]


def results(path):
    return json.loads((path / "results.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    for mode in ("oracle", "gradient-sample"):
        assert main(["train", *FLAGS, "--task-id", mode, "--output", str(root / mode)]) == 0
    return root


def test_eval_gives_what_training_with_that_task_inference_gives(runs, capsys):
    """Soft-TF trains the same masks whatever the task inference, so scoring the oracle run's
    checkpoints with per-sample Gradient ID must reproduce the run trained with it."""
    capsys.readouterr()
    out = runs / "oracle-as-gradient"
    assert main(["eval", "--run", str(runs / "oracle"), *FLAGS, "--task-id", "gradient-sample", "--output", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["task_id_mode"] == "gradient-sample"
    got, want = results(out), results(runs / "gradient-sample")
    for key in ("accuracy_matrix", "task_id_matrix", "forgetting", "task_id_accuracy"):
        assert got[key] == want[key], key
    assert got["evaluated_from"] == str(runs / "oracle")
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())  # nothing trained, nothing saved
    # the same settings reproduce the run itself
    again = runs / "oracle-again"
    assert main(["eval", "--run", str(runs / "oracle"), *FLAGS, "--task-id", "oracle", "--output", str(again)]) == 0
    assert results(again)["accuracy_matrix"] == results(runs / "oracle")["accuracy_matrix"]
    assert (again / "accuracy_matrix.png").exists()


@pytest.mark.parametrize("extra, match", [
    (["--task-id", "prompt"], "task_id 'prompt' needs Prompt-ID keys trained with the run"),
    (["--task-id", "classifier"], "needs a task-identity classifier trained with the run"),
    (["--task-id", "oracle", "--lr", "0.02"], "only evaluation settings (task_id, head,"),
    (["--task-id", "oracle", "--embed-dim", "64"], "does not fit the backbone these flags build"),
    (["--task-id", "oracle", "--single-task-reference"], "softtf eval trains nothing"),
])
def test_eval_refuses_what_it_cannot_score(runs, tmp_path, capsys, extra, match):
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--run", str(runs / "oracle"), *FLAGS, *extra, "--output", str(tmp_path / "new")])
    assert exc.value.code == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "new" / "results.json").exists()


def test_eval_refuses_another_backbone(runs, tmp_path, capsys):
    import shutil

    from softtf.core import load_tensors, save_tensors

    run = tmp_path / "copy"
    shutil.copytree(runs / "oracle", run)
    warm = run / "pretrained_backbone.safetensors"
    state = load_tensors(str(warm))
    state["blocks.0.attn.qkv.weight"] = state["blocks.0.attn.qkv.weight"] * 1.001
    save_tensors(str(warm), state)
    with pytest.raises(SystemExit):
        main(["eval", "--run", str(run), *FLAGS, "--task-id", "oracle", "--output", str(tmp_path / "o")])
    assert "the backbone differs from the one" in capsys.readouterr().err


def test_eval_directory_errors(runs, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--run", str(tmp_path / "missing"), *FLAGS, "--task-id", "oracle", "--output", str(tmp_path / "o")])
    assert "is not a run directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--run", str(runs / "oracle"), *FLAGS, "--task-id", "oracle", "--output", str(runs / "oracle")])
    assert "--output must differ from --run" in capsys.readouterr().err


def test_train_says_where_it_resumed_and_wrote(runs, capsys):
    capsys.readouterr()
    assert main(["train", *FLAGS, "--task-id", "oracle", "--output", str(runs / "oracle")]) == 0
    err = capsys.readouterr().err
    assert f"softtf train: resumed from {runs / 'oracle' / 'checkpoints' / 'task_001.safetensors'}: 2 of 2 tasks finished" in err
    assert f"softtf train: results in {runs / 'oracle' / 'results.json'}" in err
