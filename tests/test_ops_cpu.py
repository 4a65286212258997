"""The C++ CPU kernels of masked_linear against the float64 oracle, through torch.ops.softtf."""
import pytest
import torch

import softtf_kernels
from softtf_kernels import reference as R

from helpers import assert_close_rel, rand, rand_mask

pytestmark = pytest.mark.skipif(not softtf_kernels.cpp_available(), reason="C++ CPU kernels not built")

# (leading dims of x, in, out): one token, odd sizes, 3-D, ViT-like
SHAPES = [((1,), 16, 8), ((7,), 257, 129), ((2, 5), 67, 45), ((3, 11), 128, 96), ((2, 3, 4), 33, 17)]
DTYPES = [  # (x / weight dtype, mask dtype)
    (torch.float32, torch.float32),
    (torch.float32, torch.bfloat16),
    (torch.float32, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.float16),
    (torch.float64, torch.float64),
]


def _inputs(gen, lead, fin, fout, dt, mdt, bias=True):
    x = rand((*lead, fin), dt, gen)
    w = rand((fout, fin), dt, gen)
    m = rand_mask((fout, fin), mdt, gen)
    b = rand((fout,), dt, gen) if bias else None
    return x, w, m, b


def _d(t):
    return None if t is None else t.double()


@pytest.fixture(autouse=True)
def _cpp():
    softtf_kernels.set_backend("cpp")


@pytest.mark.parametrize("lead,fin,fout", SHAPES)
@pytest.mark.parametrize("dt,mdt", DTYPES)
def test_forward_matches_oracle(gen, lead, fin, fout, dt, mdt):
    x, w, m, b = _inputs(gen, lead, fin, fout, dt, mdt)
    y = torch.ops.softtf.masked_linear(x, w, m, b)
    assert y.dtype == dt and y.shape == (*lead, fout)
    assert_close_rel(y, R.masked_linear(x.double(), w.double(), m.double(), b.double()), dt, "forward")
    y0 = torch.ops.softtf.masked_linear(x, w, m)
    assert_close_rel(y0, R.masked_linear(x.double(), w.double(), m.double()), dt, "forward without bias")


@pytest.mark.parametrize("lead,fin,fout", SHAPES)
@pytest.mark.parametrize("dt,mdt", DTYPES)
def test_backward_kernels_match_oracle(gen, lead, fin, fout, dt, mdt):
    x, w, m, _ = _inputs(gen, lead, fin, fout, dt, mdt, bias=False)
    dy = rand((*lead, fout), dt, gen)
    dx = torch.ops.softtf.masked_linear_grad_input(dy, w, m)
    assert dx.dtype == dt
    assert_close_rel(dx, R.masked_linear_grad_input(dy.double(), w.double(), m.double()), dt, "dx")
    dm = torch.ops.softtf.masked_linear_grad_mask(dy, x, w, mdt)
    assert dm.dtype == mdt and dm.shape == w.shape
    ref = R.masked_linear_grad_mask(dy.double(), x.double(), w.double(), torch.float64)
    assert_close_rel(dm, ref, mdt if mdt != torch.float32 else dt, "dM")


def test_large_panels_cover_every_row_and_column(gen):
    # out and in large enough to need several panels, with ragged last panels
    x, w, m, b = _inputs(gen, (9,), 1000, 700, torch.float32, torch.float32)
    assert_close_rel(torch.ops.softtf.masked_linear(x, w, m, b), R.masked_linear(*map(_d, (x, w, m, b))),
                     torch.float32, "forward")
    dy = rand((9, 700), torch.float32, gen)
    assert_close_rel(torch.ops.softtf.masked_linear_grad_input(dy, w, m),
                     R.masked_linear_grad_input(dy.double(), w.double(), m.double()), torch.float32, "dx")
    assert_close_rel(torch.ops.softtf.masked_linear_grad_mask(dy, x, w, torch.float32),
                     R.masked_linear_grad_mask(dy.double(), x.double(), w.double(), torch.float64),
                     torch.float32, "dM")


@pytest.mark.parametrize("view", ["transposed", "sliced", "expanded"])
def test_non_contiguous_x(gen, view):
    w = rand((45, 67), torch.float32, gen)
    m = rand_mask((45, 67), torch.float32, gen)
    if view == "transposed":
        x = rand((67, 3, 5), torch.float32, gen).permute(1, 2, 0)
    elif view == "sliced":
        x = rand((4, 9, 140), torch.float32, gen)[:, ::2, 3:70]
    else:
        x = rand((1, 67), torch.float32, gen).expand(6, 67)
    assert not x.is_contiguous()
    y = torch.ops.softtf.masked_linear(x, w, m)
    assert_close_rel(y, R.masked_linear(x.double(), w.double(), m.double()), torch.float32, view)
    dy = rand(y.shape, torch.float32, gen).transpose(-1, -2).contiguous().transpose(-1, -2) if y.dim() == 2 else rand(y.shape, torch.float32, gen)
    assert_close_rel(torch.ops.softtf.masked_linear_grad_mask(dy, x, w, torch.float32),
                     R.masked_linear_grad_mask(dy.double(), x.double(), w.double(), torch.float64), torch.float32, view)


