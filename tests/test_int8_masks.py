"""int8 frozen masks (issue 16): the row-quantized layout of softtf_kernels.quant, and every op that
reads masks, on the C++ CPU kernels, against the float64 oracle applied to the dequantized masks."""
import pytest
import torch

import softtf_kernels
from softtf_kernels import reference as R
from softtf_kernels.quant import QMASK_TAIL, dequantize_mask, mask_codes, mask_scale_offset, quantize_mask

from helpers import assert_close_rel, rand

# (leading dims, in, out): one token, the few-token path, GEMM panels, odd sizes, 3-D
SHAPES = [((1,), 16, 8), ((7,), 257, 129), ((40,), 67, 45), ((2, 5), 33, 17), ((3, 11), 128, 96)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def soft_mask(shape, gen):
    """A trained-looking soft mask: a narrow band around 1, some rows wider, one constant row."""
    m = 0.97 + 0.06 * torch.rand(shape, generator=gen, dtype=torch.float64)
    m[..., 0, :] = 1.0  # a constant row quantizes exactly
    m[..., -1, :] *= torch.linspace(0.0, 1.5, shape[-1], dtype=torch.float64)  # a wide one
    return m.float()


def oracle_mask(q):
    return dequantize_mask(q, torch.float64)


@pytest.fixture(autouse=True)
def _cpp():
    if not softtf_kernels.cpp_available():
        pytest.skip("C++ CPU kernels not built")
    with softtf_kernels.use_backend("cpp"):
        yield


# ---------------------------------------------------------------- the layout
def test_quantized_mask_layout_and_error(gen):
    m = soft_mask((2, 9, 37), gen)
    q = quantize_mask(m)
    assert q.dtype == torch.int8 and q.shape == (2, 9, 37 + QMASK_TAIL) and q.is_contiguous()
    scale, offset = mask_scale_offset(q)
    assert scale.shape == offset.shape == (2, 9, 1) and scale.dtype == torch.float32
    codes = mask_codes(q)
    assert codes.abs().max() <= 127
    err = (dequantize_mask(q, torch.float64) - m.double()).abs()
    assert (err <= scale.double() / 2 + 1e-6 * m.double().abs().amax(-1, keepdim=True)).all()
    assert torch.equal(dequantize_mask(q)[:, 0], m[:, 0])  # constant rows are exact
    # bytes per entry: 1 + 8 / in (float32: 4)
    assert q.numel() * q.element_size() < m.numel() * m.element_size() / 3


@pytest.mark.parametrize("bad, err, match", [
    (torch.ones(3, 4, dtype=torch.int64), TypeError, "floating-point"),
    (torch.ones(4), ValueError, r"\[..., out, in\]"),
    (torch.tensor([[1.0, float("nan")]]), ValueError, "NaN or inf"),
])
def test_quantize_refuses(bad, err, match):
    with pytest.raises(err, match=match):
        quantize_mask(bad)


# ---------------------------------------------------------------- the ops
@pytest.mark.parametrize("lead,fin,fout", SHAPES)
@pytest.mark.parametrize("dt", DTYPES)
def test_masked_linear_and_grad_input(gen, lead, fin, fout, dt):
    x, w, b = rand((*lead, fin), dt, gen), rand((fout, fin), dt, gen), rand((fout,), dt, gen)
    q = quantize_mask(soft_mask((fout, fin), gen))
    y = torch.ops.softtf.masked_linear(x, w, q, b)
    assert y.dtype == dt and y.shape == (*lead, fout)
    assert_close_rel(y, R.masked_linear(x.double(), w.double(), oracle_mask(q), b.double()), dt, "forward")
    dy = rand((*lead, fout), dt, gen)
    dx = torch.ops.softtf.masked_linear_grad_input(dy, w, q)
    assert_close_rel(dx, R.masked_linear_grad_input(dy.double(), w.double(), oracle_mask(q)), dt, "dx")


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16, torch.float64])
def test_mask_mixture_grad(gen, per_sample, dt):
    x, dy, w = rand((3, 5, 33), dt, gen), rand((3, 5, 19), dt, gen), rand((19, 33), dt, gen)
    qs = quantize_mask(soft_mask((4, 19, 33), gen))
    g = torch.ops.softtf.mask_mixture_grad(dy, x, w, qs, per_sample)
    ref = R.mask_mixture_grad(dy.double(), x.double(), w.double(), oracle_mask(qs), per_sample)
    assert_close_rel(g, ref, torch.float32 if dt != torch.float64 else dt, "scores")


