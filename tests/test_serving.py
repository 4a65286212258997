"""Serving a shared model (issue 11, user wing): the task chosen per call with ``use_task`` from
many threads, non-finite inputs to task inference, an empty batch. Structural changes while other
threads run forward are refused: tests/test_serving_guard.py."""
import asyncio
import copy
import pickle
import re
import threading

import pytest
import torch
from torch import nn

import softtf
from softtf import PromptID, SoftLinear, gradient_id, use_task

from helpers import wrapped_vit

ROUNDS = 300


def _layer(tasks, frozen=()):
    torch.manual_seed(0)
    layer = SoftLinear(nn.Linear(16, 8))
    for i, name in enumerate(tasks):
        layer.add_task(name, init=("uniform", 0.0, 2.0), generator=torch.Generator().manual_seed(i))
        if name in frozen:
            layer.freeze_task(name)
    return layer


def _run_threads(*targets):
    errors = []

    def guarded(fn):
        def run():
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                errors.append(exc)
        return run

    threads = [threading.Thread(target=guarded(fn)) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def _close(a, b):
    return torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_use_task_picks_the_task_per_thread_on_one_shared_layer(fast_switching):
    names = ["t0", "t1", "t2", "t3"]
    layer = _layer(names, frozen=("t0", "t2"))
    x = torch.randn(5, 16)
    with torch.no_grad():
        expected = {}
        for n in names:
            layer.set_task(n)
            expected[n] = layer(x)
    assert all(not _close(expected[a], expected[b]) for a in names for b in names if a != b)
    wrong = []

    def serve(name):
        def run():
            for _ in range(ROUNDS):
                with torch.no_grad(), use_task(name):
                    y = layer(x)
                if not _close(y, expected[name]):
                    wrong.append(name)
        return run

    def meddle():  # the shared selection moves all the time; use_task must not care
        for i in range(ROUNDS):
            layer.set_task(names[i % 4])

    _run_threads(*(serve(n) for n in names), meddle)
    assert wrong == []


def test_use_task_is_scoped_nested_and_per_asyncio_task():
    layer = _layer(["a", "b"])
    x = torch.randn(2, 16)
    with torch.no_grad():
        layer.set_task("a")
        out_a = layer(x)
        layer.set_task("b")
        out_b = layer(x)
        with use_task("a"):
            assert softtf.core.current_task() == "a" and torch.equal(layer(x), out_a)
            with use_task("b"):
                assert torch.equal(layer(x), out_b)
            assert torch.equal(layer(x), out_a)
            with layer.masks_disabled():  # a mode set on the layer wins inside its own call
                assert torch.equal(layer(x), layer.base_layer(x))
        assert softtf.core.current_task() is None and torch.equal(layer(x), out_b)
        assert layer.active_task == "b"  # use_task never touched the layer

    async def serve(name, expected):
        with use_task(name):
            await asyncio.sleep(0)  # the other coroutine runs in between with its own task
            with torch.no_grad():
                return torch.equal(layer(x), expected)

    async def both():
        return await asyncio.gather(serve("a", out_a), serve("b", out_b))

    assert asyncio.run(both()) == [True, True]
    with pytest.raises(ValueError, match=r"use_task: name must be a task name matching \[A-Za-z0-9_-\]\+, got 3"):
        with use_task(3):
            pass
    with pytest.raises(KeyError, match="unknown task 'zzz'"):
        with use_task("zzz"):
            layer(x)


def test_model_use_task_checks_the_name():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = softtf.wrap(VisionTransformer(img_size=16, patch_size=4, num_classes=3, embed_dim=32, depth=2, num_heads=4))
    for name in ("a", "b"):
        model.add_task(name, init=("uniform", 0.5, 1.5), seed=len(name) + ord(name))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        model.set_task("a")
        out_a = model(x)
        model.set_task("b")
        with model.use_task("a"):
            assert torch.equal(model(x), out_a)
    with pytest.raises(KeyError, match=r"SoftModel.use_task: unknown task 'c'"):
        model.use_task("c")


def test_layer_with_its_lock_still_copies_and_pickles():
    layer = _layer(["a"])
    x = torch.randn(2, 16)
    for twin in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert torch.equal(twin(x), layer(x))
        twin.add_task("b")  # its own, working lock
        assert layer.tasks == ["a"]


# ---------------------------------------------------------------- non-finite inputs, empty batch
class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = SoftLinear(nn.Linear(6, 12))
        self.fc2 = SoftLinear(nn.Linear(12, 5))

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _toy_with_tasks(n=3):
    model = _Toy()
    for t in range(n):
        for layer in (model.fc1, model.fc2):
            layer.add_task(f"t{t}", init=("uniform", 0.0, 2.0), generator=torch.Generator().manual_seed(t))
            layer.freeze_task(f"t{t}")
    return model


@pytest.mark.parametrize("rule", ["sample", "batch", "binary", "binary-sample"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_gradient_id_refuses_non_finite_samples(rule, bad):
    model = _toy_with_tasks()
    x = torch.randn(9, 6)
    x[3, 1] = bad
    x[7, 0] = bad
    named = "[3]" if rule in ("batch", "binary") else "[3, 7]"  # the k-shot rules score samples 0..6
    with pytest.raises(ValueError, match=rf"gradient_id: scores of samples {re.escape(named)} are not finite \(NaN/Inf in the inputs or the model\); task inference needs finite inputs"):
        gradient_id(model, x, rule=rule, k_shot=7)
    assert model.fc1.mode == "single"  # modes restored on the way out
    assert gradient_id(model, x[[0, 1, 2, 4]], rule=rule).task_index.shape == (4,)


@pytest.mark.parametrize("rule", ["sample", "batch", "binary", "binary-sample"])
def test_gradient_id_on_an_empty_batch_returns_an_empty_result(rule):
    model = _toy_with_tasks()
    res = gradient_id(model, torch.zeros(0, 6), rule=rule)
    assert res.scores.shape == (0, 3) and res.task_index.shape == (0,) and res.task_index.dtype == torch.long
    assert res.task_names == [] and res.tasks == ["t0", "t1", "t2"]


def test_prompt_id_refuses_non_finite_queries():
    pid = PromptID(dim=4)
    for t in ("a", "b"):
        pid.add_key(t, generator=torch.Generator().manual_seed(len(t)))
    q = torch.randn(5, 4)
    q[1, 2] = float("nan")
    q[4, 0] = float("-inf")
    with pytest.raises(ValueError, match=r"PromptID.predict: similarities of samples \[1, 4\] are not finite \(NaN/Inf in the query features: the inputs or the model\); task inference needs finite inputs"):
        pid.predict(q)
    assert pid.predict(q[[0, 2, 3]]).shape == (3,)


# ---------------------------------------------------------------- per-call tasks per sample (issue 15)
def test_task_names_per_sample_equal_one_call_per_sample():
    model = wrapped_vit()
    x = torch.randn(6, 3, 16, 16)
    names = ["b", "a", "c", "c", "a", "b"]
    with torch.no_grad():
        mixed = model(x, task_names=names)
        single = torch.cat([model(x[i:i + 1], task_names=n) for i, n in enumerate(names)])
        model.set_task("c")
        via_layers = torch.cat([(model.set_task(n), model(x[i:i + 1]))[1] for i, n in enumerate(names)])
        one = model(x, task_names="b")
        model.set_task("b")
        assert torch.equal(one, model(x))  # one name: the plain masked forward
    torch.testing.assert_close(mixed, single, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed, via_layers, rtol=1e-5, atol=1e-5)
    assert model.active_task == "b"  # a call's task_names leave the layers' selection alone
    with softtf.use_tasks(names), use_task("a"), torch.no_grad():  # the innermost choice wins
        torch.testing.assert_close(model(x), model(x, task_names="a"))


def test_task_names_errors():
    model = wrapped_vit()
    x = torch.randn(3, 3, 16, 16)
    with pytest.raises(ValueError, match=r"unknown tasks \['zz'\]"):
        model(x, task_names=["a", "zz", "a"])
    with pytest.raises(ValueError, match="2 names for a batch of 3 samples"):
        model(x, task_names=["a", "b"])
    with pytest.raises(ValueError, match="use_tasks: names must hold"):
        with softtf.use_tasks([]):
            pass


def test_task_names_from_many_threads_equal_sequential_calls(fast_switching):
    """Threads serving different mixed batches through one model see only their own tasks."""
    model = wrapped_vit(names=("a", "b", "c", "d"), frozen=("a", "c"))
    x = torch.randn(4, 3, 16, 16)
    batches = [["a", "b", "c", "d"], ["d", "d", "a", "b"], ["c", "a", "a", "c"], ["b", "c", "d", "a"]]
    with torch.no_grad():
        expected = [model(x, task_names=names) for names in batches]
    wrong = []

    def serve(k):
        def run():
            for _ in range(ROUNDS // 10):
                with torch.no_grad():
                    y = model(x, task_names=batches[k])
                if not _close(y, expected[k]):
                    wrong.append(k)
        return run

    def meddle():  # the layers' own selection moves all the time; task_names must not care
        for i in range(ROUNDS):
            model.set_task("abcd"[i % 4])

    _run_threads(*(serve(k) for k in range(4)), meddle)
    assert wrong == []


def test_predict_with_tasks_is_a_per_call_choice():
    model = wrapped_vit()
    x = torch.randn(4, 3, 16, 16)
    model.set_task("c")
    states = [layer.mode_state() for layer in model.soft_layers.values()]
    index = torch.tensor([1, 0, 2, 1])
    with torch.no_grad():
        got = softtf.predict_with_tasks(model, x, index, ["a", "b", "c"])
        torch.testing.assert_close(got, model(x, task_names=["b", "a", "c", "b"]))
    assert [layer.mode_state() for layer in model.soft_layers.values()] == states
    with pytest.raises(ValueError, match="indices into tasks"):
        softtf.predict_with_tasks(model, x, torch.tensor([0, 1, 3, 0]), ["a", "b", "c"])
    with pytest.raises(KeyError, match="zz"):
        softtf.predict_with_tasks(model, x, torch.tensor([0, 1, 0, 0]), ["a", "zz"])
