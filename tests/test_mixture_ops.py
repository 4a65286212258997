"""Gradient-ID and mixed-task ops (CPU kernels) against the float64 oracle, and the model-level
Gradient-ID API on a toy model whose task masks are known."""
import pytest
import torch
from torch import nn

import softtf
import softtf_kernels
from softtf.inference.gradient_id import entropy, gradient_id, predict_with_tasks
from softtf_kernels import reference as R

from helpers import assert_close_rel, rand, rand_mask

SHAPES = [(1, 1, 16, 8, 1), (3, 5, 67, 45, 4), (2, 7, 257, 129, 3), (16, 3, 33, 17, 10)]  # B, N, in, out, T
DTYPES = [(torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16),
          (torch.bfloat16, torch.float16), (torch.float64, torch.float64)]


@pytest.fixture(autouse=True)
def _cpp():
    softtf_kernels.set_backend("cpp")


@pytest.mark.parametrize("B,N,fin,fout,T", SHAPES)
@pytest.mark.parametrize("dt,mdt", DTYPES)
@pytest.mark.parametrize("per_sample", [False, True])
def test_mask_mixture_grad_matches_oracle(gen, B, N, fin, fout, T, dt, mdt, per_sample):
    x, dy = rand((B, N, fin), dt, gen), rand((B, N, fout), dt, gen)
    w, masks = rand((fout, fin), dt, gen), rand_mask((T, fout, fin), mdt, gen)
    s = torch.ops.softtf.mask_mixture_grad(dy, x, w, masks, per_sample)
    ref = R.mask_mixture_grad(dy.double(), x.double(), w.double(), masks.double(), per_sample)
    assert s.shape == ((B, T) if per_sample else (T,))
    assert s.dtype == (torch.float64 if dt == torch.float64 else torch.float32)
    _assert_scores_close(s, ref, (dy, x, w, masks), per_sample, dt)


def _assert_scores_close(s, ref, inputs, per_sample, dt):
    # A score is a sum of N*out*in signed products that may cancel: bound its error by the
    # sum of the products' magnitudes (the standard dot-product bound), not by the result.
    magnitude = R.mask_mixture_grad(*(t.double().abs() for t in inputs), per_sample)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dt]
    err = (s.double() - ref).abs()
    assert torch.isfinite(s).all()
    assert (err <= tol * magnitude + 1e-12).all(), f"max error / magnitude = {(err / magnitude).max():.2e} > {tol:.0e}"


def test_mask_mixture_grad_two_dim_per_sample(gen):
    # x [B, in]: one token per sample
    x, dy = rand((6, 20), torch.float32, gen), rand((6, 9), torch.float32, gen)
    w, masks = rand((9, 20), torch.float32, gen), rand_mask((5, 9, 20), torch.float32, gen)
    s = torch.ops.softtf.mask_mixture_grad(dy, x, w, masks, True)
    ref = R.mask_mixture_grad(dy.double(), x.double(), w.double(), masks.double(), True)
    _assert_scores_close(s, ref, (dy, x, w, masks), True, torch.float32)


@pytest.mark.parametrize("dt,mdt", DTYPES)
def test_mixed_task_linear_matches_oracle(gen, dt, mdt):
    B, N, fin, fout, T = 7, 3, 67, 45, 4
    x, w, b = rand((B, N, fin), dt, gen), rand((fout, fin), dt, gen), rand((fout,), dt, gen)
    masks = rand_mask((T, fout, fin), mdt, gen)
    ids = torch.randint(0, T, (B,), generator=gen)
    ids[0] = T - 1
    y = torch.ops.softtf.mixed_task_linear(x, w, masks, ids, b)
    d = lambda t: t.double()
    assert_close_rel(y, R.mixed_task_linear(d(x), d(w), d(masks), ids, d(b)), dt, "y")
    dy = rand(y.shape, dt, gen)
    dx = torch.ops.softtf.mixed_task_linear_grad_input(dy, w, masks, ids.int())
    assert_close_rel(dx, R.mixed_task_linear_grad_input(d(dy), d(w), d(masks), ids), dt, "dx")


