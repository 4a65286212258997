"""Triton kernels on a CUDA GPU against the float64 oracle: every dtype incl. bf16, autotuned
configs, ViT-sized shapes, strided inputs, tf32, and the ops/autograd path. Skipped without CUDA.

The kernels are built (decorated) at import here, before a CPU-interpreter test module of the
same pytest process can set TRITON_INTERPRET=1; if that already happened, this module skips
(run it on its own: ``pytest tests/test_triton_gpu.py``).
"""
import pytest
import torch

from triton_interpreter import gpu_compiled_marks  # noqa: E402

pytestmark = gpu_compiled_marks("softtf_kernels.triton.kernels")
COMPILED = not any(mark.args[0] for mark in pytestmark)

import softtf_kernels  # noqa: E402
from softtf_kernels import reference as R  # noqa: E402

from helpers import TOL, assert_close_rel, rand, rand_mask  # noqa: E402

if COMPILED:
    import softtf_kernels.triton as T
    from softtf_kernels.triton import host

DEV = "cuda"


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("SOFTTF_POISON_OUTPUTS", "1")


def _c(t):
    return t.to(DEV)


def _r(shape, dt, gen):
    return _c(rand(shape, dt, gen))


def _m(shape, dt, gen):
    return _c(rand_mask(shape, dt, gen))


def _tol(dt, mdt=None):
    # Outputs written in a 16-bit mask dtype carry its rounding even for fp32 inputs.
    return dt if mdt is None or TOL[mdt] <= TOL[dt] else mdt


def _close(actual, expected, dt, what):
    assert_close_rel(actual.cpu(), expected.cpu(), dt, what)


SHAPES = [((1,), 67, 45), ((2, 5), 67, 45), ((3, 11), 128, 96), ((7,), 257, 129), ((2, 197), 768, 2304)]
DTYPES = [
    (torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.float32, torch.float16),
    (torch.float16, torch.float16), (torch.float16, torch.float32),
    (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.float16),
]


@pytest.mark.parametrize("lead,fin,fout", SHAPES)
@pytest.mark.parametrize("dt,mdt", DTYPES)
def test_forward_and_backward_kernels(gen, lead, fin, fout, dt, mdt):
    x, dy = _r((*lead, fin), dt, gen), _r((*lead, fout), dt, gen)
    w, m, b = _r((fout, fin), dt, gen), _m((fout, fin), mdt, gen), _r((fout,), dt, gen)
    xd, dyd, wd, md, bd = x.double(), dy.double(), w.double(), m.double(), b.double()
    y = T.masked_linear(x, w, m, b)
    assert y.dtype == dt and y.shape == (*lead, fout)
    _close(y, R.masked_linear(xd, wd, md, bd), dt, "forward")
    _close(T.masked_linear(x, w, m), R.masked_linear(xd, wd, md), dt, "forward, no bias")
    _close(T.masked_linear_grad_input(dy, w, m), R.masked_linear_grad_input(dyd, wd, md), dt, "dx")
    dm = T.masked_linear_grad_mask(dy, x, w, mdt)
    assert dm.dtype == mdt
    _close(dm, R.masked_linear_grad_mask(dyd, xd, wd, torch.float64), _tol(dt, mdt), "dM")


@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16, torch.float16])
def test_strided_and_transposed(gen, dt):
    x = _r((197, 4, 768 + 8), dt, gen)[..., 8:].transpose(0, 1)  # 3-D view, sliced rows
    dy = _r((4, 197, 2304), dt, gen)
    w = _r((768, 2304), dt, gen).T
    m = _m((768, 2304), torch.bfloat16, gen).T
    assert not x.is_contiguous() and not w.is_contiguous()
    xd, dyd, wd, md = x.double(), dy.double(), w.double(), m.double()
    _close(T.masked_linear(x, w, m), R.masked_linear(xd, wd, md), dt, "forward")
    _close(T.masked_linear_grad_input(dy, w, m), R.masked_linear_grad_input(dyd, wd, md), dt, "dx")
    _close(T.masked_linear_grad_mask(dy, x, w, torch.float32),
           R.masked_linear_grad_mask(dyd, xd, wd, torch.float64), dt, "dM")


@pytest.mark.parametrize("tokens,fin,fout", [(64 * 197, 768, 768), (32 * 128, 768, 768), (4096, 128, 64)])
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float32])
def test_grad_mask_split_k(gen, tokens, fin, fout, dt):
    # Few output tiles, many tokens: the split-K path with fp32 partials.
    if host._choose_split(tokens, fout, fin, torch.device(DEV)) == 1:
        pytest.skip("this GPU has few enough SMs that the shape runs unsplit")
    x, dy, w = _r((tokens, fin), dt, gen), _r((tokens, fout), dt, gen), _r((fout, fin), dt, gen)
    ref = R.masked_linear_grad_mask(dy.double(), x.double(), w.double(), torch.float64)
    _close(T.masked_linear_grad_mask(dy, x, w, torch.float32), ref, dt, "dM split")


def test_autotuning_picks_a_config_per_shape(gen):
    K = host.K
    for rows in (1, 40, 4 * 197):
        x, w, m = _r((rows, 768), torch.bfloat16, gen), _r((2304, 768), torch.bfloat16, gen), _m((2304, 768), torch.bfloat16, gen)
        y = T.masked_linear(x, w, m)
        torch.cuda.synchronize()
        cfg = K.masked_mm_kernel.best_config
        assert cfg.kwargs["BLOCK_M"] <= max(16, 2 ** (rows - 1).bit_length()) or rows == 1
        _close(y, R.masked_linear(x.double(), w.double(), m.double()), torch.bfloat16, f"rows={rows}")


