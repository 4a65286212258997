"""Structural changes while serving are refused (issue 15): add / freeze / delete / load / merge /
unwrap raise a clear RuntimeError, before changing anything, while another thread's forward call
is in flight; once the calls end the same change succeeds. Calls of the changing thread itself
(from inside its own forward) are not counted."""
import copy
import re
import threading
import time

import pytest
import torch
from torch import nn

import softtf
from softtf import SoftLinear

from helpers import wrapped_vit


REFUSED = r"refused: {n} forward calls? (is|are) in flight in other threads.*Wait for the calls to finish"


def _model(names=("a", "b", "c", "d"), frozen=("a", "c")):
    return wrapped_vit(names, frozen)


def _structure(model):
    """Every layer's tasks, frozen tasks and masks, and the head: what a change would alter."""
    layers = model.soft_layers.values()
    return ([(l.tasks, l.frozen_tasks, l.active_task) for l in layers],
            {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in model.state_dict().items()})


def _assert_same(model, before):
    lists, tensors = _structure(model)
    assert lists == before[0]
    assert tensors.keys() == before[1].keys()
    for k, v in tensors.items():
        assert torch.equal(v, before[1][k]) if isinstance(v, torch.Tensor) else v == before[1][k], k


class _Gate:
    """A forward hook on the model's first block that holds every call inside the forward until opened."""

    def __init__(self, model):
        self.open, self.entered = threading.Event(), threading.Semaphore(0)
        self.handle = model.model.blocks[0].register_forward_hook(self._hold)

    def _hold(self, module, args, out):
        self.entered.release()
        assert self.open.wait(60), "the gate was never opened"


def _serve_blocked(model, calls):
    """Start ``calls`` threads whose forward is held inside the model; returns (gate, threads, outputs)."""
    gate, outputs = _Gate(model), {}
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    names = [["a", "b", "c", "d"], ["d", "d", "a", "b"], "c", ["b", "c", "d", "a"]]

    def serve(k):
        with torch.no_grad():
            outputs[k] = model(x, task_names=names[k % len(names)])

    threads = [threading.Thread(target=serve, args=(k,)) for k in range(calls)]
    for t in threads:
        t.start()
    for _ in threads:
        assert gate.entered.acquire(timeout=60)
    return gate, threads, outputs, x, names


def test_changes_while_calls_are_in_flight_are_refused_and_change_nothing(tmp_path):
    model = _model()
    other = _model(names=("e", "f"), frozen=("e",))
    other.save_masks(tmp_path / "ef.safetensors")
    model.save_masks(tmp_path / "own.safetensors")
    x0 = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = {k: model(x0, task_names=n) for k, n in enumerate([["a", "b", "c", "d"], ["d", "d", "a", "b"], "c"])}
    before = _structure(model)
    gate, threads, outputs, x, names = _serve_blocked(model, 3)
    try:
        assert model.serving_guard.in_flight() == 3
        attempts = {
            "add_task('e')": lambda: model.add_task("e"),
            "freeze_task('b')": lambda: model.freeze_task("b"),
            "delete_task('a')": lambda: model.delete_task("a"),
            "load_masks(": lambda: model.load_masks(tmp_path / "ef.safetensors"),
            "merge_and_unload('a')": lambda: model.merge_and_unload("a"),
            "unwrap()": lambda: model.unwrap(),
            "load_state_dict()": lambda: model.load_state_dict(model.state_dict()),
        }
        for what, attempt in attempts.items():
            owner = "" if what.startswith("load_masks") else "SoftModel."
            with pytest.raises(RuntimeError, match=re.escape(owner + what) + ".*" + REFUSED.format(n=3)):
                attempt()
            _assert_same(model, before)
        with pytest.raises(RuntimeError, match=REFUSED.format(n=3)):  # refused before the file is even read
            softtf.load_masks(model, tmp_path / "missing.safetensors")
        with pytest.raises(RuntimeError, match=r"SoftLinear.add_task\('e'\) refused"):  # a layer on its own too
            next(iter(model.soft_layers.values())).add_task("e")
        gate.handle.remove()  # the held calls stay inside the hook; the copy must not carry the gate
        twin = copy.deepcopy(model)  # the way out: change a copy, swap it in
        twin.add_task("e")
        assert twin.tasks == ["a", "b", "c", "d", "e"] and twin.serving_guard.in_flight() == 0
        _assert_same(model, before)
        model.set_task("b")  # not structural: a selection, allowed while serving
    finally:
        gate.open.set()
        for t in threads:
            t.join()
        gate.handle.remove()
    for k in range(3):
        assert torch.equal(outputs[k], expected[k])
    assert model.serving_guard.in_flight() == 0
    model.add_task("e")  # the calls have ended: every change goes through
    model.freeze_task("e")
    model.delete_task("a")
    model.delete_task("e")
    model.load_masks(tmp_path / "ef.safetensors")
    assert model.tasks == ["b", "c", "d", "e", "f"] and model.frozen_tasks == ["c", "e"]


