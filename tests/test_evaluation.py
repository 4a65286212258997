"""The evaluation protocol on small hand-built cases: each difference between the runner's default
and the official Soft-TF code (ihaeyong/Soft-TF) pinned on its own.

A toy classifier reads its logits straight from the input (columns 2..5 of a [B, 6] tensor; columns
0..1 are the Prompt-ID query feature), so every prediction below is known in advance.
"""
import contextlib

import numpy as np
import pytest
import torch
from torch import nn

from softtf.cl import ClassIncrementalScenario, RunConfig, metrics
from softtf.cl.config import protocol_settings, task_id_label
from softtf.cl.data import TensorDataset
from softtf.cl.evaluate import evaluate_after_task, gradient_topk, predict
from softtf.cl.results import Tallies
from softtf.cl.seeds import aggregate
from softtf.inference.prompt_id import PromptID
from softtf.methods.base import ContinualMethod

SCENARIO = ClassIncrementalScenario(4, 2, seed=None)  # task0: classes 0, 1; task1: classes 2, 3
TASKS = ["task0", "task1"]
SEEN = torch.tensor([0, 1, 2, 3])


class ToyClassifier(nn.Module):
    num_classes = 4

    def __init__(self):
        super().__init__()
        self.pretrained = False

    def features(self, x):
        return x[:, :2]

    def forward(self, x):
        if self.pretrained:  # the "pretrained network": always class 3
            return torch.tensor([0.0, 0.0, 0.0, 9.0]).expand(x.shape[0], 4)
        return x[:, 2:]


class ToyMethod(ContinualMethod):
    """Logits = the input's columns; Gradient ID returns ``self.inferred`` and records its call."""

    name = "toy"

    def __init__(self, inferred=None):
        super().__init__(ToyClassifier(), None)
        self.inferred, self.calls = inferred, []

    def forward_tasks(self, inputs, task_index, tasks):
        return self.clf(inputs)

    def infer_tasks(self, inputs, tasks, forward_fn, rule, k_shot, topk):
        self.calls.append({"rule": rule, "k_shot": k_shot, "topk": topk, "logits": forward_fn(inputs).shape[1]})
        return torch.as_tensor(self.inferred)

    @contextlib.contextmanager
    def pretrained(self):
        self.clf.pretrained = True
        try:
            yield
        finally:
            self.clf.pretrained = False


