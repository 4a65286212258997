"""The task-identity classifier (HiDe-Prompt / NoRGa's TII; task_id "classifier").

Unit tests on Gaussian clusters (statistics against numpy float64, old classes recognised through
their statistics only, determinism, save / load and its validation), then one small digits run with
Soft-TF and a resume from a truncated run directory that must give identical results.
"""
import copy
import json
import shutil

import numpy as np
import pytest
import torch

from softtf.cl import RunConfig, load_digits, pretrain, run_continual
from softtf.cli import build_parser, run_config
from softtf.core.files import load_tensors, save_tensors
from softtf.inference import TaskClassifier
from softtf.methods.softtf import SoftTFMethod

from test_runner import truncate_run  # noqa: E402
from timm.models.vision_transformer import VisionTransformer

pytestmark = pytest.mark.usefixtures("one_thread")

DIM, CLASSES = 8, 6
FAST = {"epochs": 5, "ca_epochs": 10, "lr": 1e-2, "ca_lr": 1e-2}


def clusters(classes, n, seed):
    """``n`` samples per class around well-separated class centres (fixed), float32."""
    centres = torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(123)) * 4
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor(classes).repeat_interleave(n)
    return centres[y] + torch.randn(len(y), DIM, generator=g), y


def learned(n_tasks=3, **kw):
    tii = TaskClassifier(DIM, CLASSES, **{**FAST, **kw})
    for t in range(n_tasks):
        tii.add_task(f"t{t}", *clusters([2 * t, 2 * t + 1], 40, seed=t))
    return tii


@pytest.mark.parametrize("covariance", ["full", "diagonal"])
def test_statistics_equal_numpy_float64(covariance):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(50, DIM, generator=g) * 3 + 1).float()
    y = torch.tensor([4] * 20 + [1] * 29 + [5])  # class 5: one sample
    tii = TaskClassifier(DIM, CLASSES, epochs=0, ca_epochs=0, covariance=covariance)
    tii.add_task("a", x, y)
    xs = x.numpy().astype(np.float64)
    assert tii.class_ids.tolist() == [1, 4, 5] and tii.count.tolist() == [29, 20, 1] and tii.class_task.tolist() == [0, 0, 0]
    assert tii.mean.dtype == tii.cov.dtype == torch.float64
    for s, c in enumerate([1, 4]):
        rows = xs[y.numpy() == c]
        np.testing.assert_allclose(tii.mean[s].numpy(), rows.mean(0), rtol=1e-12, atol=1e-12)
        want = np.cov(rows, rowvar=False) if covariance == "full" else rows.var(0, ddof=1)
        np.testing.assert_allclose(tii.cov[s].numpy(), want, rtol=1e-11, atol=1e-12)
    np.testing.assert_array_equal(tii.mean[2].numpy(), xs[-1])
    assert not tii.cov[2].any()  # one sample: zero covariance (torch.cov would give NaN)


