"""The CUDA C++ kernels (backend "cuda") against the float64 oracle on a real GPU.

Runs only where a CUDA device exists and softtf_kernels._C was built with the CUDA kernels
(SOFTTF_FORCE_CUDA=1); skipped elsewhere. The same kernel code is exercised on the CPU by
tests/test_cuda_harness.py everywhere.
"""
import pytest
import torch

import softtf_kernels
from softtf_kernels import reference as R
from softtf_kernels.quant import quantize_mask

from helpers import KERNEL_DTYPE_PAIRS, TOL, assert_close_rel, rand, rand_mask
from test_int8_masks import oracle_mask as _q, soft_mask  # a trained-looking mask, its float64 oracle

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.skipif(not softtf_kernels.cuda_available(),
                       reason="softtf_kernels._C built without the CUDA kernels (SOFTTF_FORCE_CUDA=1)"),
]

SHAPES = [((1,), 67, 45), ((7,), 257, 129), ((197,), 67, 129), ((2, 5), 257, 45), ((3, 4), 64, 128),
          ((2, 197), 768, 768)]
DTYPES = KERNEL_DTYPE_PAIRS


@pytest.fixture(autouse=True)
def _cuda_backend():
    softtf_kernels.set_backend("cuda")


def _g(t):
    return None if t is None else t.cuda()


def _d(t):
    return None if t is None else t.double()


def _tol(*dts):
    return max(dts, key=lambda d: TOL[d])


@pytest.mark.parametrize("lead,fin,fout", SHAPES)
@pytest.mark.parametrize("dt,mdt", DTYPES)
def test_forward(gen, lead, fin, fout, dt, mdt):
    x, w = rand((*lead, fin), dt, gen), rand((fout, fin), dt, gen)
    m, b = rand_mask((fout, fin), mdt, gen), rand((fout,), dt, gen)
    y = torch.ops.softtf.masked_linear(_g(x), _g(w), _g(m), _g(b))
    assert y.is_cuda and y.dtype == dt and y.shape == (*lead, fout)
    assert_close_rel(y.cpu(), R.masked_linear(_d(x), _d(w), _d(m), _d(b)), _tol(dt, mdt), "forward")
    y0 = torch.ops.softtf.masked_linear(_g(x), _g(w), _g(m))
    assert_close_rel(y0.cpu(), R.masked_linear(_d(x), _d(w), _d(m)), _tol(dt, mdt), "forward, no bias")


@pytest.mark.parametrize("lead,fin,fout", SHAPES)
@pytest.mark.parametrize("dt,mdt", DTYPES)
def test_backward_kernels(gen, lead, fin, fout, dt, mdt):
    x, w, m = rand((*lead, fin), dt, gen), rand((fout, fin), dt, gen), rand_mask((fout, fin), mdt, gen)
    dy = rand((*lead, fout), dt, gen)
    dx = torch.ops.softtf.masked_linear_grad_input(_g(dy), _g(w), _g(m))
    assert dx.dtype == dt
    assert_close_rel(dx.cpu(), R.masked_linear_grad_input(_d(dy), _d(w), _d(m)), _tol(dt, mdt), "dx")
    dm = torch.ops.softtf.masked_linear_grad_mask(_g(dy), _g(x), _g(w), mdt)
    assert dm.dtype == mdt
    ref = R.masked_linear_grad_mask(_d(dy), _d(x), _d(w), torch.float64)
    assert_close_rel(dm.cpu(), ref, _tol(dt, mdt), "dM")


def test_grad_mask_float64_output(gen):
    dy, x, w = rand((9, 45), torch.float32, gen), rand((9, 67), torch.float32, gen), rand((45, 67), torch.float32, gen)
    dm = torch.ops.softtf._cuda_masked_linear_grad_mask(_g(dy), _g(x), _g(w), torch.float64)
    assert dm.dtype == torch.float64
    assert_close_rel(dm.cpu(), R.masked_linear_grad_mask(_d(dy), _d(x), _d(w), torch.float64), torch.float32, "dM f64")


@pytest.mark.parametrize("dt", [torch.float32, torch.float16, torch.bfloat16])
def test_non_contiguous_and_unaligned_inputs(gen, dt):
    base = rand((6, 5, 131), dt, gen).cuda()
    x = base.transpose(0, 1)[..., 1:]  # non-contiguous, odd width
    w, m = rand((45, 130), dt, gen).cuda(), rand_mask((45, 130), torch.float32, gen).cuda()
    y = torch.ops.softtf.masked_linear(x, w, m)
    assert_close_rel(y.cpu(), R.masked_linear(_d(x.cpu()), _d(w.cpu()), _d(m.cpu())), dt, "non-contiguous x")
    flat = rand((7 * 64 + 1,), dt, gen).cuda()
    xu = flat[1:].view(7, 64)  # contiguous, rows not 16-byte aligned: scalar load path
    w, m = rand((48, 64), dt, gen).cuda(), rand_mask((48, 64), torch.bfloat16, gen).cuda()
    y = torch.ops.softtf.masked_linear(xu, w, m)
    assert_close_rel(y.cpu(), R.masked_linear(_d(xu.cpu()), _d(w.cpu()), _d(m.cpu())), dt, "unaligned x")