def test_mixed_task_linear_autograd_and_opcheck(gen):
    B, fin, fout, T = 5, 12, 7, 3
    x = rand((B, 2, fin), torch.float64, gen).requires_grad_()
    w, b = rand((fout, fin), torch.float64, gen), rand((fout,), torch.float64, gen).requires_grad_()
    masks = rand_mask((T, fout, fin), torch.float64, gen).requires_grad_()
    ids = torch.tensor([0, 2, 2, 1, 0])
    assert torch.autograd.gradcheck(lambda x, m, b: torch.ops.softtf.mixed_task_linear(x, w, m, ids, b), (x, masks, b))
    torch.library.opcheck(torch.ops.softtf.mixed_task_linear.default, (x, w, masks, ids, b))
    torch.library.opcheck(torch.ops.softtf.mask_mixture_grad.default,
                          (rand((B, 2, fout), torch.float64, gen), x.detach(), w, masks.detach(), True))


def test_bad_inputs(gen):
    x, w = rand((3, 4, 8), torch.float32, gen), rand((5, 8), torch.float32, gen)
    masks = rand_mask((2, 5, 8), torch.float32, gen)
    with pytest.raises(ValueError, match=r"masks must have shape \[T, 5, 8\], got \(5, 8\)"):
        torch.ops.softtf.mixed_task_linear(x, w, masks[0], torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"task_ids must lie in \[0, 2\), got values in \[0, 2\]"):
        torch.ops.softtf.mixed_task_linear(x, w, masks, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"task_ids must have shape \[3\]"):
        torch.ops.softtf.mixed_task_linear(x, w, masks, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match=r"task_ids must be an int64 or int32 tensor, got torch.float32"):
        torch.ops.softtf.mixed_task_linear(x, w, masks, torch.tensor([0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match=r"grad_out and x must have the same leading dims"):
        torch.ops.softtf.mask_mixture_grad(rand((3, 3, 5), torch.float32, gen), x, w, masks, True)
    with pytest.raises(ValueError, match=r"masks must hold at least one task"):
        torch.ops.softtf.mask_mixture_grad(rand((3, 4, 5), torch.float32, gen), x, w, masks[:0], True)
    with pytest.raises(ValueError, match=r"per_sample=True needs x of shape \[B, ..., 8\]"):
        torch.ops.softtf.mask_mixture_grad(rand((5,), torch.float32, gen), x[0, 0], w, masks, True)


# ---------------------------------------------------------------- SoftLinear modes and the model-level API
def _mlp(gen, T=3, fin=10, hidden=24, classes=6):
    model = nn.Sequential(nn.Linear(fin, hidden), nn.Tanh(), nn.Linear(hidden, classes))
    model[0], model[2] = softtf.SoftLinear(model[0]), softtf.SoftLinear(model[2])
    for t in range(T):
        for layer in (model[0], model[2]):
            layer.add_task(f"t{t}", init=("uniform", 0.0, 2.0), generator=gen)
            layer.freeze_task(f"t{t}")
    return model


def test_superposed_forward_equals_mixture_mask(gen):
    model = _mlp(gen)
    layer = model[0]
    x = rand((4, 10), torch.float32, gen)
    alpha = torch.tensor([0.2, 0.5, 0.3])
    layer.set_superposed(layer.tasks, alpha)
    mbar = torch.einsum("t,toi->oi", alpha, layer.frozen_masks)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight * mbar, layer.bias), rtol=1e-5, atol=1e-6)


