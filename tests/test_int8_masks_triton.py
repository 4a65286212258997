"""int8 masks (softtf_kernels.quant) on the Triton kernels, through the interpreter on CPU: every op
that reads masks against the float64 oracle applied to the dequantized masks. The kernels read the
codes and each row's scale/offset bytes and dequantize in registers; these tests cover odd sizes
that straddle the 32-wide interpreter tiles, both masked_mm_kernel orientations, strided and
stacked int8 views, tail bytes of any value, and poisoned (NaN-initialised) outputs. fp32 and
fp16 activations only: the interpreter has no bf16 (no GPU test of int8 masks exists yet).
"""
from triton_interpreter import load_interpreted_kernels, rerun_under_interpreter  # noqa: E402

_kmod, RUN_HERE = load_interpreted_kernels()

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

import softtf_kernels  # noqa: E402
import softtf_kernels.triton as T  # noqa: E402
from softtf_kernels import reference as R  # noqa: E402
from softtf_kernels.quant import QMASK_TAIL, quantize_mask  # noqa: E402
from softtf_kernels.triton import host  # noqa: E402

from helpers import assert_close_rel, rand  # noqa: E402
from test_int8_masks import oracle_mask, soft_mask  # noqa: E402

here = pytest.mark.skipif(
    not RUN_HERE, reason="triton was loaded for a GPU in this process; test_rerun_in_subprocess runs these"
)
DTYPES = [torch.float32, torch.float16]


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    # The dispatcher reads TRITON_INTERPRET per call; outputs start as NaN (unwritten -> fail).
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("SOFTTF_POISON_OUTPUTS", "1")