@pytest.mark.parametrize("dt,mdt", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                    (torch.float16, torch.float32)])
def test_autograd(gen, dt, mdt):
    x = rand((3, 7, 67), dt, gen).cuda().requires_grad_()
    w = rand((45, 67), dt, gen).cuda()
    m = rand_mask((45, 67), mdt, gen).cuda().requires_grad_()
    b = rand((45,), dt, gen).cuda().requires_grad_()
    y = torch.ops.softtf.masked_linear(x, w, m, b)
    dy = rand(y.shape, dt, gen).cuda()
    y.backward(dy)
    xd, wd, md = _d(x.detach().cpu()), _d(w.cpu()), _d(m.detach().cpu())
    tol = _tol(dt, mdt)
    assert_close_rel(x.grad.cpu(), R.masked_linear_grad_input(_d(dy.cpu()), wd, md), tol, "x.grad")
    assert_close_rel(m.grad.cpu(), R.masked_linear_grad_mask(_d(dy.cpu()), xd, wd, torch.float64), tol, "mask.grad")
    assert_close_rel(b.grad.cpu(), _d(dy.cpu()).reshape(-1, 45).sum(0), tol, "bias.grad")


MIX_SHAPES = [((3, 7), 67, 45), ((2, 197), 257, 129), ((4, 1, 3), 64, 128), ((5, 197), 768, 768)]


@pytest.mark.parametrize("lead,fin,fout", MIX_SHAPES)
@pytest.mark.parametrize("dt,mdt", DTYPES)
@pytest.mark.parametrize("per_sample", [False, True])
def test_mask_mixture_grad(gen, lead, fin, fout, dt, mdt, per_sample):
    n_tasks = 5
    dy, x = rand((*lead, fout), dt, gen), rand((*lead, fin), dt, gen)
    w, masks = rand((fout, fin), dt, gen), rand_mask((n_tasks, fout, fin), mdt, gen)
    g = torch.ops.softtf.mask_mixture_grad(_g(dy), _g(x), _g(w), _g(masks), per_sample)
    ref = R.mask_mixture_grad(_d(dy), _d(x), _d(w), _d(masks), per_sample)
    assert g.shape == ref.shape and g.dtype == torch.float32
    assert_close_rel(g.cpu(), ref, _tol(dt, mdt), "mixture scores")


@pytest.mark.parametrize("lead,fin,fout", MIX_SHAPES)
@pytest.mark.parametrize("dt,mdt", DTYPES)
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
def test_mixed_task(gen, lead, fin, fout, dt, mdt, id_dtype):
    n_tasks = 3
    x, w = rand((*lead, fin), dt, gen), rand((fout, fin), dt, gen)
    masks, b = rand_mask((n_tasks, fout, fin), mdt, gen), rand((fout,), dt, gen)
    ids = torch.randint(0, n_tasks, (lead[0],), generator=gen).to(id_dtype)
    y = torch.ops.softtf.mixed_task_linear(_g(x), _g(w), _g(masks), _g(ids), _g(b))
    tol = _tol(dt, mdt)
    assert_close_rel(y.cpu(), R.mixed_task_linear(_d(x), _d(w), _d(masks), ids, _d(b)), tol, "mixed forward")
    dy = rand((*lead, fout), dt, gen)
    dx = torch.ops.softtf.mixed_task_linear_grad_input(_g(dy), _g(w), _g(masks), _g(ids))
    assert_close_rel(dx.cpu(), R.mixed_task_linear_grad_input(_d(dy), _d(w), _d(masks), ids), tol, "mixed dx")


def test_empty_and_degenerate_shapes(gen):
    w, m = rand((45, 67), torch.float16, gen).cuda(), rand_mask((45, 67), torch.float32, gen).cuda()
    y = torch.ops.softtf.masked_linear(torch.empty(0, 67, dtype=torch.float16, device="cuda"), w, m)
    assert y.shape == (0, 45)
    dm = torch.ops.softtf.masked_linear_grad_mask(torch.empty(0, 45, dtype=torch.float16, device="cuda"),
                                                  torch.empty(0, 67, dtype=torch.float16, device="cuda"), w, torch.float32)
    assert torch.equal(dm.cpu(), torch.zeros(45, 67))


def test_unsupported_dtype_raises_naming_the_argument(gen):
    x = rand((3, 8), torch.float64, gen).cuda()
    w, m = rand((4, 8), torch.float64, gen).cuda(), torch.ones(4, 8, device="cuda")
    with pytest.raises(RuntimeError, match="weight"):
        torch.ops.softtf._cuda_masked_linear(x, w, m)
    w32 = w.float()
    with pytest.raises(RuntimeError, match="mask"):
        torch.ops.softtf._cuda_masked_linear(x.float(), w32, m.double())
    # Through the public op, float64 goes to the exact reference instead.
    y = torch.ops.softtf.masked_linear(x, w, m)
    assert_close_rel(y.cpu(), R.masked_linear(x.cpu(), w.cpu(), m.cpu().double()), torch.float64, "f64 via reference")