def test_calls_through_methods_of_the_wrapped_model_count_too():
    model = _model()
    gate = _Gate(model)
    x = torch.randn(2, 3, 16, 16)
    thread = threading.Thread(target=lambda: model.forward_features(x))
    thread.start()
    try:
        assert gate.entered.acquire(timeout=60)
        with pytest.raises(RuntimeError, match=r"SoftModel.add_task\('z'\) refused: 1 forward call is in flight"):
            model.add_task("z")
    finally:
        gate.open.set()
        thread.join()
        gate.handle.remove()
    model.add_task("z")
    assert model.tasks[-1] == "z"


def test_a_bare_layer_refuses_while_its_own_forward_runs_in_another_thread():
    layer = SoftLinear(nn.Linear(6, 4))
    layer.add_task("a")
    layer.freeze_task("a")
    open_, entered = threading.Event(), threading.Event()

    def hold(module, args, out):  # the base layer runs inside SoftLinear.forward while masks are disabled
        entered.set()
        open_.wait(60)

    handle = layer.base_layer.register_forward_hook(hold)
    layer.disable_masks()
    thread = threading.Thread(target=lambda: layer(torch.randn(2, 6)))
    thread.start()
    try:
        assert entered.wait(60)
        for attempt, what in ((lambda: layer.add_task("b"), "add_task('b')"), (lambda: layer.delete_task("a"), "delete_task('a')"),
                              (lambda: layer.stage_tasks({"b": torch.ones(4, 6)})(), "stage_tasks commit of ['b']")):
            with pytest.raises(RuntimeError, match=re.escape(f"SoftLinear.{what} refused: 1 forward call is in flight")):
                attempt()
            assert layer.tasks == ["a"] and layer.frozen_tasks == ["a"] and layer.frozen_masks.shape[0] == 1
    finally:
        open_.set()
        thread.join()
        handle.remove()
    layer.add_task("b")
    assert layer.tasks == ["a", "b"]


def test_a_change_from_inside_the_same_threads_forward_is_not_refused():
    model = _model()
    done = []

    def add_inside(module, args, out):  # the changing thread is the calling one: nothing can overlap
        if not done:
            done.append(True)
            model.add_task("inner")

    handle = model.model.blocks[0].register_forward_hook(add_inside)
    with torch.no_grad():
        model(torch.randn(2, 3, 16, 16), task_names="a")
    handle.remove()
    assert "inner" in model.tasks and model.serving_guard.in_flight() == 0


def test_many_threads_serving_while_another_keeps_trying_changes(fast_switching, tmp_path):
    """Outputs stay those of sequential calls; every attempt is refused with the clear error and
    changes nothing, or (in a moment when no call is in flight) goes through on every layer."""
    model = _model()
    x = torch.randn(4, 3, 16, 16)
    batches = [["a", "b", "c", "d"], ["d", "d", "a", "b"], ["c", "a", "a", "c"], "b"]
    with torch.no_grad():
        expected = [model(x, task_names=names) for names in batches]
    wrong, refused, applied, errors = [], [], [], []
    stop = threading.Event()

    def serve(k):
        try:
            while not stop.is_set():
                with torch.no_grad():
                    y = model(x, task_names=batches[k])
                if not torch.equal(y, expected[k]):
                    wrong.append(k)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def change():
        try:
            deadline = time.monotonic() + 20
            while len(refused) < 30 and time.monotonic() < deadline:
                for op in (lambda: model.add_task("new"), lambda: model.freeze_task("new"), lambda: model.delete_task("new")):
                    before = [(l.tasks, l.frozen_tasks) for l in model.soft_layers.values()]
                    try:
                        op()
                        applied.append(op)
                    except RuntimeError as exc:
                        assert "forward call" in str(exc) and "in flight in other threads" in str(exc), exc
                        refused.append(exc)
                        assert [(l.tasks, l.frozen_tasks) for l in model.soft_layers.values()] == before
                    except (KeyError, ValueError):  # the op before this one was refused: nothing to freeze / delete
                        pass
                    states = {(tuple(l.tasks), tuple(l.frozen_tasks)) for l in model.soft_layers.values()}
                    assert len(states) == 1, states  # never half-applied across layers
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            stop.set()

    threads = [threading.Thread(target=serve, args=(k,)) for k in range(4)] + [threading.Thread(target=change)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert wrong == []
    assert refused, "no attempt was refused although four threads were serving"
    assert model.serving_guard.in_flight() == 0
    if "new" in model.tasks:
        model.delete_task("new")
    assert model.tasks == ["a", "b", "c", "d"]
    with torch.no_grad():
        assert all(torch.equal(model(x, task_names=n), e) for n, e in zip(batches, expected))