@pytest.mark.parametrize("tokens", [1, 40])
@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16])
def test_mixed_task_linear(gen, tokens, dt):
    x, w, b = rand((6, tokens, 21), dt, gen), rand((13, 21), dt, gen), rand((13,), dt, gen)
    stack = quantize_mask(soft_mask((5, 13, 21), gen))
    qs = stack[1:4]  # a view into a bigger stack: every offset computed from its own strides
    ids = torch.tensor([2, 0, 0, 1, 2, 1])
    y = torch.ops.softtf.mixed_task_linear(x, w, qs, ids, b)
    assert_close_rel(y, R.mixed_task_linear(x.double(), w.double(), oracle_mask(qs), ids, b.double()), dt, "forward")
    dy = rand(y.shape, dt, gen)
    dx = torch.ops.softtf.mixed_task_linear_grad_input(dy, w, qs, ids)
    assert_close_rel(dx, R.mixed_task_linear_grad_input(dy.double(), w.double(), oracle_mask(qs), ids), dt, "dx")


def test_non_contiguous_int8_mask(gen):
    w, x = rand((9, 30), torch.float32, gen), rand((3, 30), torch.float32, gen)
    q = quantize_mask(soft_mask((9, 30), gen))
    wide = torch.zeros(9, 2 * q.shape[1], dtype=torch.int8)
    wide[:, ::2] = q
    view = wide[:, ::2]
    assert not view.is_contiguous() and torch.equal(view, q)
    for tokens in (3, 40):  # the few-token path and the GEMM panels
        xs = rand((tokens, 30), torch.float32, gen)
        assert_close_rel(torch.ops.softtf.masked_linear(xs, w, view), R.masked_linear(xs.double(), w.double(), oracle_mask(q)),
                         torch.float32, f"{tokens} tokens")


def test_int8_mask_errors(gen):
    w, x = rand((9, 30), torch.float32, gen), rand((3, 30), torch.float32, gen)
    q = quantize_mask(soft_mask((9, 30), gen))
    with pytest.raises(ValueError, match=r"\[out, in \+ 8\] = \[9, 38\] \(an int8 mask\)"):
        torch.ops.softtf.masked_linear(x, w, q[:, :30])
    with pytest.raises(TypeError, match="or int8 \\(a quantized mask\\), got torch.uint8"):
        torch.ops.softtf.masked_linear(x, w, q.view(torch.uint8))
    with pytest.raises(TypeError, match="mask_dtype must be float32, bfloat16, float16 or float64, got torch.int8"):
        torch.ops.softtf.masked_linear_grad_mask(rand((3, 9), torch.float32, gen), x, w, torch.int8)
    with pytest.raises(ValueError, match=r"masks must have shape \[T, 9, 30 \+ 8\] \(int8 masks\)"):
        torch.ops.softtf.mask_mixture_grad(rand((3, 9), torch.float32, gen), x, w, q[None, :, :30], False)
    # the C++ kernel checks for itself when called directly
    with pytest.raises(RuntimeError, match="in \\+ 8 columns"):
        torch.ops.softtf._cpp_masked_linear(x, w, q[:, :30], None)


def test_autograd_through_a_frozen_int8_mask(gen):
    w = rand((9, 30), torch.float32, gen)
    q = quantize_mask(soft_mask((9, 30), gen))
    x = rand((4, 30), torch.float32, gen).requires_grad_()
    torch.ops.softtf.masked_linear(x, w, q).sum().backward()
    xr = x.detach().double().requires_grad_()
    R.masked_linear(xr, w.double(), oracle_mask(q)).sum().backward()
    assert_close_rel(x.grad, xr.grad, torch.float32, "dx")