@pytest.mark.parametrize("tokens", [3, 40])  # 3: the few-token path (raw pointers); 40: GEMM panels
def test_strided_bias(gen, tokens):
    x, w, m, _ = _inputs(gen, (tokens,), 16, 8, torch.float32, torch.float32, bias=False)
    b = rand((16,), torch.float32, gen)[::2]
    assert not b.is_contiguous()
    assert_close_rel(torch.ops.softtf.masked_linear(x, w, m, b), R.masked_linear(*map(_d, (x, w, m, b))),
                     torch.float32, "strided bias")


def test_zero_tokens(gen):
    w, m = rand((5, 4), torch.float32, gen), rand_mask((5, 4), torch.float32, gen)
    x = torch.empty(0, 4)
    assert torch.ops.softtf.masked_linear(x, w, m).shape == (0, 5)
    dm = torch.ops.softtf.masked_linear_grad_mask(torch.empty(0, 5), x, w, torch.float32)
    assert torch.equal(dm, torch.zeros(5, 4))


def test_masked_entries_have_no_effect(gen):
    x, w, m, b = _inputs(gen, (4,), 20, 10, torch.float32, torch.float32)
    m[:, 5] = 0
    x2 = x.clone()
    x2[:, 5] = 1e6
    torch.testing.assert_close(torch.ops.softtf.masked_linear(x2, w, m, b), torch.ops.softtf.masked_linear(x, w, m, b))


@pytest.mark.parametrize("dt,mdt", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)])
def test_autograd_matches_oracle(gen, dt, mdt):
    x, w, m, b = _inputs(gen, (2, 7), 67, 45, dt, mdt)
    x.requires_grad_()
    m.requires_grad_()
    b.requires_grad_()
    y = torch.ops.softtf.masked_linear(x, w, m, b)
    dy = rand(y.shape, dt, gen)
    dx, dm, db = torch.autograd.grad(y, (x, m, b), dy)
    xr, mr, br = (t.detach().double().requires_grad_() for t in (x, m, b))
    yr = torch.nn.functional.linear(xr, w.double() * mr, br)
    rx, rm, rb = torch.autograd.grad(yr, (xr, mr, br), dy.double())
    assert dx.dtype == dt and dm.dtype == mdt and db.dtype == dt
    assert_close_rel(dx, rx, dt, "dx")
    assert_close_rel(dm, rm, mdt if mdt != torch.float32 else dt, "dM")
    assert_close_rel(db, rb, dt, "db")


def test_gradcheck_float64(gen):
    x = rand((3, 2, 6), torch.float64, gen).requires_grad_()
    w = rand((5, 6), torch.float64, gen).requires_grad_()
    m = rand_mask((5, 6), torch.float64, gen).requires_grad_()
    b = rand((5,), torch.float64, gen).requires_grad_()
    assert torch.autograd.gradcheck(torch.ops.softtf.masked_linear, (x, w, m, b))


def test_only_needed_gradients_are_computed(gen, monkeypatch):
    calls = []
    for name in ("masked_linear_grad_input", "masked_linear_grad_mask"):
        real = getattr(torch.ops.softtf, f"_cpp_{name}")
        monkeypatch.setattr(torch.ops.softtf, f"_cpp_{name}", lambda *a, _r=real, _n=name: (calls.append(_n), _r(*a))[1])
    x, w, m, b = _inputs(gen, (3,), 8, 4, torch.float32, torch.float32)
    m.requires_grad_()
    torch.ops.softtf.masked_linear(x, w, m, b).sum().backward()
    assert calls == ["masked_linear_grad_mask"]
    calls.clear()
    x.requires_grad_()
    m.requires_grad_(False)
    torch.ops.softtf.masked_linear(x, w, m, b).sum().backward()
    assert calls == ["masked_linear_grad_input"]


@pytest.mark.parametrize("dt", [torch.float32, torch.float64])
def test_opcheck(gen, dt):
    x, w, m, b = _inputs(gen, (2, 3), 10, 6, dt, dt)
    for args in [(x, w, m, b), (x.requires_grad_(), w, m.requires_grad_(), b.requires_grad_()), (x, w, m, None)]:
        torch.library.opcheck(torch.ops.softtf.masked_linear.default, args)
    dy = rand((2, 3, 6), dt, gen)
    torch.library.opcheck(torch.ops.softtf.masked_linear_grad_input.default, (dy, w.detach(), m.detach()))
    torch.library.opcheck(torch.ops.softtf.masked_linear_grad_mask.default, (dy, x.detach(), w.detach(), dt))