def test_old_classes_are_recognised_through_their_statistics():
    tii = learned(3)
    assert tii.tasks == ["t0", "t1", "t2"]
    x, y = clusters(list(range(CLASSES)), 50, seed=99)  # fresh samples of every class
    pred = tii.predict(x)
    assert pred.dtype == torch.long and pred.shape == (len(y),)
    per_task = [(pred[y // 2 == t] == t).float().mean().item() for t in range(3)]
    assert min(per_task) > 0.95, per_task  # t0, t1: their data was seen only while learning them
    assert tii.predict(x[:0]).shape == (0,)


def test_gaussian_samples_follow_the_statistics():
    tii = TaskClassifier(DIM, CLASSES, epochs=0, ca_epochs=0, samples_per_class=20000)
    x, y = clusters([0, 3], 200, seed=0)
    tii.add_task("a", x, y)
    draws, labels = tii.sample(torch.Generator().manual_seed(0))
    assert labels.tolist() == [0] * 20000 + [3] * 20000
    assert draws.dtype == torch.float64 and draws.shape == (40000, DIM)
    for s, c in enumerate(tii.class_ids.tolist()):
        d = draws[labels == c].numpy()
        np.testing.assert_allclose(d.mean(0), tii.mean[s].numpy(), atol=0.05)
        np.testing.assert_allclose(np.cov(d, rowvar=False), tii.cov[s].numpy() + 1e-4 * np.eye(DIM), atol=0.08)


def test_deterministic_given_the_seed():
    a, b = learned(2), learned(2)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    c = TaskClassifier(DIM, CLASSES, **FAST)
    c.add_task("t0", *clusters([0, 1], 40, seed=0))
    c.add_task("t1", *clusters([2, 3], 40, seed=1), seed=777)  # another seed: other shuffles and draws
    assert not torch.equal(c.mlp.fc1.weight, a.mlp.fc1.weight)
    before = torch.get_rng_state()
    TaskClassifier(DIM, CLASSES)  # building one leaves the global RNG alone
    assert torch.equal(before, torch.get_rng_state())


def test_save_load_round_trip_and_continue(tmp_path):
    a = learned(2)
    path = tmp_path / "tii.safetensors"
    save_tensors(path, a.state_dict())
    b = TaskClassifier(DIM, CLASSES, **FAST, seed=5)  # another init: everything comes from the file
    b.load_state_dict(load_tensors(path))
    assert b.tasks == ["t0", "t1"]
    x, _ = clusters(list(range(CLASSES)), 10, seed=7)
    assert torch.equal(a.class_logits(x), b.class_logits(x)) and torch.equal(a.predict(x), b.predict(x))
    for tii in (a, b):  # a loaded classifier continues exactly like the original (same add_task seed)
        tii.add_task("t2", *clusters([4, 5], 40, seed=2), seed=2)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def _bad(state, key, value):
    out = dict(state)
    if value is None:
        del out[key]
    else:
        out[key] = value
    return out


def test_load_validation_errors_leave_the_classifier_unchanged():
    state = learned(2).state_dict()
    target = learned(1)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    cases = [
        (_bad(state, "mean", None), r"missing \['mean'\]"),
        ({**state, "extra": torch.zeros(1)}, r"unexpected \['extra'\]"),
        (_bad(state, "mean", state["mean"].float()), "mean must be float64"),
        (_bad(state, "cov", state["cov"][:, 0]), r"cov must be float64 \(4, 8, 8\) \(covariance 'full'\)"),
        (_bad(state, "class_task", torch.tensor([0, 0, 1, 5])), "class_task must map the classes onto all 2 tasks"),
        (_bad(state, "class_task", torch.tensor([0, 0, 0, 0])), "class_task must map the classes onto all 2 tasks"),
        (_bad(state, "class_ids", torch.tensor([0, 1, 1, 2])), "class_ids must be distinct classes in"),
        (_bad(state, "class_ids", torch.tensor([0, 1, 2, 6])), r"class_ids must be distinct classes in \[0, 6\)"),
        (_bad(state, "count", torch.tensor([3, 1])), "count must be int64 .S. like class_ids"),
        (_bad(state, "task_names", torch.tensor(list(b"not json"), dtype=torch.uint8)), "task_names must be a uint8"),
        (_bad(state, "task_names", torch.tensor(list(b'["a", "a"]'), dtype=torch.uint8)), "distinct non-empty task names"),
        (_bad(state, "mlp.fc1.weight", torch.full_like(state["mlp.fc1.weight"], float("nan"))), "mlp.fc1.weight holds NaN"),
        (_bad(state, "mlp.head.weight", torch.zeros(3, DIM)), r"mlp.head.weight must be a float tensor \(6, 8\)"),
    ]
    for bad, match in cases:
        with pytest.raises(ValueError, match=match):
            target.load_state_dict(bad)
    with pytest.raises(ValueError, match=r"cov must be float64 \(4, 8\) \(covariance 'diagonal'\)"):
        TaskClassifier(DIM, CLASSES, covariance="diagonal").load_state_dict(state)
    assert target.tasks == ["t0"]
    for k, v in target.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_input_errors():
    with pytest.raises(ValueError, match="no task learned yet"):
        TaskClassifier(DIM, CLASSES).predict(torch.zeros(2, DIM))
    tii = TaskClassifier(DIM, CLASSES, epochs=1, ca_epochs=1)
    x, y = clusters([0, 1], 5, seed=0)
    for feats, labels, match in [
        (x[:, :3], y, r"features must be a float tensor \[N, 8\]"),
        (x.long(), y, "features must be a float tensor"),
        (x[:0], y[:0], "features hold no sample"),
        (x, y[:3], r"labels must be an integer tensor \[10\]"),
        (x, y.float(), "labels must be an integer tensor"),
        (x, y + 5, r"labels must be in \[0, 6\), got \[6, 6"),
    ]:
        with pytest.raises(ValueError, match=match):
            tii.add_task("a", feats, labels)
    bad = x.clone()
    bad[3, 1] = float("nan")
    bad[7, 0] = float("inf")
    with pytest.raises(ValueError, match=r"features of samples \[3, 7\] are not finite"):
        tii.add_task("a", bad, y)
    assert tii.tasks == []
    tii.add_task("a", x, y)
    with pytest.raises(ValueError, match="task 'a' is already learned"):
        tii.add_task("a", *clusters([2], 5, seed=1))
    with pytest.raises(ValueError, match=r"classes \[1\] already belong to a learned task"):
        tii.add_task("b", *clusters([1, 2], 5, seed=1))
    with pytest.raises(ValueError, match=r"features must be a float tensor \[B, 8\]"):
        tii.predict(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"features of samples \[1\] are not finite"):
        tii.predict(torch.tensor([[0.0] * DIM, [float("nan")] * DIM]))
    for kw, match in [({"dim": 0}, "dim must be an int >= 1"), ({"epochs": -1}, "epochs must be an int >= 0"),
                      ({"lr": 0.0}, "lr must be a positive finite"), ({"covariance": "low-rank"}, "covariance must be one of"),
                      ({"samples_per_class": 0}, "samples_per_class must be an int >= 1"), ({"cov_ridge": -1}, "cov_ridge")]:
        with pytest.raises(ValueError, match=match):
            TaskClassifier(**{"dim": DIM, "num_classes": CLASSES, **kw})


def test_run_config_and_cli_flags():
    for kw, match in [({"tii_epochs": -1}, "tii_epochs must be an int >= 0"), ({"tii_lr": 0}, "tii_lr must be None or a positive"),
                      ({"tii_samples_per_class": 0}, "tii_samples_per_class must be an int >= 1"),
                      ({"tii_covariance": "sparse"}, "tii_covariance must be one of"),
                      ({"method": "finetune", "task_id": "classifier"}, "method 'finetune' supports task_id in")]:
        with pytest.raises(ValueError, match=match):
            RunConfig(**kw)
    for method in ("softtf", "lora", "adapter"):
        assert RunConfig(method=method, task_id="classifier").task_id == "classifier"
    args = build_parser().parse_args(["train", "--model", "vit", "--data", "digits", "--output", "x", "--task-id", "classifier",
                                      "--tii-epochs", "3", "--tii-ca-epochs", "4", "--tii-lr", "0.01", "--tii-ca-lr", "0.02",
                                      "--tii-samples-per-class", "7", "--tii-covariance", "diagonal"])
    args.tasks = 5
    cfg = run_config(args, 0)
    assert (cfg.task_id, cfg.tii_epochs, cfg.tii_ca_epochs, cfg.tii_lr, cfg.tii_ca_lr, cfg.tii_samples_per_class,
            cfg.tii_covariance) == ("classifier", 3, 4, 0.01, 0.02, 7, "diagonal")


def test_digits_run_with_the_classifier_and_resume(tmp_path, monkeypatch):
    digits = load_digits(img_size=16, seed=0)
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=4, num_classes=0, embed_dim=32, depth=2, num_heads=2, global_pool="avg")
    backbone = pretrain(vit, digits.train, 10, epochs=4, lr=2e-3, batch_size=32, seed=0)

    def run(out):
        cfg = RunConfig(method="softtf", task_id="classifier", epochs=1, lr=0.01, progress=False,
                        tii_epochs=5, tii_ca_epochs=10, tii_lr=1e-3, tii_ca_lr=1e-2)
        return run_continual(copy.deepcopy(backbone), digits, cfg, output_dir=out)

    out = tmp_path / "full"
    res = run(out)
    assert res["task_id_mode"] == "classifier" and res["task_id_label"] == "classifier (per sample)"
    assert res["task_id_accuracy"] > 60.0, res["task_id_matrix"]  # percent; chance: 20
    final = load_tensors(out / "checkpoints" / "task_004.safetensors")
    state = {k: v for k, v in final.items() if k.startswith("extra::task_classifier.")}
    names = json.loads(bytes(state["extra::task_classifier.task_names"].tolist()))
    assert names == [f"task{t}" for t in range(5)] and state["extra::task_classifier.class_ids"].numel() == 10

    part = tmp_path / "partial"  # interrupted after 2 of 5 tasks: resume gives the same numbers and state
    shutil.copytree(out, part)
    truncate_run(part, 2)
    (part / "results.json").unlink()
    began = []
    orig = SoftTFMethod.begin_task
    monkeypatch.setattr(SoftTFMethod, "begin_task", lambda self, t, name: (began.append(t), orig(self, t, name))[1])
    resumed = run(part)
    assert began == [2, 3, 4]
    for head in ("full", "task"):
        assert resumed["heads"][head]["accuracy_matrix"] == res["heads"][head]["accuracy_matrix"]
    assert resumed["task_id_matrix"] == res["task_id_matrix"]
    again = load_tensors(part / "checkpoints" / "task_004.safetensors")
    for k, v in state.items():
        assert torch.equal(v, again[k]), k
