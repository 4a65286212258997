"""One unit for every accuracy a run records (issue 17): ACC, the accuracy matrices and the task-id
accuracies are all in percent (0..100) in results.json, summary.json, the CLI's summary and the
README's table; a run directory written when task-id accuracies were fractions still resumes."""
import importlib.util
import json
import pathlib

import numpy as np
import pytest
import torch

from softtf.cl import RunConfig, load_digits, run_continual
from softtf.cl.metrics import DEFINITIONS, UNITS
from softtf.cl.seeds import aggregate

from timm.models.vision_transformer import VisionTransformer

ROOT = pathlib.Path(__file__).resolve().parent.parent


def tiny_run(out, **kw):
    torch.manual_seed(0)
    data = load_digits(img_size=16, seed=0)
    vit = VisionTransformer(img_size=16, patch_size=4, num_classes=0, embed_dim=16, depth=1, num_heads=2, global_pool="avg")
    cfg = RunConfig(**{"method": "softtf", "n_tasks": 2, "epochs": 1, "lr": 0.01, "task_id": "prompt", "progress": False, **kw})
    return run_continual(vit, data, cfg, output_dir=out)


def percent_from_counts(progress: dict):
    c, n = np.asarray(progress["task_id"]), np.asarray(progress["task_id_total"])
    with np.errstate(invalid="ignore", divide="ignore"):
        mat = np.where(n > 0, 100.0 * c / np.maximum(n, 1), np.nan)
    return float(100.0 * c[-1].sum() / n[-1].sum()), [[None if np.isnan(v) else float(v) for v in row] for row in mat]


def test_results_json_has_task_id_accuracy_in_percent_and_says_so(tmp_path):
    res = tiny_run(tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    progress = json.loads((tmp_path / "run" / "progress.json").read_text())
    acc, mat = percent_from_counts(progress)
    assert saved["task_id_accuracy"] == pytest.approx(acc) and res["task_id_accuracy"] == saved["task_id_accuracy"]
    assert saved["task_id_matrix"] == mat
    assert saved["task_id_matrix"][0][0] == pytest.approx(100.0)  # one task seen: always right
    assert 0.0 <= saved["task_id_accuracy_per_task"] <= 100.0
    defs = saved["metric_definitions"]
    assert defs["units"] == UNITS and "percent" in UNITS and "accuracy matrix" in UNITS
    for key in ("acc", "task_id_accuracy", "task_id_accuracy_per_task", "task_id_matrix"):
        assert key in UNITS and key in DEFINITIONS
    for key in ("task_id_accuracy", "task_id_accuracy_per_task", "task_id_matrix"):
        assert "%" in defs[key] and "fraction" not in defs[key], defs[key]


def test_a_run_directory_from_before_resumes_and_is_rewritten_in_percent(tmp_path, monkeypatch):
    out = tmp_path / "run"
    first = tiny_run(out).record
    # what the old code left: the same progress.json (counts) and checkpoints, results.json in fractions
    old = dict(first, task_id_accuracy=first["task_id_accuracy"] / 100, task_id_accuracy_per_task=first["task_id_accuracy_per_task"] / 100,
               task_id_matrix=[[None if v is None else v / 100 for v in row] for row in first["task_id_matrix"]])
    (out / "results.json").write_text(json.dumps(old))
    from softtf.methods.softtf import SoftTFMethod

    began = []
    orig = SoftTFMethod.begin_task
    monkeypatch.setattr(SoftTFMethod, "begin_task", lambda self, t, name: (began.append(t), orig(self, t, name))[1])
    again = tiny_run(out).record
    assert began == []  # finished: nothing retrained, the record rebuilt from progress.json
    saved = json.loads((out / "results.json").read_text())
    for key in ("task_id_accuracy", "task_id_accuracy_per_task", "task_id_matrix", "accuracy_matrix", "acc"):
        assert saved[key] == again[key] == first[key], key
    assert saved["task_id_accuracy"] > 1.0


def test_summary_over_seeds_says_its_units():
    rec = {"method": "softtf", "task_id_mode": "prompt", "head": "full", "acc": 80.0, "task_id_accuracy": 73.3,
           "task_id_accuracy_per_task": 73.0, "heads": {"full": {"acc": 80.0}}}
    s = aggregate([rec, {**rec, "task_id_accuracy": 75.3}], [0, 1])
    assert s["units"] == UNITS
    assert s["metrics"]["task_id_accuracy"]["mean"] == pytest.approx(74.3)


def test_the_readme_table_prints_task_id_accuracy_as_recorded():
    spec = importlib.util.spec_from_file_location("digits_table", ROOT / "tools" / "digits_table.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    stat = lambda mean, std=None: {"mean": mean, "std": std}  # noqa: E731
    head = {"acc": stat(81.6, 4.9), "forgetting": stat(9.0), "forgetting_official": stat(9.0)}
    summary = {"task_id_label": "prompt (per sample)", "heads": {"full": head, "task": head},
               "metrics": {"task_id_accuracy": stat(73.3, 7.9)}}
    row = tool.table([("softtf / prompt", summary)], [0, 1, 2]).splitlines()[2]
    assert row.endswith("| 73.3 ± 7.9 |"), row


def test_the_readme_quotes_task_id_accuracy_in_percent():
    text = (ROOT / "README.md").read_text()
    assert "task-id accuracy 0." not in text and "task-id\naccuracy 0." not in text
