"""softtf.prefix_attention (NoRGa's gated prefix attention; DualPrompt's with "none"): the float64
reference against an independent plain formula and finite differences, the CPU path (ATen flash
attention + the prefix part, merged by log-sum-exp) against the reference in every dtype, strides,
odd sizes, argument errors, opcheck and torch.compile. The Triton kernels: test_prefix_attention_triton.py."""
import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import softtf_kernels
from softtf_kernels import backend, cpu_attention, ops
from softtf_kernels import reference as R

from helpers import rand

ACTS = ["none", "sigmoid", "tanh", "gelu"]
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}
# (B, H, N, P, D): D not a power of two, N = 1, P = 0, P = 1, more tokens than prefix and the reverse
SHAPES = [(2, 3, 5, 4, 7), (1, 2, 1, 3, 8), (2, 2, 6, 0, 5), (1, 1, 9, 1, 3), (2, 2, 20, 33, 12)]
NAMES = ("q", "k", "v", "prefix_k", "prefix_v", "alpha", "tau")


def close(got, want, dtype, what, floor=1e-2):
    """max |got - want| <= tol(dtype) * max(max |want|, floor). The floor keeps results that are
    ~0 by symmetry (N = 1, P = 0: dq = dk = 0) from demanding an absolute error of 0."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    if want.numel() == 0:
        return
    scale = max(want.double().abs().max().item(), floor)
    err = (got.double() - want.double()).abs().max().item() / scale
    assert err <= TOL[dtype], f"{what}: error {err:.2e} relative to {scale:.2e} > {TOL[dtype]:.0e}"


def inputs(gen, shape, dtype, param_dtype=torch.float32, low=-1.0, high=1.0):
    b, h, n, p, d = shape
    q, k, v = (rand((b, h, n, d), dtype, gen, low, high) for _ in range(3))
    pk, pv = (rand((b, h, p, d), dtype, gen, low, high) for _ in range(2))
    alpha = rand((), param_dtype, gen, 0.3, 1.5)
    tau = rand((), param_dtype, gen, 0.5, 2.0)
    return [q, k, v, pk, pv, alpha, tau]


def naive(q, k, v, pk, pv, alpha, tau, activation, scale=None):
    """The definition, written independently of the package (torch's own activations)."""
    sc = q.shape[-1] ** -0.5 if scale is None else scale
    s_p = sc * q @ pk.transpose(-1, -2)
    act = {"none": None, "sigmoid": torch.sigmoid, "tanh": torch.tanh, "gelu": F.gelu}[activation]
    if act is not None:
        s_p = s_p + alpha * act(tau * s_p)
    s = torch.cat([s_p, sc * q @ k.transpose(-1, -2)], -1)
    return torch.softmax(s, -1) @ torch.cat([pv, v], -2)


def run_op(args, activation, grad_out, scale=None, which=range(7)):
    """out and the gradients of the inputs in ``which`` through torch.ops.softtf.prefix_attention."""
    leaves = [a.detach().clone().requires_grad_(i in which) for i, a in enumerate(args)]
    out = torch.ops.softtf.prefix_attention(*leaves, activation, scale)
    out.backward(grad_out)
    return out, [leaves[i].grad for i in range(7)]


def reference_grads(args, activation, grad_out, scale=None):
    d = [a.detach().double().requires_grad_() for a in args]
    out = naive(*d, activation, scale)
    return out.detach(), list(torch.autograd.grad(out, d, grad_out.double(), allow_unused=True, materialize_grads=True))


# ---------------------------------------------------------------- the reference itself
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("activation", ACTS)
def test_reference_equals_the_definition_and_its_autograd(gen, shape, activation):
    args = [a.double() for a in inputs(gen, shape, torch.float64)]
    out, lse = R.prefix_attention_forward(*args, activation)
    want_out, want_grads = reference_grads(args, activation, dy := rand(out.shape, torch.float64, gen))
    close(out, want_out, torch.float64, "out")
    grads = R.prefix_attention_backward(dy, *args, out, lse, activation)
    for name, g, w in zip(NAMES, grads, want_grads):
        close(g, w, torch.float64, f"d{name}")
    sc = shape[-1] ** -0.5
    s = torch.cat([sc * args[0] @ args[3].transpose(-1, -2), sc * args[0] @ args[1].transpose(-1, -2)], -1)
    if activation == "none":
        close(lse, torch.logsumexp(s, -1), torch.float64, "lse")


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("impl", ["reference", "cpp"])
def test_gradcheck_float64(gen, activation, impl):
    """Finite differences of all seven inputs, through the op, on the reference and the CPU path."""
    softtf_kernels.set_backend(impl)
    for shape in [(1, 2, 3, 2, 3), (2, 1, 2, 0, 2)]:
        args = [a.double().requires_grad_() for a in inputs(gen, shape, torch.float64)]
        fn = lambda *a: torch.ops.softtf.prefix_attention(*a, activation, 0.8)  # noqa: E731
        assert torch.autograd.gradcheck(fn, tuple(args), eps=1e-6, atol=1e-7)


# ---------------------------------------------------------------- the CPU path
@pytest.fixture
def cpu_path(monkeypatch):
    """Backend cpp, with a record of the CPU-path calls (so a test knows the path really ran)."""
    calls = []
    for name in cpu_attention.__all__:
        fn = getattr(cpu_attention, name)
        monkeypatch.setattr(cpu_attention, name, lambda *a, _f=fn, _n=name: calls.append(_n) or _f(*a))
    softtf_kernels.set_backend("cpp")
    return calls


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_cpu_path_matches_reference(gen, cpu_path, shape, activation, dtype):
    args = inputs(gen, shape, dtype)
    dy = rand(shape[:3] + shape[4:], dtype, gen)
    out, grads = run_op(args, activation, dy)
    assert cpu_path == ["prefix_attention_forward", "prefix_attention_backward"]
    want_out, want_grads = reference_grads(args, activation, dy)
    assert out.dtype == dtype and all(g.dtype == a.dtype for g, a in zip(grads, args))
    close(out, want_out, dtype, "out")
    _, lse = ops.prefix_attention_forward(*args, activation)
    close(lse, R.prefix_attention_forward(*[a.double() for a in args], activation)[1], torch.float32, "lse")
    for name, g, w in zip(NAMES, grads, want_grads):
        tol_dtype = max(dtype, g.dtype, key=TOL.get)  # alpha / tau stay float32 with float64 q
        close(g, w, tol_dtype, f"d{name}", floor=1.0 if name in ("alpha", "tau") else 1e-2)


@pytest.mark.parametrize("activation", ["none", "tanh"])
def test_peaked_scores_and_explicit_scale(gen, cpu_path, activation):
    # Scores up to ~±30: the log-sum-exp merge must not overflow; explicit scale.
    args = inputs(gen, (2, 2, 7, 3, 10), torch.float32, low=-3.0, high=3.0)
    dy = rand((2, 2, 7, 10), torch.float32, gen)
    out, grads = run_op(args, activation, dy, scale=0.35)
    want_out, want_grads = reference_grads(args, activation, dy, scale=0.35)
    close(out, want_out, torch.float32, "out")
    for name, g, w in zip(NAMES, grads, want_grads):
        close(g, w, torch.float32, f"d{name}", floor=1.0)


def strided(args):
    """The same values in other layouts: q/k/v as views of a [B, N, H, D] (qkv-projection) storage,
    the prefix as a stride-0 expansion over the batch (one prompt for the whole batch), v sliced."""
    q, k, v, pk, pv, alpha, tau = args
    t = lambda x: x.transpose(1, 2).contiguous().transpose(1, 2)  # noqa: E731
    wide = torch.zeros((*v.shape[:-1], v.shape[-1] * 2), dtype=v.dtype)
    wide[..., ::2] = v
    pk = pk[:1].expand_as(pk)
    pv = pv[:1].expand_as(pv)
    return [t(q), t(k), wide[..., ::2], pk, pv, alpha, tau]


@pytest.mark.parametrize("impl", ["cpp", "reference"])
def test_non_contiguous_inputs_and_grad_out(gen, impl):
    softtf_kernels.set_backend(impl)
    args = strided(inputs(gen, (3, 2, 6, 4, 9), torch.float32))
    assert not any(a.is_contiguous() for a in args[:5])
    for dy in (rand((3, 2, 6, 9), torch.float32, gen).transpose(0, 1).contiguous().transpose(0, 1),
               torch.ones(()).expand(3, 2, 6, 9)):  # stride 0, as from out.sum().backward()
        out, grads = run_op(args, "sigmoid", dy)
        want_out, want_grads = reference_grads([a.contiguous() for a in args], "sigmoid", dy.contiguous())
        close(out, want_out, torch.float32, "out")
        for name, g, w in zip(NAMES, grads, want_grads):
            close(g, w, torch.float32, f"d{name}", floor=1.0)


def test_partial_gradients_and_parameter_dtypes(gen, cpu_path):
    # alpha / tau in another dtype than q: their gradients come back in their own dtype.
    args = inputs(gen, (2, 2, 5, 3, 6), torch.float32, param_dtype=torch.bfloat16)
    dy = rand((2, 2, 5, 6), torch.float32, gen)
    _, grads = run_op(args, "gelu", dy, which=(5, 6))
    assert grads[:5] == [None] * 5 and grads[5].dtype == grads[6].dtype == torch.bfloat16
    _, want = reference_grads(args, "gelu", dy)
    close(grads[5], want[5], torch.bfloat16, "dalpha", floor=1.0)
    _, grads = run_op(args, "none", dy, which=(0, 5))
    assert torch.equal(grads[5], torch.zeros((), dtype=torch.bfloat16))  # no gate, no alpha gradient


@pytest.mark.parametrize("impl", ["cpp", "reference"])
def test_empty_batch_or_heads(gen, impl):
    softtf_kernels.set_backend(impl)
    for shape in [(0, 2, 3, 2, 4), (2, 0, 3, 2, 4)]:
        args = inputs(gen, shape, torch.float32)
        out, grads = run_op(args, "tanh", torch.zeros(shape[:3] + shape[4:]))
        assert out.shape == shape[:3] + shape[4:]
        assert all(g.shape == a.shape and not g.abs().any() for g, a in zip(grads, args))


# ---------------------------------------------------------------- errors
def test_bad_arguments_name_what_was_expected(gen):
    q, k, v, pk, pv, alpha, tau = inputs(gen, (2, 3, 5, 4, 6), torch.float32)
    op = torch.ops.softtf.prefix_attention
    cases = [
        (ValueError, r"q must be 4-D \[B, H, N, D\], got shape \(3, 5, 6\)", (q[0], k, v, pk, pv, alpha, tau, "none")),
        (ValueError, r"q must hold at least one token \(N >= 1\)", (q[:, :, :0], k[:, :, :0], v[:, :, :0], pk, pv,
                                                                     alpha, tau, "none")),
        (ValueError, r"k must have q's shape \[B, H, N, D\] = \(2, 3, 5, 6\), got \(2, 3, 4, 6\)",
         (q, k[:, :, :4], v, pk, pv, alpha, tau, "none")),
        (ValueError, r"prefix_k must have shape \[B, H, P, D\] = \[2, 3, P, 6\] .* got \(2, 3, 4, 5\)",
         (q, k, v, pk[..., :5], pv, alpha, tau, "none")),
        (ValueError, r"prefix_v must have prefix_k's shape \(2, 3, 4, 6\), got \(2, 3, 3, 6\)",
         (q, k, v, pk, pv[:, :, :3], alpha, tau, "none")),
        (TypeError, r"v dtype torch.float16 must equal q dtype torch.float32", (q, k, v.half(), pk, pv, alpha, tau,
                                                                                "none")),
        (TypeError, r"prefix_k must be float32, bfloat16, float16 or float64, got torch.int64",
         (q, k, v, pk.long(), pv, alpha, tau, "none")),
        (ValueError, r"alpha must be a 0-dim tensor .* got shape \(1,\)", (q, k, v, pk, pv, alpha[None], tau, "tanh")),
        (ValueError, r"tau must be a 0-dim tensor", (q, k, v, pk, pv, alpha, tau.expand(3), "tanh")),
        (ValueError, r"activation must be one of none, sigmoid, tanh, gelu; got 'relu'",
         (q, k, v, pk, pv, alpha, tau, "relu")),
        (ValueError, r"prefix_v is on meta but q is on cpu", (q, k, v, pk, pv.to("meta"), alpha, tau, "none")),
        (ValueError, r"scale must be a finite float", (q, k, v, pk, pv, alpha, tau, "none", float("nan"))),
    ]
    for impl in ("cpp", "reference"):
        softtf_kernels.set_backend(impl)
        for exc, msg, args in cases:
            with pytest.raises(exc, match=r"softtf.prefix_attention: " + msg):
                op(*args)
    out, lse = ops.prefix_attention_forward(q, k, v, pk, pv, alpha, tau, "none")
    with pytest.raises(TypeError, match=r"prefix_attention_backward: lse must be torch.float32 .* got torch.float16"):
        ops.prefix_attention_backward(out, q, k, v, pk, pv, alpha, tau, out, lse.half(), "none")
    with pytest.raises(ValueError, match=r"prefix_attention_backward: lse must have shape \[B, H, N\] = \(2, 3, 5\)"):
        ops.prefix_attention_backward(out, q, k, v, pk, pv, alpha, tau, out, lse[..., :4], "none")
    with pytest.raises(ValueError, match=r"prefix_attention_backward: grad_out must have q's shape"):
        ops.prefix_attention_backward(out[:1], q, k, v, pk, pv, alpha, tau, out, lse, "none")


# ---------------------------------------------------------------- torch.library / torch.compile
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(gen, dtype):
    softtf_kernels.set_backend("cpp")
    args = inputs(gen, (2, 2, 4, 3, 5), dtype, param_dtype=dtype)
    fwd = torch.ops.softtf.prefix_attention_forward.default
    torch.library.opcheck(fwd, (*args, "sigmoid"))
    torch.library.opcheck(fwd, (*[a.requires_grad_() for a in args], "gelu", 0.5))
    torch.library.opcheck(torch.ops.softtf.prefix_attention.default, (*args, "tanh"))
    detached = [a.detach() for a in args]
    out, lse = fwd(*detached, "tanh")
    torch.library.opcheck(torch.ops.softtf.prefix_attention_backward.default,
                          (rand(out.shape, dtype, gen), *detached, out, lse, "tanh", None))


class _NoRGaBlock(torch.nn.Module):
    def __init__(self, dim=16, heads=2, prefix=3, activation="sigmoid"):
        super().__init__()
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.prefix = torch.nn.Parameter(torch.randn(2, prefix, dim) * 0.5)
        self.alpha = torch.nn.Parameter(torch.ones(()))
        self.tau = torch.nn.Parameter(torch.ones(()))
        self.heads, self.activation = heads, activation

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        pk, pv = self.prefix.reshape(2, 1, -1, self.heads, c // self.heads).permute(0, 1, 3, 2, 4).expand(
            2, b, self.heads, -1, c // self.heads)
        return ops.prefix_attention(q, k, v, pk, pv, self.alpha, self.tau, self.activation).sum()


def test_torch_compile_fullgraph_no_graph_breaks(gen):
    softtf_kernels.set_backend("cpp")
    block = _NoRGaBlock()
    x = rand((3, 5, 16), torch.float32, gen)
    eager = block(x)
    eager.backward()
    want = {n: p.grad.clone() for n, p in block.named_parameters()}
    block.zero_grad()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    torch.testing.assert_close(out, eager)
    out.backward()
    for n, p in block.named_parameters():
        torch.testing.assert_close(p.grad, want[n], msg=n)
    assert torch._dynamo.explain(block)(x).graph_break_count == 0


def test_fake_cuda_tensors_trace_without_a_gpu():
    with FakeTensorMode():
        q, k, v = (torch.empty(2, 3, 5, 8, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        pk, pv = (torch.empty(2, 3, 4, 8, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        alpha, tau = torch.ones((), device="cuda"), torch.ones((), device="cuda")
        out = torch.ops.softtf.prefix_attention(q, k, v, pk, pv, alpha, tau, "sigmoid")
        assert (out.shape, out.device.type, out.dtype) == ((2, 3, 5, 8), "cuda", torch.bfloat16)
        out, lse = torch.ops.softtf.prefix_attention_forward(q, k, v, pk, pv, alpha, tau, "sigmoid")
        assert (lse.shape, lse.dtype) == ((2, 3, 5), torch.float32)
        grads = torch.ops.softtf.prefix_attention_backward(out, q, k, v, pk, pv, alpha, tau, out, lse, "sigmoid")
        assert [(g.shape, g.dtype) for g in grads] == [(a.shape, a.dtype) for a in (q, k, v, pk, pv, alpha, tau)]
        with pytest.raises(ValueError, match=r"prefix_k is on cpu but q is on cuda"):
            torch.ops.softtf.prefix_attention(q, k, v, torch.empty(2, 3, 4, 8, dtype=torch.bfloat16), pv, alpha, tau,
                                              "none")


def test_backend_resolution_of_the_call(gen):
    args = inputs(gen, (1, 1, 2, 1, 4), torch.float32)
    softtf_kernels.set_backend("auto")
    dtypes = tuple(a.dtype for a in args)
    assert backend.resolve("prefix_attention_forward", torch.device("cpu"), dtypes)[0] == "cpp"
    with softtf_kernels.use_backend("cuda"):
        with pytest.raises(RuntimeError, match=r"backend 'cuda' runs CUDA tensors only"):
            ops.prefix_attention(*args, "none")