def batch(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def config(task_id, **kw):
    return RunConfig(method="softtf", task_id=task_id, progress=False, **kw)


# ------------------------------------------------------------------ forgetting, BWT, task-id accuracy
def test_forgetting_standard_vs_official_two_tasks():
    # task 0 improved from 50 to 60: the standard max over earlier rows gives -10, the official
    # code's max over rows up to and including the current one clamps it at 0
    A = [[50.0, np.nan], [60.0, 70.0]]
    assert metrics.forgetting(A) == pytest.approx(-10.0)
    assert metrics.forgetting(A, variant="official") == pytest.approx(0.0)


def test_forgetting_standard_vs_official_four_tasks():
    A = np.array([
        [80.0, np.nan, np.nan, np.nan],
        [70.0, 90.0, np.nan, np.nan],
        [75.0, 85.0, 60.0, np.nan],
        [70.0, 80.0, 65.0, 50.0],
    ])
    # standard: task0 max(80, 70, 75) - 70 = 10; task1 max(90, 85) - 80 = 10; task2 60 - 65 = -5
    assert metrics.forgetting(A) == pytest.approx((10 + 10 - 5) / 3)
    # official: task2 max(60, 65) - 65 = 0
    assert metrics.forgetting(A, variant="official") == pytest.approx((10 + 10 + 0) / 3)
    # after task 2: standard task0 80 - 75 = 5, task1 90 - 85 = 5; official identical here
    assert metrics.forgetting(A, 2) == metrics.forgetting(A, 2, "official") == pytest.approx(5.0)
    assert metrics.backward_transfer(A) == pytest.approx(((70 - 80) + (80 - 90) + (65 - 60)) / 3)  # first T-1 tasks
    s = metrics.summarize(A)
    assert s["forgetting"] == pytest.approx(5.0) and s["forgetting_official"] == pytest.approx(20 / 3)
    assert s["forgetting_official_curve"][0] is None and len(s["accuracy_matrix"]) == 4
    with pytest.raises(ValueError, match="variant must be one of"):
        metrics.forgetting(A, variant="paper")


def test_task_id_accuracy_per_sample_vs_per_task():
    # task 0: 10 of 10 right; task 1: 0 of 30 right
    assert metrics.task_id_accuracy_per_task([10, 0], [10, 30]) == pytest.approx(50.0)  # percent, as A
    tallies = Tallies(2)
    tallies.tid_correct[1] = [10, 0]
    tallies.tid_total[1] = [10, 30]
    for head in tallies.A:
        tallies.A[head][:] = [[50.0, np.nan], [50.0, 50.0]]
    rec = tallies.record("full", {"method": "toy"}, {})
    assert rec["task_id_accuracy"] == pytest.approx(100 * 10 / 40)  # per sample, in % like ACC
    assert rec["task_id_accuracy_per_task"] == pytest.approx(50.0)  # the official code's average
    assert rec["task_id_matrix"] == [[None, None], [100.0, 0.0]]
    assert set(rec["heads"]) == {"full", "task"} and "forgetting_official" in rec["metric_definitions"]
    with pytest.raises(ValueError, match="0 <= correct <= total"):
        metrics.task_id_accuracy_per_task([11], [10])


# ------------------------------------------------------------------ head modes
def test_full_and_task_heads_on_a_wrong_task_inference():
    # true class 1 (task 0) has the largest logit, but task inference says task 1
    method = ToyMethod(inferred=[1])
    x = batch([0, 0, 0.0, 5.0, 1.0, 0.0])
    pred = predict(method, None, SCENARIO, config("gradient-sample"), x, 0, TASKS, SEEN)
    assert pred.full.tolist() == [1]  # argmax over every seen class: right
    assert pred.task.tolist() == [2]  # argmax over task 1's classes {2, 3}: wrong
    assert pred.task_index.tolist() == [1]


def test_oracle_reports_no_inferred_task_and_restricts_task_head():
    method = ToyMethod()
    x = batch([0, 0, 0.0, 1.0, 5.0, 0.0])  # class 2 (task 1) wins overall
    pred = predict(method, None, SCENARIO, config("oracle"), x, 0, TASKS, SEEN)
    assert pred.full.tolist() == [2] and pred.task.tolist() == [1] and pred.task_index is None


def test_evaluate_fills_both_heads():
    method = ToyMethod(inferred=[1, 1])
    rows = [[0, 0, 0.0, 5.0, 1.0, 0.0], [0, 0, 0.0, 5.0, 1.0, 0.0]]  # both class 1, task inference says task 1
    data = TensorDataset(torch.tensor(rows), np.array([1, 1]))
    tallies = Tallies(2)
    evaluate_after_task(method, None, SCENARIO, data, config("gradient-sample"), 1, tallies)  # after both tasks
    assert tallies.A["full"][1, 0] == 100.0 and tallies.A["task"][1, 0] == 0.0
    assert tallies.tid_correct[1, 0] == 0 and tallies.tid_total[1, 0] == 2
    assert tallies.tid_total[1, 1] == 0  # no test sample of task 1 here


# ------------------------------------------------------------------ Prompt ID: vote and pool
def prompt_id(tasks, keys, **kw):
    pid = PromptID(2, **kw)
    for t, k in zip(tasks, keys):
        pid.add_key(t, trainable=False)
        with torch.no_grad():
            pid.keys[t].copy_(torch.tensor(k))
    return pid


def test_prompt_vote_uses_the_batch_majority():
    pid = prompt_id(TASKS, [[1.0, 0.0], [0.0, 1.0]])
    x = batch([1, 0.1, 0, 5, 0, 0], [1, 0.2, 0, 5, 0, 0], [0.1, 1, 0, 5, 0, 0])  # per sample: tasks 0, 0, 1
    per_sample = predict(ToyMethod(), pid, SCENARIO, config("prompt"), x, 0, TASKS, SEEN)
    voted = predict(ToyMethod(), pid, SCENARIO, config("prompt-vote"), x, 0, TASKS, SEEN)
    assert per_sample.task_index.tolist() == [0, 0, 1]
    assert voted.task_index.tolist() == [0, 0, 0]  # the grouping of the test batch decides
    assert per_sample.task.tolist() == [1, 1, 2] and voted.task.tolist() == [1, 1, 1]


def test_prompt_pool_matches_untrained_keys_too():
    # after learning task 0 only; the query matches task 1's (untrained) pool key best
    pid = prompt_id(TASKS, [[1.0, 0.0], [0.0, 1.0]], init="uniform")
    x = batch([0.1, 1, 0, 5, 0, 0])
    honest = predict(ToyMethod(), pid, SCENARIO, config("prompt"), x, 0, TASKS[:1], SEEN[:2])
    pool = predict(ToyMethod(), pid, SCENARIO, config("prompt", prompt_pool=True), x, 0, TASKS[:1], SEEN[:2])
    assert honest.task_index.tolist() == [0] and honest.full.tolist() == [1]
    # the pool picks task 1 (not learned): the pretrained network predicts, the task head has no class
    assert pool.task_index.tolist() == [1]
    assert pool.full.tolist() == [0]  # the toy pretrained network says class 3, unseen: argmax over seen {0, 1}
    assert pool.task.tolist() == [-1]


def test_uniform_keys_and_train_key():
    torch.manual_seed(0)
    pid = PromptID(64, init="uniform")
    k = pid.add_key("a", trainable=False)
    assert not k.requires_grad and k.abs().max() <= 1 and k.abs().max() > 0.5  # U(-1, 1), not N(0, 0.02^2)
    pid.add_key("b")
    assert pid.keys["b"].requires_grad
    assert pid.train_key("a").requires_grad and not pid.keys["b"].requires_grad
    with pytest.raises(ValueError, match="init must be one of"):
        PromptID(4, init="zeros")


# ------------------------------------------------------------------ Gradient ID: logits and top-k
def test_gradient_id_logits_and_topk_follow_the_config():
    x = batch([0, 0, 0.0, 5.0, 1.0, 0.0])
    seen0 = SEEN[:2]  # after task 0: classes 0, 1 seen
    method = ToyMethod(inferred=[0])
    predict(method, None, SCENARIO, config("gradient-sample"), x, 0, TASKS[:1], seen0)
    official = RunConfig(method="softtf", progress=False, **protocol_settings("official", "gradient-sample"))
    predict(method, None, SCENARIO, official, x, 0, TASKS[:1], seen0)
    default, official = method.calls
    assert default == {"rule": "sample", "k_shot": 7, "topk": None, "logits": 2}  # seen classes, every logit
    assert official == {"rule": "batch", "k_shot": 7, "topk": 2, "logits": 4}  # whole head, top C/T = 4/2
    assert gradient_topk(config("gradient", gradient_topk=3), SCENARIO, 2) == 2  # never more than the logits


# ------------------------------------------------------------------ the official preset and labels
def test_official_protocol_preset():
    s = protocol_settings("official", "prompt")
    assert s == {
        "protocol": "official", "task_id": "prompt-vote", "eval_batch_size": 24, "head": "full",
        "prompt_key_init": "uniform", "prompt_pool": True,
    }
    assert protocol_settings("official", "gradient-sample") == {
        "protocol": "official", "task_id": "gradient", "eval_batch_size": 24, "head": "full",
        "k_shot": 7, "gradient_topk": "classes-per-task", "gradient_logits": "all",
    }
    assert protocol_settings("official", "oracle")["task_id"] == "oracle"
    assert protocol_settings("default", "prompt") == {"protocol": "default"}
    assert "batch-grouped" in task_id_label("prompt-vote") and "batch-grouped" in task_id_label("gradient")
    assert "per sample" in task_id_label("gradient-sample") and "per sample" in task_id_label("prompt")
    with pytest.raises(ValueError, match="protocol must be one of"):
        protocol_settings("paper", "prompt")


# ------------------------------------------------------------------ seeds
def test_aggregate_over_seeds():
    def rec(acc, forg):
        head = {"acc": acc, "forgetting": forg, "forgetting_official": forg, "bwt": -forg}
        return {"method": "softtf", "task_id_mode": "prompt", "head": "full", "acc": acc, "forgetting": forg,
                "task_id_accuracy": None, "heads": {"full": head}}

    s = aggregate([rec(70.0, 10.0), rec(80.0, 20.0), rec(90.0, 30.0)], [0, 1, 2])
    assert s["metrics"]["acc"] == {"values": [70.0, 80.0, 90.0], "mean": 80.0, "std": pytest.approx(10.0)}
    assert s["metrics"]["task_id_accuracy"]["mean"] is None
    assert s["heads"]["full"]["bwt"]["mean"] == pytest.approx(-20.0)
    assert aggregate([rec(70.0, 1.0)], [5])["metrics"]["acc"]["std"] is None
    other = {**rec(70.0, 1.0), "method": "lora"}
    with pytest.raises(ValueError, match=r"differs from the first in \['method'\]"):
        aggregate([rec(70.0, 1.0), other], [0, 1])
    with pytest.raises(ValueError, match="seeds must be distinct"):
        aggregate([rec(70.0, 1.0), rec(70.0, 1.0)], [0, 0])
