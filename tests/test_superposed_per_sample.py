"""softtf_kernels.ops.superposed_linear with a per-sample alpha [B, T] whose rows differ (SAPT over Soft-TF
masks): y_b = x_b (W ⊙ Σ_t α_bt M_t)^T + b against the float64 per-sample oracle, forward and the
gradients in x, alpha (per sample) and bias; computed as T masked GEMMs over the whole batch (never a
per-sample masked weight); the equal-rows path is unchanged."""
import math

import pytest
import torch

import softtf_kernels
from softtf_kernels import ops

from helpers import assert_close_rel, rand, rand_mask


def oracle(x, w, masks, alpha, b):
    """Float64, one masked weight per sample (fine for an oracle): y_b = x_b (W ⊙ Σ_t α_bt M_t)^T + b."""
    xs = x.reshape(x.shape[0], math.prod(x.shape[1:-1]), x.shape[-1])
    mix = w.unsqueeze(0) * torch.einsum("bt,toi->boi", alpha, masks)
    y = torch.einsum("bni,boi->bno", xs, mix).reshape(*x.shape[:-1], w.shape[0])
    return y if b is None else y + b


def _case(gen, lead, fin, fout, n_tasks, dt, mdt, bias=True):
    x = rand((*lead, fin), dt, gen)
    w = rand((fout, fin), dt, gen)
    b = rand((fout,), dt, gen) if bias else None
    masks = rand_mask((n_tasks, fout, fin), mdt, gen)
    alpha = torch.softmax(rand((lead[0], n_tasks), torch.float32, gen, -2, 2), -1)
    return x, w, masks, alpha, b


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("dt,mdt", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                    (torch.bfloat16, torch.float32), (torch.float16, torch.float16),
                                    (torch.float64, torch.float64)])
@pytest.mark.parametrize("lead,bias", [((4, 3), True), ((3, 2, 5), False), ((5,), True)])
def test_differing_rows_match_the_per_sample_oracle(gen, backend, dt, mdt, lead, bias):
    x, w, masks, alpha, b = _case(gen, lead, 13, 7, 3, dt, mdt, bias)
    if len(lead) == 1:
        x = x.unsqueeze(1)  # [B, 1, in]
    leaves = [x.clone().requires_grad_(), alpha.clone().requires_grad_()] + ([b.clone().requires_grad_()] if bias else [])
    softtf_kernels.set_backend(backend)
    y = ops.superposed_linear(leaves[0], w, masks, leaves[1], leaves[2] if bias else None)
    dy = rand(y.shape, dt, gen)
    grads = torch.autograd.grad(y, leaves, dy)
    ref = [t.detach().double().requires_grad_() for t in leaves]
    yr = oracle(ref[0], w.double(), masks.double(), ref[1], ref[2] if bias else None)
    want = torch.autograd.grad(yr, ref, dy.double())
    assert y.dtype == dt and y.shape == yr.shape
    assert_close_rel(y, yr.detach(), dt, "y")
    for name, g, r, leaf in zip(("dx", "dalpha", "db"), grads, want, leaves):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape, name
        tol = torch.float32 if name == "dalpha" and dt in (torch.float32, torch.float64) else dt
        assert_close_rel(g, r, tol, name)


def test_t_masked_gemms_and_no_per_sample_weight(gen, monkeypatch):
    """T masked GEMMs over the whole batch forward, T grad-input GEMMs backward, the scores per sample
    from mask_mixture_grad(per_sample=True); every mask handed over is [out, in]."""
    calls = []
    for name in ("masked_linear", "masked_linear_grad_input", "mask_mixture_grad"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _r=real, _n=name: calls.append(
            (_n, tuple(a[0].shape), tuple(a[2].shape) if _n != "mask_mixture_grad" else a[-1])) or _r(*a))
    x, w, masks, alpha, b = _case(gen, (4, 3), 10, 6, 3, torch.float32, torch.float32)
    x.requires_grad_(), alpha.requires_grad_()
    ops.superposed_linear(x, w, masks, alpha, b).sum().backward()
    assert calls == ([("masked_linear", (4, 3, 10), (6, 10))] * 3 + [("masked_linear_grad_input", (4, 3, 6), (6, 10))] * 3
                     + [("mask_mixture_grad", (4, 3, 6), True)])


def test_equal_rows_keep_the_one_mixture_path(gen, monkeypatch):
    calls = []
    real = ops.masked_linear
    monkeypatch.setattr(ops, "masked_linear", lambda *a: calls.append(1) or real(*a))
    x, w, masks, alpha, b = _case(gen, (4, 3), 10, 6, 3, torch.float32, torch.float32)
    equal = alpha[:1].expand(4, 3).clone()
    y = ops.superposed_linear(x, w, masks, equal, b)
    assert calls == [1]  # one masked GEMM with M̄
    assert_close_rel(y, oracle(x.double(), w.double(), masks.double(), equal.double(), b.double()), torch.float32, "y")


def test_per_sample_rows_reach_gradient_id_scores(gen):
    """∂/∂α_b of the differing-rows path equals what the equal-rows path gives sample b alone."""
    x, w, masks, alpha, _ = _case(gen, (3, 4), 8, 5, 2, torch.float64, torch.float64)
    a = alpha.double().requires_grad_()
    ops.superposed_linear(x, w, masks, a).square().sum().backward()
    for i in range(3):
        ai = a.detach()[i].clone().requires_grad_()
        ops.superposed_linear(x[i:i + 1], w, masks, ai).square().sum().backward()
        assert_close_rel(a.grad[i], ai.grad, torch.float64, f"sample {i}")


def test_errors(gen):
    x, w, masks, alpha, _ = _case(gen, (3, 4), 8, 5, 2, torch.float32, torch.float32)
    with pytest.raises(ValueError, match=r"alpha \[B, T\] needs masks \[T, out, in\] with the same T"):
        ops.superposed_linear(x, w, masks, torch.rand(3, 3))
    with pytest.raises(ValueError, match=r"alpha \[B, T\] needs x \[B, ...\] with the same B"):
        ops.superposed_linear(x, w, masks, torch.rand(2, 2))
