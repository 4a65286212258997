"""The oracle itself, checked against autograd in float64."""
import pytest
import torch

from softtf_kernels import reference as R

from helpers import rand, rand_mask


def test_reference_forward_and_grads_match_autograd(gen):
    x = rand((2, 3, 7), torch.float64, gen).requires_grad_()
    w = rand((5, 7), torch.float64, gen)
    m = rand_mask((5, 7), torch.float64, gen).requires_grad_()
    b = rand((5,), torch.float64, gen)
    y = torch.nn.functional.linear(x, w * m, b)
    torch.testing.assert_close(R.masked_linear(x, w, m, b), y)
    dy = rand(y.shape, torch.float64, gen)
    dx, dm = torch.autograd.grad(y, (x, m), dy)
    torch.testing.assert_close(R.masked_linear_grad_input(dy, w, m), dx)
    torch.testing.assert_close(R.masked_linear_grad_mask(dy, x, w, torch.float64), dm)


def test_reference_gradcheck(gen):
    x = rand((3, 4), torch.float64, gen).requires_grad_()
    w = rand((2, 4), torch.float64, gen)
    m = rand_mask((2, 4), torch.float64, gen).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, m: R.masked_linear(x, w, m), (x, m))


def _entropy(logits):
    p = logits.softmax(-1)
    return -(p * logits.log_softmax(-1)).sum(-1)


@pytest.mark.parametrize("per_sample", [False, True])
def test_mask_mixture_grad_equals_autograd_over_alpha(gen, per_sample):
    """∂H/∂α_t through an explicit α with W ⊙ Σ α_t M_t, one layer, batch or per sample."""
    B, N, I, O, T = 3, 4, 6, 5, 4
    x = rand((B, N, I), torch.float64, gen)
    w = rand((O, I), torch.float64, gen)
    masks = rand_mask((T, O, I), torch.float64, gen)
    alpha = torch.full((T,), 1.0 / T, dtype=torch.float64, requires_grad=True)
    if per_sample:
        # one α per sample so autograd yields per-sample derivatives
        alpha_b = alpha.detach().expand(B, T).clone().requires_grad_()
        mbar = torch.einsum("bt,toi->boi", alpha_b, masks)
        y = torch.einsum("bni,boi->bno", x, w * mbar)
        h = _entropy(y.mean(1)).sum()
        (g,) = torch.autograd.grad(h, alpha_b)
        y2 = y.detach().requires_grad_()
        h2 = _entropy(y2.mean(1)).sum()
        (dy,) = torch.autograd.grad(h2, y2)
    else:
        mbar = torch.einsum("t,toi->oi", alpha, masks)
        y = torch.nn.functional.linear(x, w * mbar)
        h = _entropy(y.mean(1)).sum()
        (g,) = torch.autograd.grad(h, alpha)
        y2 = y.detach().requires_grad_()
        (dy,) = torch.autograd.grad(_entropy(y2.mean(1)).sum(), y2)
    torch.testing.assert_close(R.mask_mixture_grad(dy, x, w, masks, per_sample), g)


def test_mixed_task_linear_reference_matches_per_sample_loop(gen):
    B, N, I, O, T = 4, 3, 6, 5, 3
    x = rand((B, N, I), torch.float64, gen)
    w = rand((O, I), torch.float64, gen)
    masks = rand_mask((T, O, I), torch.float64, gen)
    b = rand((O,), torch.float64, gen)
    ids = torch.tensor([2, 0, 2, 1])
    y = R.mixed_task_linear(x, w, masks, ids, b)
    for s in range(B):
        torch.testing.assert_close(y[s], torch.nn.functional.linear(x[s], w * masks[ids[s]], b))
    dy = rand(y.shape, torch.float64, gen)
    dx = R.mixed_task_linear_grad_input(dy, w, masks, ids)
    for s in range(B):
        torch.testing.assert_close(dx[s], dy[s] @ (w * masks[ids[s]]))
