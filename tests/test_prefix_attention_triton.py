"""The Triton prefix-attention kernels (softtf_kernels/triton/prefix_attention.py) against the float64
reference on CPU, through the Triton interpreter, as tests/test_triton_kernels.py does for the
masked-linear kernels: the kernels are imported with TRITON_INTERPRET=1 before anything else can
load triton; if triton was already loaded for a GPU in this process, the tests skip and one test
reruns this file in a subprocess. Tiny shapes (the interpreter runs tiles in numpy, 16-wide tiles
here), no bf16 (the interpreter has none)."""
import importlib.util
import inspect

from triton_interpreter import load_interpreted_module, rerun_under_interpreter  # noqa: E402

_pmod, RUN_HERE = load_interpreted_module("softtf_kernels.triton.prefix_attention")  # the kernels too, for the interpreter

import pytest  # noqa: E402
import torch  # noqa: E402

import softtf_kernels  # noqa: E402
import softtf_kernels.triton as T  # noqa: E402
from softtf_kernels import reference as R  # noqa: E402

from helpers import rand  # noqa: E402
from test_prefix_attention import ACTS, NAMES, strided, close, inputs, reference_grads, run_op  # noqa: E402

here = pytest.mark.skipif(not RUN_HERE, reason="triton missing, or loaded for a GPU in this process "
                                               "(test_rerun_in_subprocess runs these)")
# (B, H, N, P, D): D not a power of two, N = 1, P = 0, P = 1, tails of the 16-wide tiles in N and P
SHAPES = [(2, 3, 5, 4, 7), (1, 2, 1, 3, 8), (2, 1, 6, 0, 16), (1, 1, 17, 1, 5), (1, 2, 33, 17, 20)]


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("SOFTTF_POISON_OUTPUTS", "1")  # unwritten outputs are NaN and fail


def _check_kernels(args, activation, dtype, gen, scale=None):
    """Forward and backward kernels called directly, against the reference on float64 copies."""
    d = [a.double() for a in args]
    out, lse = T.prefix_attention_forward(*args, activation, scale)
    want_out, want_lse = R.prefix_attention_forward(*d, activation, scale)
    assert out.dtype == dtype and lse.dtype == torch.float32 and out.is_contiguous()
    close(out, want_out, dtype, "out")
    close(lse, want_lse, torch.float32, "lse")
    dy = rand(out.shape, dtype, gen)
    grads = T.prefix_attention_backward(dy, *args, out, lse, activation, scale)
    want = R.prefix_attention_backward(dy.double(), *d, want_out, want_lse, activation, scale)
    for name, g, w, a in zip(NAMES, grads, want, args):
        assert g.dtype == a.dtype and g.shape == a.shape, name
        close(g, w, dtype, f"d{name}", floor=1.0 if name in ("alpha", "tau") else 1e-2)


@here
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("activation", ACTS)
def test_kernels_match_reference_fp32(gen, shape, activation):
    _check_kernels(inputs(gen, shape, torch.float32), activation, torch.float32, gen)


@here
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[4]])
@pytest.mark.parametrize("activation", ["none", "gelu"])
def test_kernels_match_reference_fp16(gen, shape, activation):
    _check_kernels(inputs(gen, shape, torch.float16), activation, torch.float16, gen)


@here
def test_peaked_scores_and_explicit_scale(gen):
    _check_kernels(inputs(gen, (1, 2, 18, 5, 10), torch.float32, low=-3.0, high=3.0), "tanh", torch.float32, gen,
                   scale=0.35)


@here
def test_strided_inputs(gen):
    """Transposed [B, N, H, D] views, a column slice, stride-0 prefixes and grad_out, read through
    their strides."""
    args = strided(inputs(gen, (2, 2, 6, 3, 9), torch.float32))
    _check_kernels(args, "sigmoid", torch.float32, gen)
    out, lse = T.prefix_attention_forward(*args, "sigmoid")
    dy = torch.ones(()).expand(out.shape)
    grads = T.prefix_attention_backward(dy, *args, out, lse, "sigmoid")
    want = R.prefix_attention_backward(dy.double(), *[a.double() for a in args], out.double(), lse.double(), "sigmoid")
    for name, g, w in zip(NAMES, grads, want):
        close(g, w, torch.float32, f"d{name}", floor=1.0)