# ----------------------------------------------------------------------------- int8 masks
# softtf_kernels.quant's [.., out, in + 8] int8 masks, dequantized by the kernels in registers; the
# oracle gets dequantize_mask in float64. Widths 120 / 24 / 36 give mask rows the kernels read as
# chunk vectors (36: with fp32 x, tails 4- but not 8-byte aligned); the others, byte-wise tails.
Q_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
Q_SHAPES = SHAPES + [((9,), 120, 70), ((5,), 24, 33), ((3,), 36, 20)]


@pytest.mark.parametrize("lead,fin,fout", Q_SHAPES)
@pytest.mark.parametrize("dt", Q_DTYPES)
def test_int8_mask_forward_and_grad_input(gen, lead, fin, fout, dt):
    x, w, b = rand((*lead, fin), dt, gen), rand((fout, fin), dt, gen), rand((fout,), dt, gen)
    q = quantize_mask(soft_mask((fout, fin), gen))
    y = torch.ops.softtf.masked_linear(_g(x), _g(w), _g(q), _g(b))
    assert y.is_cuda and y.dtype == dt and y.shape == (*lead, fout)
    assert_close_rel(y.cpu(), R.masked_linear(_d(x), _d(w), _q(q), _d(b)), dt, "int8 forward")
    dy = rand((*lead, fout), dt, gen)
    dx = torch.ops.softtf.masked_linear_grad_input(_g(dy), _g(w), _g(q))
    assert_close_rel(dx.cpu(), R.masked_linear_grad_input(_d(dy), _d(w), _q(q)), dt, "int8 dx")


@pytest.mark.parametrize("lead,fin,fout", MIX_SHAPES)
@pytest.mark.parametrize("dt", Q_DTYPES)
@pytest.mark.parametrize("per_sample", [False, True])
def test_int8_mask_mixture_grad(gen, lead, fin, fout, dt, per_sample):
    dy, x, w = rand((*lead, fout), dt, gen), rand((*lead, fin), dt, gen), rand((fout, fin), dt, gen)
    qs = quantize_mask(soft_mask((5, fout, fin), gen))
    g = torch.ops.softtf.mask_mixture_grad(_g(dy), _g(x), _g(w), _g(qs), per_sample)
    ref = R.mask_mixture_grad(_d(dy), _d(x), _d(w), _q(qs), per_sample)
    assert g.shape == ref.shape and g.dtype == torch.float32
    assert_close_rel(g.cpu(), ref, dt, "int8 mixture scores")


@pytest.mark.parametrize("lead,fin,fout", MIX_SHAPES)
@pytest.mark.parametrize("dt", Q_DTYPES)
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
def test_int8_mixed_task(gen, lead, fin, fout, dt, id_dtype):
    x, w, b = rand((*lead, fin), dt, gen), rand((fout, fin), dt, gen), rand((fout,), dt, gen)
    qs = _g(quantize_mask(soft_mask((5, fout, fin), gen)))[1:4]  # a view into a bigger stack
    ids = torch.randint(0, 3, (lead[0],), generator=gen).to(id_dtype)
    y = torch.ops.softtf.mixed_task_linear(_g(x), _g(w), qs, _g(ids), _g(b))
    assert_close_rel(y.cpu(), R.mixed_task_linear(_d(x), _d(w), _q(qs.cpu()), ids, _d(b)), dt, "int8 mixed forward")
    dy = rand((*lead, fout), dt, gen)
    dx = torch.ops.softtf.mixed_task_linear_grad_input(_g(dy), _g(w), qs, _g(ids))
    assert_close_rel(dx.cpu(), R.mixed_task_linear_grad_input(_d(dy), _d(w), _q(qs.cpu()), ids), dt, "int8 mixed dx")


@pytest.mark.parametrize("dt", Q_DTYPES)
def test_int8_mask_non_contiguous_and_autograd(gen, dt):
    w = rand((45, 130), dt, gen).cuda()
    q = quantize_mask(soft_mask((45, 130), gen)).cuda()
    wide = torch.zeros(45, 2 * q.shape[1], dtype=torch.int8, device="cuda")
    wide[:, ::2] = q
    view = wide[:, ::2]  # non-contiguous: the binding copies its bytes, nothing is dequantized
    x = rand((3, 7, 130), dt, gen).cuda().requires_grad_()
    y = torch.ops.softtf.masked_linear(x, w, view)
    wd, md = _d(w.cpu()), _q(q.cpu())
    assert_close_rel(y.detach().cpu(), R.masked_linear(_d(x.detach().cpu()), wd, md), dt, "strided int8")
    dy = rand(y.shape, dt, gen).cuda()
    y.backward(dy)  # a frozen int8 mask: gradients for x only
    assert_close_rel(x.grad.cpu(), R.masked_linear_grad_input(_d(dy.cpu()), wd, md), dt, "int8 x.grad")