def _explicit_alpha_scores(model, x, tasks, per_sample):
    """The naive way: autograd over an explicit α with materialized W ⊙ M̄ (float64)."""
    layers = [model[0], model[2]]
    n, t = x.shape[0], len(tasks)
    alpha = torch.full((n, t) if per_sample else (t,), 1.0 / t, dtype=torch.float64, requires_grad=True)
    h = x.double()
    for i, mod in enumerate(model):
        if isinstance(mod, softtf.SoftLinear):
            masks = torch.stack([mod.mask(k).double() for k in tasks])
            w = mod.weight.double()
            if per_sample:
                wb = w * torch.einsum("bt,toi->boi", alpha, masks)
                h = torch.einsum("bi,boi->bo", h, wb) + mod.bias.double()
            else:
                h = nn.functional.linear(h, w * torch.einsum("t,toi->oi", alpha, masks), mod.bias.double())
        else:
            h = mod(h)
    (g,) = torch.autograd.grad(entropy(h).sum(), alpha)
    return g


@pytest.mark.parametrize("per_sample", [False, True])
def test_gradient_scores_equal_explicit_alpha_autograd(gen, per_sample):
    model = _mlp(gen)
    x = rand((5, 10), torch.float32, gen)
    res = gradient_id(model, x, rule="sample" if per_sample else "batch", k_shot=5)
    ref = _explicit_alpha_scores(model, x, res.tasks, per_sample)
    got = res.scores if per_sample else res.scores[0]
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-6)


def test_per_sample_scores_equal_one_sample_passes(gen):
    model = _mlp(gen, T=4)
    x = rand((6, 10), torch.float32, gen)
    res = gradient_id(model, x, rule="sample")
    for b in range(6):
        single = gradient_id(model, x[b : b + 1], rule="sample")
        torch.testing.assert_close(single.scores[0], res.scores[b], rtol=1e-4, atol=1e-6)
    assert model[0].mode == "single"  # modes restored


def test_predict_with_tasks_equals_per_task_forward(gen):
    model = _mlp(gen)
    x = rand((5, 10), torch.float32, gen)
    ids = torch.tensor([2, 0, 1, 2, 0])
    logits = predict_with_tasks(model, x, ids, model[0].tasks)
    for b in range(5):
        for layer in (model[0], model[2]):
            layer.set_task(f"t{int(ids[b])}")
        torch.testing.assert_close(logits[b], model(x[b : b + 1])[0], rtol=1e-5, atol=1e-6)


def _known_mask_model(gen, T=4, per_task=3, noise=0.6):
    """A frozen random rotation, then a head; task t's first-layer mask passes only the hidden
    units of task t's classes (random soft values there, zero elsewhere): masks known by design."""
    d = T * per_task
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen))
    body, head = nn.Linear(d, d), nn.Linear(d, d)
    with torch.no_grad():
        body.weight.copy_(q)
        body.bias.zero_()
        head.weight.copy_(3.0 * torch.eye(d))
        head.bias.zero_()
    model = nn.Sequential(softtf.SoftLinear(body), nn.ReLU(), softtf.SoftLinear(head))
    for t in range(T):
        rows = slice(t * per_task, (t + 1) * per_task)
        for layer in model[0], model[2]:
            layer.add_task(f"task{t}")
        with torch.no_grad():
            m = model[0].masks[f"task{t}"]
            m.zero_()
            m[rows] = 0.5 + torch.rand(per_task, d, generator=gen)
        for layer in model[0], model[2]:
            layer.freeze_task(f"task{t}")

    def sample(t, n):
        cls = torch.randint(0, per_task, (n,), generator=gen) + t * per_task
        z = 4.0 * nn.functional.one_hot(cls, d).float() + noise * torch.randn(n, d, generator=gen)
        return z @ q, cls  # rotated back: body(x) = z (+ noise)

    return model, sample