@here
def test_empty_batch(gen):
    args = inputs(gen, (0, 2, 3, 2, 4), torch.float32)
    out, lse = T.prefix_attention_forward(*args, "gelu")
    assert out.shape == (0, 2, 3, 4) and lse.shape == (0, 2, 3)
    grads = T.prefix_attention_backward(out, *args, out, lse, "gelu")
    assert [g.shape for g in grads] == [a.shape for a in args] and not grads[5].abs().any()


@here
@pytest.mark.parametrize("activation", ["none", "tanh"])
def test_op_and_autograd_route_to_triton(gen, monkeypatch, activation):
    calls = []
    for name in ("prefix_attention_forward", "prefix_attention_backward"):
        fn = getattr(_pmod, name)
        monkeypatch.setattr(T, name, lambda *a, _f=fn, _n=name: calls.append(_n) or _f(*a), raising=False)
    softtf_kernels.set_backend("triton")
    args = inputs(gen, (2, 2, 5, 3, 6), torch.float32)
    dy = rand((2, 2, 5, 6), torch.float32, gen)
    out, grads = run_op(args, activation, dy)
    assert calls == ["prefix_attention_forward", "prefix_attention_backward"]
    want_out, want_grads = reference_grads(args, activation, dy)
    close(out, want_out, torch.float32, "out")
    for name, g, w in zip(NAMES, grads, want_grads):
        close(g, w, torch.float32, f"d{name}", floor=1.0)


@here
def test_fp64_anywhere_routes_forward_and_backward_to_the_reference(gen, monkeypatch):
    monkeypatch.setattr(T, "prefix_attention_forward", None, raising=False)  # would fail if called
    monkeypatch.setattr(T, "prefix_attention_backward", None, raising=False)
    softtf_kernels.set_backend("triton")
    args = inputs(gen, (1, 2, 4, 2, 5), torch.float32, param_dtype=torch.float64)
    dy = rand((1, 2, 4, 5), torch.float32, gen)
    out, grads = run_op(args, "gelu", dy)
    assert grads[5].dtype == torch.float64
    want_out, want_grads = reference_grads(args, "gelu", dy)
    close(out, want_out, torch.float32, "out")
    for name, g, w in zip(NAMES, grads, want_grads):
        close(g, w, torch.float32, f"d{name}", floor=1.0)


@here
def test_refusals_name_the_argument(gen):
    args = inputs(gen, (1, 1, 2, 1, 4), torch.float32)
    with pytest.raises(TypeError, match=r"prefix_attention_forward: q must be float32 or float16 \(the CPU "
                                         r"interpreter has no bfloat16\), got torch.bfloat16"):
        T.prefix_attention_forward(*[a.bfloat16() for a in args[:5]], *args[5:], "none")
    with pytest.raises(TypeError, match=r"tau must be float32 or float16 .* got torch.float64"):
        T.prefix_attention_forward(*args[:6], args[6].double(), "none")
    big = inputs(gen, (1, 1, 2, 1, 257), torch.float32)
    with pytest.raises(ValueError, match=r"head dim D = 257 exceeds the kernel's maximum of 256"):
        T.prefix_attention_forward(*big, "none")


def test_kernels_take_the_op_signatures():
    for name in ("prefix_attention_forward", "prefix_attention_backward"):
        schema = [a.name for a in getattr(torch.ops.softtf, name).default._schema.arguments]
        assert list(inspect.signature(getattr(T, name)).parameters) == schema, name


@pytest.mark.skipif(RUN_HERE or importlib.util.find_spec("triton") is None,
                    reason="kernels run in this process under the interpreter")
def test_rerun_in_subprocess():
    rerun_under_interpreter(__file__)