def test_torch_compile_fullgraph_no_graph_breaks(gen):
    import softtf

    layer = softtf.SoftLinear(torch.nn.Linear(12, 7))
    layer.add_task("t0", init=("uniform", 0.5, 1.5))
    model = torch.nn.Sequential(torch.nn.Linear(5, 12), torch.nn.GELU(), layer)
    x = rand((4, 5), torch.float32, gen)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    torch.testing.assert_close(out, eager)
    out.sum().backward()
    assert layer.masks["t0"].grad is not None
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0


# ---------------------------------------------------------------- bad input
def _good(gen):
    return _inputs(gen, (3,), 8, 4, torch.float32, torch.float32)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_bad_inputs_raise_clear_errors(gen, backend):
    softtf_kernels.set_backend(backend)
    x, w, m, b = _good(gen)
    op = torch.ops.softtf.masked_linear
    with pytest.raises(ValueError, match=r"x must have last dim 8"):
        op(rand((3, 9), torch.float32, gen), w, m, b)
    with pytest.raises(ValueError, match=r"mask must have weight's shape \(4, 8\), got \(8, 4\)"):
        op(x, w, m.t().contiguous(), b)
    with pytest.raises(TypeError, match=r"x dtype torch.bfloat16 must equal weight dtype torch.float32"):
        op(x.bfloat16(), w, m, b)
    with pytest.raises(ValueError, match=r"bias must have shape \[4\], got \(5,\)"):
        op(x, w, m, rand((5,), torch.float32, gen))
    with pytest.raises(TypeError, match=r"bias dtype torch.float64 must equal x dtype torch.float32"):
        op(x, w, m, b.double())
    with pytest.raises(TypeError, match=r"mask must be float32, bfloat16, float16, float64 or int8 \(a quantized mask\), got torch.int64"):
        op(x, w, m.long(), b)
    with pytest.raises(ValueError, match=r"weight must be 2-D"):
        op(x, w.reshape(4, 8, 1), m, b)
    with pytest.raises(TypeError, match=r"mask_dtype must be float32"):
        torch.ops.softtf.masked_linear_grad_mask(rand((3, 4), torch.float32, gen), x, w, torch.int32)
    with pytest.raises(ValueError, match=r"grad_out and x must have the same leading dims"):
        torch.ops.softtf.masked_linear_grad_mask(rand((2, 4), torch.float32, gen), x, w, torch.float32)


def test_cpp_kernel_checks_its_own_arguments(gen):
    # Called directly (bypassing the Python validation), the C++ kernel still refuses bad input.
    x, w, m, b = _good(gen)
    with pytest.raises(RuntimeError, match=r"mask must have weight's shape"):
        torch.ops.softtf._cpp_masked_linear(x, w, m[:2], b)
    with pytest.raises(RuntimeError, match=r"x dtype .* must equal weight dtype"):
        torch.ops.softtf._cpp_masked_linear(x.double(), w, m, b)
    with pytest.raises(RuntimeError, match=r"x must have last dim 8 \(weight.shape\[1\]\)"):
        torch.ops.softtf._cpp_masked_linear(x[:, :5], w, m, b)
    masks, ids = torch.stack([m, m]), torch.tensor([0, 1, 1])
    with pytest.raises(RuntimeError, match=r"task_ids must be an int64 or int32 tensor, got Float"):
        torch.ops.softtf._cpp_mixed_task_linear(x, w, masks, ids.float(), b)
    with pytest.raises(RuntimeError, match=r"task_ids must lie in \[0, 2\), got 2 at sample 2"):
        torch.ops.softtf._cpp_mixed_task_linear(x, w, masks, torch.tensor([0, 1, 2]), b)
    with pytest.raises(RuntimeError, match=r"masks must hold at least one task"):
        torch.ops.softtf._cpp_mask_mixture_grad(rand((3, 4), torch.float32, gen), x, w, masks[:0], False)


def test_backend_switch_and_errors(gen):
    x, w, m, b = _good(gen)
    softtf_kernels.set_backend("reference")
    y_ref = torch.ops.softtf.masked_linear(x, w, m, b)
    softtf_kernels.set_backend("cpp")
    torch.testing.assert_close(torch.ops.softtf.masked_linear(x, w, m, b), y_ref)
    with softtf_kernels.use_backend("cuda"):
        with pytest.raises(RuntimeError, match=r"backend 'cuda' runs CUDA tensors only"):
            torch.ops.softtf.masked_linear(x, w, m, b)
    assert softtf_kernels.get_backend() == "cpp"
    with pytest.raises(ValueError, match=r"backend must be one of auto, cpp, cuda, triton, reference"):
        softtf_kernels.set_backend("fast")