def test_gradient_id_recovers_known_tasks_on_a_toy_model(gen):
    T = 4
    model, sample = _known_mask_model(gen, T=T)
    xs, ts = [], []
    for t in range(T):
        x, _ = sample(t, 30)
        xs.append(x)
        ts.append(torch.full((30,), t))
    x, truth = torch.cat(xs), torch.cat(ts)
    res = gradient_id(model, x, rule="sample")
    acc = (res.task_index == truth).float().mean().item()
    assert acc > 0.9, f"per-sample Gradient ID task accuracy {acc:.2f} (chance {1 / T:.2f})"
    res_bin = gradient_id(model, x, rule="binary-sample")
    assert (res_bin.task_index == truth).float().mean().item() > 0.9
    # the paper's rule on single-task batches: one task for the whole batch
    for t in range(T):
        assert gradient_id(model, xs[t], rule="batch", k_shot=7).task_index.unique().tolist() == [t]
        assert gradient_id(model, xs[t], rule="binary", k_shot=7).task_index.unique().tolist() == [t]
    # indices follow the order of `tasks`: a permuted candidate list permutes the answers
    perm = ["task1", "task0", "task3", "task2"]
    permuted = gradient_id(model, x, rule="sample", tasks=perm)
    assert permuted.task_names == res.task_names
    logits = predict_with_tasks(model, x, res.task_index, res.tasks)
    assert logits.shape == (T * 30, T * 3)
    assert (logits.argmax(1) // 3 == truth).float().mean().item() > 0.9


def test_gradient_id_errors(gen):
    model = _mlp(gen)
    x = rand((3, 10), torch.float32, gen)
    with pytest.raises(ValueError, match="rule must be one of"):
        gradient_id(model, x, rule="vote")
    with pytest.raises(ValueError, match=r"task 'zz' is not a learned \(frozen\) task"):
        gradient_id(model, x, tasks=["zz"])
    with pytest.raises(ValueError, match="model has no SoftLinear layers"):
        gradient_id(nn.Linear(3, 3), x)
    with pytest.raises(ValueError, match=r"topk must lie in \[1, 6\]"):
        gradient_id(model, x, topk=9)
    fresh = _mlp(gen, T=0)
    for layer in (fresh[0], fresh[2]):
        layer.add_task("only")
    with pytest.raises(ValueError, match="needs at least one learned"):
        gradient_id(fresh, x)
    with pytest.raises(ValueError, match=r"task_index must be a 1-D tensor with 3 entries"):
        predict_with_tasks(model, x, torch.tensor([0, 1]), model[0].tasks)
    with pytest.raises(ValueError, match=r"alpha \[B, T\] needs masks \[T, out, in\] with the same T"):
        softtf.superposed_linear(x, model[0].weight, model[0].frozen_masks, torch.rand(3, 9), None)


@pytest.mark.parametrize("mdt", [torch.float32, torch.bfloat16])
def test_superposed_linear_grads_match_oracle(gen, mdt):
    B, N, fin, fout, T = 4, 3, 20, 9, 5
    x = rand((B, N, fin), torch.float32, gen).requires_grad_()
    w, b = rand((fout, fin), torch.float32, gen), rand((fout,), torch.float32, gen)
    masks = rand_mask((T, fout, fin), mdt, gen)
    alpha = torch.rand(T, generator=gen).expand(B, T).clone().requires_grad_()
    y = softtf.superposed_linear(x, w, masks, alpha, b)
    dy = rand(y.shape, torch.float32, gen)
    dx, da = torch.autograd.grad(y, (x, alpha), dy)
    xr, ar = x.detach().double().requires_grad_(), alpha.detach().double().requires_grad_()
    yr = torch.einsum("bni,boi->bno", xr, w.double() * torch.einsum("bt,toi->boi", ar, masks.double())) + b.double()
    rx, ra = torch.autograd.grad(yr, (xr, ar), dy.double())
    assert_close_rel(y, yr.detach(), torch.float32, "y")
    assert_close_rel(dx, rx, torch.float32, "dx")
    assert_close_rel(da, ra, torch.float32, "dalpha")
