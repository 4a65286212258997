"""SoftLinear behaviour: lifecycle, gradients, state_dict, repr and every error it promises."""
import pytest
import torch
from torch import nn

import softtf
from softtf import SoftLinear

from helpers import assert_close_rel, rand


def _layer(gen, fin=12, fout=7, bias=True, dtype=torch.float32, mask_dtype=None):
    base = nn.Linear(fin, fout, bias=bias, dtype=dtype)
    with torch.no_grad():
        base.weight.copy_(rand(base.weight.shape, dtype, gen))
    return SoftLinear(base, mask_dtype=mask_dtype)


def test_no_task_and_disabled_are_exactly_the_base_layer(gen):
    layer = _layer(gen)
    x = rand((3, 5, 12), torch.float32, gen)
    assert torch.equal(layer(x), layer.base_layer(x))
    layer.add_task("a", init=("uniform", 0.2, 0.8))
    assert not torch.allclose(layer(x), layer.base_layer(x))
    layer.disable_masks()
    assert torch.equal(layer(x), layer.base_layer(x))
    layer.enable_masks()
    assert not torch.allclose(layer(x), layer.base_layer(x))


def test_ones_mask_reproduces_base_layer(gen):
    layer = _layer(gen, fin=257, fout=129)
    layer.add_task("a")
    x = rand((2, 9, 257), torch.float32, gen)
    # Same math, different summation order (blocked kernel vs BLAS): equal to fp32 rounding.
    assert_close_rel(layer(x), layer.base_layer(x).double(), torch.float32, "ones mask")


def test_forward_is_masked_linear(gen):
    layer = _layer(gen)
    layer.add_task("a", init=("uniform", 0.0, 2.0), generator=gen)
    x = rand((4, 12), torch.float32, gen)
    ref = nn.functional.linear(x.double(), layer.weight.double() * layer.mask("a").double(), layer.bias.double())
    torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-6)


def test_only_active_unfrozen_mask_trains(gen):
    layer = _layer(gen)
    layer.add_task("a")
    layer.add_task("b")
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["masks.b"]
    assert not layer.base_layer.weight.requires_grad and not layer.base_layer.bias.requires_grad
    layer.set_task("a")
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["masks.a"]
    layer(rand((2, 12), torch.float32, gen)).sum().backward()
    assert layer.masks["a"].grad is not None and layer.masks["b"].grad is None
    assert layer.base_layer.weight.grad is None


def test_freeze_moves_mask_to_store_in_mask_dtype(gen):
    layer = _layer(gen, mask_dtype=torch.bfloat16)
    layer.add_task("a", init=("uniform", 0.5, 1.5), generator=gen)
    trained = layer.mask("a").detach().clone()
    layer.freeze_task("a")
    assert layer.frozen_tasks == ["a"] and "a" not in layer.masks
    assert layer.frozen_masks.shape == (1, 7, 12) and layer.frozen_masks.dtype == torch.bfloat16
    assert torch.equal(layer.mask("a"), trained.bfloat16())
    assert not layer.mask("a").requires_grad
    layer.add_task("b")
    layer.set_task("a")
    x = rand((3, 12), torch.float32, gen)
    ref = nn.functional.linear(x.double(), layer.weight.double() * trained.bfloat16().double(), layer.bias.double())
    torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-6)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == []


def test_frozen_task_output_is_unchanged_while_new_task_trains(gen):
    layer = _layer(gen)
    layer.add_task("a", init=("uniform", 0.5, 1.5), generator=gen)
    layer.freeze_task("a")
    x = rand((5, 12), torch.float32, gen)
    layer.set_task("a")
    before = layer(x).detach().clone()
    layer.add_task("b")
    opt = torch.optim.Adam([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        layer(x).pow(2).sum().backward()
        opt.step()
    layer.set_task("a")
    assert torch.equal(layer(x), before)


def test_delete_task(gen):
    layer = _layer(gen)
    for n in "abc":
        layer.add_task(n, init=("uniform", 0.1, 0.9), generator=gen)
    layer.freeze_task("a")
    layer.freeze_task("b")
    mc = layer.mask("b").clone()
    layer.delete_task("a")
    assert layer.tasks == ["b", "c"] and layer.frozen_tasks == ["b"]
    assert torch.equal(layer.mask("b"), mc)
    layer.delete_task("c")
    assert layer.active_task is None and layer.tasks == ["b"]


def test_state_dict_round_trip_is_exact(gen):
    layer = _layer(gen, mask_dtype=torch.float16)
    layer.add_task("a", init=("uniform", 0.5, 1.5), generator=gen)
    layer.freeze_task("a")
    layer.add_task("b", init=("uniform", 0.9, 1.1), generator=gen)
    sd = layer.state_dict()
    other = SoftLinear(nn.Linear(12, 7))
    other.load_state_dict(sd)
    assert other.tasks == ["a", "b"] and other.frozen_tasks == ["a"] and other.active_task == "b"
    assert other.mask_dtype == torch.float16
    sd2 = other.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        if k != "_extra_state":
            assert torch.equal(sd[k], sd2[k]) and sd[k].dtype == sd2[k].dtype, k
    assert other.masks["b"].requires_grad
    x = rand((2, 12), torch.float32, gen)
    assert torch.equal(other(x), layer(x))


def test_extra_repr_shows_tasks_and_dtypes(gen):
    layer = _layer(gen, mask_dtype=torch.bfloat16)
    layer.add_task("t0")
    layer.freeze_task("t0")
    layer.add_task("t1")
    r = repr(layer)
    assert "t0 (frozen torch.bfloat16)" in r and "t1 (trainable torch.float32)" in r
    assert "mask_dtype=torch.bfloat16" in r and "active=t1" in r


def test_bf16_model_with_bf16_masks(gen):
    layer = _layer(gen, dtype=torch.bfloat16, mask_dtype=torch.bfloat16)
    layer.add_task("a", init=("uniform", 0.5, 1.5), generator=gen)
    x = rand((3, 12), torch.bfloat16, gen)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    ref = nn.functional.linear(x.double(), layer.weight.double() * layer.mask("a").double(), layer.bias.double())
    torch.testing.assert_close(y.double(), ref, rtol=2e-2, atol=2e-2)
    y.float().sum().backward()
    assert layer.masks["a"].grad.dtype == torch.float32


# ---------------------------------------------------------------- errors
def test_errors(gen):
    layer = _layer(gen)
    with pytest.raises(TypeError, match="base_layer must be an nn.Linear"):
        SoftLinear(nn.Conv1d(3, 3, 1))
    with pytest.raises(TypeError, match="mask_dtype must be one of"):
        SoftLinear(nn.Linear(3, 3), mask_dtype=torch.int32)
    with pytest.raises(KeyError, match=r"unknown task 'x' \(known tasks: none\)"):
        layer.set_task("x")
    layer.add_task("a")
    with pytest.raises(ValueError, match="task 'a' already exists"):
        layer.add_task("a")
    with pytest.raises(ValueError, match="task name must match"):
        layer.add_task("bad.name")
    with pytest.raises(ValueError, match="init must be 'ones' or"):
        layer.add_task("b", init="zeros")
    with pytest.raises(ValueError, match="uniform bounds must satisfy low <= high"):
        layer.add_task("b", init=("uniform", 1.0, 0.5))
    layer.freeze_task("a")
    with pytest.raises(ValueError, match="task 'a' is frozen; its mask cannot be trained"):
        layer.set_task("a", train=True)
    with pytest.raises(ValueError, match="task 'a' is already frozen"):
        layer.freeze_task("a")
    with pytest.raises(KeyError, match="unknown task 'zz'"):
        layer.freeze_task("zz")
    layer.set_task("a")
    with pytest.raises(ValueError, match=r"x must have last dim 12"):
        layer(rand((2, 11), torch.float32, gen))
    with pytest.raises(TypeError, match=r"x dtype torch.float64 must equal weight dtype torch.float32"):
        layer(rand((2, 12), torch.float64, gen))
    with pytest.raises(ValueError, match=r"mask must have weight's shape"):
        torch.ops.softtf.masked_linear(rand((2, 12), torch.float32, gen), layer.weight, torch.ones(12, 7))
    with pytest.raises(ValueError, match=r"x is on meta but weight is on cpu"):
        layer(torch.empty(2, 12, device="meta"))


def test_exports():
    assert softtf.SoftLinear is SoftLinear