@pytest.fixture(params=[False, True], ids=["masked-second", "masked-first"])
def orientation(request, monkeypatch):
    """Both masked_mm_kernel orientations (constexpr MASKED_FIRST), whose int8 tiles put the mask
    rows on opposite axes."""
    kernel = _kmod.masked_mm_kernel
    (cfg,) = _kmod.MM_CONFIGS
    one = _kmod.triton.Config({**cfg.kwargs, "MASKED_FIRST": request.param},
                              num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    monkeypatch.setattr(kernel, "configs", [one])
    monkeypatch.setattr(kernel, "cache", {})
    return request.param


def _d(t):
    return t.double()


def _strided(q):
    """The same int8 values as ``q`` [..., out, in + 8] in a column-strided view (stride 2), so the
    4 bytes of each scale and offset are not adjacent in memory."""
    wide = torch.zeros((*q.shape[:-1], 2 * q.shape[-1]), dtype=torch.int8)
    wide[..., ::2] = q
    view = wide[..., ::2]
    assert not view.is_contiguous() and torch.equal(view, q)
    return view


def assert_scores_close(got, dy, x, w, masks, per_sample, what):
    """Gradient-ID scores sum thousands of products that cancel, so their fp32 error is measured
    against the sum of those products' magnitudes (the oracle on |inputs|), not the result's."""
    ref = R.mask_mixture_grad(_d(dy), _d(x), _d(w), oracle_mask(masks), per_sample)
    mag = R.mask_mixture_grad(_d(dy).abs(), _d(x).abs(), _d(w).abs(), oracle_mask(masks).abs(), per_sample)
    assert got.dtype == torch.float32 and got.shape == ref.shape and torch.isfinite(got).all(), what
    err = ((got.double() - ref).abs() / mag.clamp_min(1e-30)).max()
    assert err <= 1e-6, f"{what}: max error {err:.3e} of the summed magnitudes > 1e-6"


# (leading dims, in, out): odd sizes below one tile, 3-D, one token, several tiles with K tails
SHAPES = [((5,), 37, 19), ((2, 3), 37, 19), ((1,), 16, 8), ((40,), 67, 45)]


@here
@pytest.mark.parametrize("lead,fin,fout", SHAPES)
@pytest.mark.parametrize("dt", DTYPES)
def test_masked_linear_and_grad_input(gen, orientation, lead, fin, fout, dt):
    x, w, b = rand((*lead, fin), dt, gen), rand((fout, fin), dt, gen), rand((fout,), dt, gen)
    q = quantize_mask(soft_mask((fout, fin), gen))
    y = T.masked_linear(x, w, q, b)
    assert y.dtype == dt and y.shape == (*lead, fout)
    assert_close_rel(y, R.masked_linear(_d(x), _d(w), oracle_mask(q), _d(b)), dt, "forward")
    assert_close_rel(T.masked_linear(x, w, q), R.masked_linear(_d(x), _d(w), oracle_mask(q)), dt, "no bias")
    dy = rand((*lead, fout), dt, gen)
    dx = T.masked_linear_grad_input(dy, w, q)
    assert dx.dtype == dt and dx.shape == (*lead, fin)
    assert_close_rel(dx, R.masked_linear_grad_input(_d(dy), _d(w), oracle_mask(q)), dt, "dx")


@here
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("dt", DTYPES)
def test_mask_mixture_grad(gen, per_sample, dt):
    x, dy, w = rand((3, 5, 37), dt, gen), rand((3, 5, 19), dt, gen), rand((19, 37), dt, gen)
    qs = quantize_mask(soft_mask((4, 19, 37), gen))
    assert_scores_close(T.mask_mixture_grad(dy, x, w, qs, per_sample), dy, x, w, qs, per_sample, "scores")
    # A strided view of a bigger stack, and a column-strided one.
    stack = quantize_mask(soft_mask((6, 19, 37), gen))
    for view in (stack[1:6:2], _strided(stack[:2])):
        assert_scores_close(T.mask_mixture_grad(dy, x, w, view, per_sample), dy, x, w, view, per_sample, "view")


@here
@pytest.mark.parametrize("dt", DTYPES)
def test_mixed_task_linear(gen, orientation, dt):
    x, w, b = rand((6, 5, 37), dt, gen), rand((19, 37), dt, gen), rand((19,), dt, gen)
    stack = quantize_mask(soft_mask((5, 19, 37), gen))
    qs = stack[1:4]  # a view into a bigger stack: each task's offset from its own stride
    dy = rand((6, 5, 19), dt, gen)
    for ids in (torch.tensor([2, 0, 0, 1, 2, 1]), torch.tensor([1, 1, 2, 0, 0, 2], dtype=torch.int32)):
        y = T.mixed_task_linear(x, w, qs, ids, b)
        assert y.dtype == dt and y.shape == (6, 5, 19)
        assert_close_rel(y, R.mixed_task_linear(_d(x), _d(w), oracle_mask(qs), ids, _d(b)), dt, "forward")
        dx = T.mixed_task_linear_grad_input(dy, w, qs, ids)
        assert_close_rel(dx, R.mixed_task_linear_grad_input(_d(dy), _d(w), oracle_mask(qs), ids), dt, "dx")


@here
def test_non_contiguous_int8_masks(gen, orientation):
    """Column-strided masks, a stack stored task-minor ([out, T, in + 8] permuted), an expanded one."""
    x, w = rand((5, 37), torch.float32, gen), rand((19, 37), torch.float32, gen)
    dy = rand((5, 19), torch.float32, gen)
    q = _strided(quantize_mask(soft_mask((19, 37), gen)))
    assert_close_rel(T.masked_linear(x, w, q), R.masked_linear(_d(x), _d(w), oracle_mask(q)), torch.float32, "fwd")
    assert_close_rel(T.masked_linear_grad_input(dy, w, q), R.masked_linear_grad_input(_d(dy), _d(w), oracle_mask(q)),
                     torch.float32, "dx")
    minor = quantize_mask(soft_mask((19, 3, 37), gen)).permute(1, 0, 2)  # [3, 19, 45], task stride 45
    ids = torch.tensor([2, 0, 1, 2, 1])
    xs, dys = x[:, None], dy[:, None]
    for masks in (minor, _strided(minor), quantize_mask(soft_mask((1, 19, 37), gen)).expand(3, -1, -1)):
        assert_close_rel(T.mixed_task_linear(xs, w, masks, ids), R.mixed_task_linear(_d(xs), _d(w), oracle_mask(masks), ids),
                         torch.float32, "mixed")
        assert_close_rel(T.mixed_task_linear_grad_input(dys, w, masks, ids),
                         R.mixed_task_linear_grad_input(_d(dys), _d(w), oracle_mask(masks), ids), torch.float32, "mixed dx")


@here
def test_tail_bytes_of_any_value(gen, orientation):
    """Scales and offsets of any sign and magnitude, bytes with the top bit set at every tail
    position: each is reassembled exactly (a sign-extended or misplaced byte breaks the result)."""
    out_f, in_f = 33, 20
    codes = torch.randint(-127, 128, (out_f, in_f), generator=gen, dtype=torch.int8)
    scale = (torch.rand(out_f, 1, generator=gen) - 0.5) * 2.0 ** torch.randint(-20, 4, (out_f, 1), generator=gen)
    offset = (torch.rand(out_f, 1, generator=gen) - 0.5) * 2.0 ** torch.randint(-10, 4, (out_f, 1), generator=gen)
    tail = torch.cat([scale, offset], -1).contiguous().view(torch.int8)
    assert (tail < 0).any(0).all() and (scale < 0).any() and (offset < 0).any()  # a top bit set at each byte
    q = torch.cat([codes, tail], -1)
    x, w = rand((7, in_f), torch.float32, gen), rand((out_f, in_f), torch.float32, gen)
    assert_close_rel(T.masked_linear(x, w, q), R.masked_linear(_d(x), _d(w), oracle_mask(q)), torch.float32, "fwd")
    dy = rand((7, out_f), torch.float32, gen)
    assert_close_rel(T.masked_linear_grad_input(dy, w, q), R.masked_linear_grad_input(_d(dy), _d(w), oracle_mask(q)),
                     torch.float32, "dx")
    assert_scores_close(T.mask_mixture_grad(dy, x, w, q[None], False), dy, x, w, q[None], False, "scores")


@here
def test_outputs_fully_written_and_empty_inputs(gen):
    # Poisoned allocation (SOFTTF_POISON_OUTPUTS): every output element must be written.
    x, dy = rand((2, 3, 67), torch.float16, gen), rand((2, 3, 45), torch.float16, gen)
    w = rand((45, 67), torch.float16, gen)
    q, qs = quantize_mask(soft_mask((45, 67), gen)), quantize_mask(soft_mask((2, 45, 67), gen))
    outs = [T.masked_linear(x, w, q), T.masked_linear_grad_input(dy, w, q), T.mask_mixture_grad(dy, x, w, qs, True),
            T.mixed_task_linear(x, w, qs, torch.tensor([1, 0])), T.mixed_task_linear_grad_input(dy, w, qs, torch.tensor([0, 1]))]
    for out in outs:
        assert not torch.isnan(out).any()
    # in = 0: the mask is its tail alone; y = bias.
    b, empty = torch.randn(3), torch.zeros(3, QMASK_TAIL, dtype=torch.int8)
    assert torch.equal(T.masked_linear(torch.randn(2, 0), torch.randn(3, 0), empty, b), b.expand(2, 3))
    assert torch.equal(T.mask_mixture_grad(torch.randn(2, 3), torch.randn(2, 0), torch.randn(3, 0), empty[None], False),
                       torch.zeros(1))


def test_int8_mask_checks_name_the_argument(gen):
    w, x = rand((9, 30), torch.float32, gen), rand((3, 30), torch.float32, gen)
    q = quantize_mask(soft_mask((9, 30), gen))
    with pytest.raises(ValueError, match=r"mask is an int8 mask, so it must end in \[out, in \+ 8\] = \[9, 38\]"):
        T.masked_linear(x, w, q[:, :30])
    with pytest.raises(ValueError, match=r"masks is an int8 mask, so it must end in \[out, in \+ 8\]"):
        T.mask_mixture_grad(rand((3, 9), torch.float32, gen), x, w, q[None, :, :37], False)
    with pytest.raises(TypeError, match=r"mask must be float32, float16, bfloat16 or int8 \(a quantized mask\), got torch.uint8"):
        T.masked_linear_grad_input(rand((3, 9), torch.float32, gen), w, q.view(torch.uint8))
    with pytest.raises(TypeError, match=r"weight must be float32, float16 or bfloat16, got torch.int8"):
        T.masked_linear(x, q[:, :30], q)  # only masks may be int8


# ----------------------------------------------------------------- through torch.ops + autograd
@here
def test_ops_route_int8_masks_to_triton(gen, monkeypatch):
    calls = []
    for name in ("masked_linear", "masked_linear_grad_input", "mixed_task_linear", "mixed_task_linear_grad_input",
                 "mask_mixture_grad"):
        fn = getattr(host, name)
        monkeypatch.setattr(T, name, lambda *a, _fn=fn, _n=name: calls.append(_n) or _fn(*a), raising=False)
    x, w = rand((2, 5, 37), torch.float32, gen), rand((19, 37), torch.float32, gen)
    q, qs = quantize_mask(soft_mask((19, 37), gen)), quantize_mask(soft_mask((3, 19, 37), gen))
    dy, ids = rand((2, 5, 19), torch.float32, gen), torch.tensor([2, 0])
    with softtf_kernels.use_backend("triton"):
        xr = x.clone().requires_grad_()
        torch.ops.softtf.masked_linear(xr, w, q).backward(dy)
        xm = x.clone().requires_grad_()
        torch.ops.softtf.mixed_task_linear(xm, w, qs, ids).backward(dy)
        scores = torch.ops.softtf.mask_mixture_grad(dy, x, w, qs, True)
    assert calls == ["masked_linear", "masked_linear_grad_input", "mixed_task_linear", "mixed_task_linear_grad_input",
                     "mask_mixture_grad"]
    assert_close_rel(xr.grad, R.masked_linear_grad_input(_d(dy), _d(w), oracle_mask(q)), torch.float32, "dx")
    assert_close_rel(xm.grad, R.mixed_task_linear_grad_input(_d(dy), _d(w), oracle_mask(qs), ids), torch.float32, "mixed dx")
    assert_scores_close(scores, dy, x, w, qs, True, "scores")


@pytest.mark.skipif(RUN_HERE, reason="kernels run in this process under the interpreter")
def test_rerun_in_subprocess():
    rerun_under_interpreter(__file__)