def test_every_config_is_correct(gen):
    """Run the masked GEMM with each autotune config (not only the winner) on a tail-heavy shape."""
    K = host.K
    x, w = _r((3, 70, 200), torch.bfloat16, gen), _r((300, 200), torch.bfloat16, gen)
    m = _m((300, 200), torch.float32, gen)
    ref = R.masked_linear(x.double(), w.double(), m.double())
    saved = K.masked_mm_kernel.configs
    try:
        for cfg in K._MM_CONFIGS_16:
            K.masked_mm_kernel.configs = [cfg]
            K.masked_mm_kernel.cache.clear()
            try:
                y = T.masked_linear(x, w, m)
            except Exception as exc:  # out of shared memory on a smaller GPU: not a wrong answer
                if "OutOfResources" in type(exc).__name__ or "shared memory" in str(exc):
                    continue
                raise
            _close(y, ref, torch.bfloat16, f"config {cfg}")
    finally:
        K.masked_mm_kernel.configs = saved
        K.masked_mm_kernel.cache.clear()


def test_tf32_switch(gen):
    x, w, m = _r((300, 512), torch.float32, gen), _r((256, 512), torch.float32, gen), _m((256, 512), torch.float32, gen)
    ref = R.masked_linear(x.double(), w.double(), m.double())
    before = T.get_fp32_precision()
    try:
        T.set_fp32_precision("tf32")
        y = T.masked_linear(x, w, m)
        err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
        assert err < 2e-3, err  # tf32: 10-bit mantissa operands
        T.set_fp32_precision("ieee")
        _close(T.masked_linear(x, w, m), ref, torch.float32, "ieee")
    finally:
        T.set_fp32_precision(before)


@pytest.mark.parametrize("dt,mdt", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                    (torch.float16, torch.float32)])
@pytest.mark.parametrize("per_sample", [False, True])
def test_mask_mixture_grad(gen, dt, mdt, per_sample):
    x, dy = _r((6, 197, 768), dt, gen), _r((6, 197, 384), dt, gen)
    w, masks = _r((384, 768), dt, gen), _m((5, 384, 768), mdt, gen)
    ref = R.mask_mixture_grad(dy.double(), x.double(), w.double(), masks.double(), per_sample)
    got = T.mask_mixture_grad(dy, x, w, masks, per_sample)
    assert got.dtype == torch.float32
    _close(got, ref, dt, "mixture")


@pytest.mark.parametrize("dt,mdt", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                    (torch.float16, torch.float32)])
def test_mixed_task(gen, dt, mdt):
    x, dy = _r((5, 197, 768), dt, gen), _r((5, 197, 256), dt, gen)
    w, b, masks = _r((256, 768), dt, gen), _r((256,), dt, gen), _m((3, 256, 768), mdt, gen)
    tid = torch.tensor([2, 0, 1, 2, 0], device=DEV)
    _close(T.mixed_task_linear(x, w, masks, tid, b),
           R.mixed_task_linear(x.double(), w.double(), masks.double(), tid, b.double()), dt, "mixed")
    _close(T.mixed_task_linear_grad_input(dy, w, masks, tid.int()),
           R.mixed_task_linear_grad_input(dy.double(), w.double(), masks.double(), tid), dt, "mixed dx")


@pytest.mark.parametrize("dt,mdt", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                    (torch.float16, torch.float32)])
def test_op_autograd(gen, dt, mdt):
    softtf_kernels.set_backend("triton")
    x = _r((4, 33, 200), dt, gen).requires_grad_()
    w = _r((96, 200), dt, gen)
    m = _m((96, 200), mdt, gen).requires_grad_()
    b = _r((96,), dt, gen).requires_grad_()
    y = torch.ops.softtf.masked_linear(x, w, m, b)
    dy = torch.randn_like(y)
    dx, dm, db = torch.autograd.grad(y, (x, m, b), dy)
    xd, md, bd = (t.detach().double().requires_grad_() for t in (x, m, b))
    yd = R.masked_linear(xd, w.double(), md, bd)
    rx, rm, rb = torch.autograd.grad(yd, (xd, md, bd), dy.double())
    _close(y, yd, dt, "op forward")
    _close(dx, rx, dt, "op dx")
    _close(dm, rm, _tol(dt, mdt), "op dM")
    _close(db, rb, dt, "op db")


def test_auto_backend_on_cuda_takes_the_measured_fastest(gen):
    softtf_kernels.set_backend("auto")
    x, w, m = _r((8, 64), torch.bfloat16, gen), _r((32, 64), torch.bfloat16, gen), _m((32, 64), torch.bfloat16, gen)
    name, _ = softtf_kernels.backend.resolve("masked_linear", x.device, (x.dtype, w.dtype, m.dtype))
    assert name == softtf_kernels.backend.CUDA_AUTO_ORDER["masked_linear"][0]
    _close(torch.ops.softtf.masked_linear(x, w, m), R.masked_linear(x.double(), w.double(), m.double()),
           torch.bfloat16, "auto backend")


def test_float64_raises_type_error():
    x = torch.randn(2, 4, device=DEV, dtype=torch.float64)
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16"):
        T.masked_linear(x, x.new_ones(3, 4), x.new_ones(3, 4).float())


def test_torch_compile_keeps_the_op(gen):
    softtf_kernels.set_backend("triton")
    x, w, m = _r((2, 9, 64), torch.bfloat16, gen), _r((48, 64), torch.bfloat16, gen), _m((48, 64), torch.bfloat16, gen)
    fn = torch.compile(lambda a: torch.ops.softtf.masked_linear(a, w, m) * 2, fullgraph=True)
    _close(fn(x), 2 * R.masked_linear(x.double(), w.double(), m.double()), torch.bfloat16, "compiled")
