"""softtf.routed_lora (SAPT's weighted sum of T LoRA blocks, one rank-(T·r) LoRA): the C++ kernel and
the reference against an independent float64 einsum, forward and backward, in every dtype, odd
sizes, non-contiguous arguments, zero-size dims; one-hot routing is one LoRA block; T = 1 is PEFT's
LoRA; gradcheck, opcheck, torch.compile; argument errors. The Triton kernels:
test_routed_lora_triton.py."""
import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import softtf_kernels
from softtf_kernels import ops
from softtf_kernels import reference as R

from helpers import assert_close_rel, rand

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
GRADS = ("x", "lora_a", "lora_b", "weights")


def inputs(gen, lead, fin, fout, n_tasks, rank, dt, wdt=None):
    x = rand((*lead, fin), dt, gen)
    a = rand((n_tasks, rank, fin), dt, gen)
    b = rand((n_tasks, fout, rank), dt, gen)
    w = torch.softmax(rand((lead[0], n_tasks), torch.float64, gen, -2, 2), -1).to(wdt or dt)
    return x, a, b, w


def _einsum(x, a, b, w, s):
    xs = x.reshape(x.shape[0], math.prod(x.shape[1:-1]), x.shape[-1])
    return (s * torch.einsum("bni,tri,tor,bt->bno", xs, a, b, w)).reshape(*x.shape[:-1], b.shape[1])


def oracle(x, a, b, w, s):
    """y = Σ_t w_bt s x A_tᵀ B_tᵀ in float64 by one einsum (independent of the reference's loop)."""
    return _einsum(*(t.detach().double() for t in (x, a, b, w)), s)


def oracle_grads(x, a, b, w, s, dy):
    leaves = [t.detach().double().requires_grad_() for t in (x, a, b, w)]
    return torch.autograd.grad(_einsum(*leaves, s), leaves, dy.double(), allow_unused=True)


def strided(t, kind):
    """The same values in another layout: transposed storage, a step, or a storage offset."""
    if kind == "t" and t.dim() >= 2:
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    if kind == "step":
        big = torch.empty((*t.shape[:-1], 2 * t.shape[-1]), dtype=t.dtype, device=t.device)
        big[..., ::2] = t
        return big[..., ::2]
    if kind == "offset":
        buf = torch.empty(t.numel() + 3, dtype=t.dtype, device=t.device)
        v = buf[3:].view(t.shape)
        v.copy_(t)
        return v
    return t


def run(backend, x, a, b, w, s, dy):
    leaves = [t.detach().clone().requires_grad_() for t in (x, a, b, w)]
    with softtf_kernels.use_backend(backend):
        y = torch.ops.softtf.routed_lora(*leaves, s)
        y.backward(dy)
    return y, [t.grad for t in leaves]


# ---------------------------------------------------------------- forward / backward vs float64
@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("lead,fin,fout,n_tasks,rank", [((3, 5), 13, 11, 3, 5), ((2, 3, 4), 7, 9, 5, 1),
                                                         ((1, 1), 33, 17, 1, 3), ((4, 37), 20, 6, 7, 4)])
def test_matches_float64_forward_and_backward(gen, backend, dt, lead, fin, fout, n_tasks, rank):
    x, a, b, w = inputs(gen, lead, fin, fout, n_tasks, rank, dt)
    s = 2.5
    dy = rand((*lead, fout), dt, gen)
    y, grads = run(backend, x, a, b, w, s, dy)
    assert y.dtype == dt and y.shape == (*lead, fout)
    assert_close_rel(y, oracle(x, a, b, w, s), dt, f"{backend} y")
    for name, g, want, arg in zip(GRADS, grads, oracle_grads(x, a, b, w, s, dy), (x, a, b, w)):
        assert g.dtype == arg.dtype and g.shape == arg.shape, name
        assert_close_rel(g, want, dt, f"{backend} d{name}")


@pytest.mark.parametrize("layout", ["t", "step", "offset"])
def test_any_strides(gen, layout):
    x, a, b, w = inputs(gen, (4, 6), 10, 7, 3, 2, torch.float32, torch.float16)
    dy = rand((4, 6, 7), torch.float32, gen)
    want_y, want_g = run("reference", x, a, b, w, 0.75, dy)
    args = [strided(t, layout) for t in (x, a, b, w)]
    assert not all(t.is_contiguous() and t.storage_offset() == 0 for t in args)
    got_y, got_g = run("cpp", *args, 0.75, strided(dy, layout))
    assert_close_rel(got_y, want_y.double(), torch.float32, "y")
    for name, g, want in zip(GRADS, got_g, want_g):
        assert_close_rel(g, want.double(), want.dtype, name)
    # permuted B storage and an expanded (stride-0) weights row
    b_perm = b.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    w_exp = w[:1].expand(4, 3)
    y = ops.routed_lora(x, a, b_perm, w_exp, 0.75)
    assert_close_rel(y, oracle(x, a, b, w_exp, 0.75), torch.float32, "permuted B, expanded weights")


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_backward_op_direct_with_mixed_weight_dtype(gen, backend):
    x, a, b, w = inputs(gen, (3, 4), 9, 5, 2, 3, torch.bfloat16, torch.float32)
    dy = rand((3, 4, 5), torch.bfloat16, gen)
    with softtf_kernels.use_backend(backend):
        grads = ops.routed_lora_backward(dy, x, a, b, w, -1.5)
    for name, g, want, arg in zip(GRADS, grads, oracle_grads(x, a, b, w, -1.5, dy), (x, a, b, w)):
        assert g.dtype == arg.dtype, name
        assert_close_rel(g, want, torch.bfloat16, name)


def test_reference_equals_independent_oracle(gen):
    x, a, b, w = inputs(gen, (3, 5), 8, 6, 4, 3, torch.float64)
    dy = rand((3, 5, 6), torch.float64, gen)
    assert_close_rel(R.routed_lora(x, a, b, w, 1.25), oracle(x, a, b, w, 1.25), torch.float64, "y")
    for name, g, want in zip(GRADS, R.routed_lora_backward(dy, x, a, b, w, 1.25), oracle_grads(x, a, b, w, 1.25, dy)):
        assert_close_rel(g, want, torch.float64, name)


# ---------------------------------------------------------------- meaning
@pytest.mark.parametrize("dt", [torch.float32, torch.float64])
def test_one_hot_weights_are_one_lora_block(gen, dt):
    x, a, b, _ = inputs(gen, (4, 3), 12, 10, 5, 3, dt)
    picks = torch.tensor([2, 0, 4, 2])
    w = torch.nn.functional.one_hot(picks, 5).to(dt)
    y = ops.routed_lora(x, a, b, w, 4.0)
    for i, t in enumerate(picks.tolist()):
        want = 4.0 * (x[i].double() @ a[t].double().T) @ b[t].double().T
        assert_close_rel(y[i], want, dt, f"sample {i} task {t}")


def test_single_task_equals_peft_lora(gen):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    fin, fout, rank, alpha = 16, 12, 4, 32
    model = torch.nn.Sequential(torch.nn.Linear(fin, fout))
    cfg = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=["0"])
    lora_model = peft.get_peft_model(model, cfg)
    layer = lora_model.base_model.model[0]
    torch.nn.init.normal_(layer.lora_B["default"].weight)  # B starts at zero in PEFT
    x = rand((3, 5, fin), torch.float32, gen)
    with torch.no_grad():
        want = lora_model(x) - layer.base_layer(x)
        a = layer.lora_A["default"].weight[None]  # [1, r, in]
        b = layer.lora_B["default"].weight[None]  # [1, out, r]
        scaling = layer.scaling["default"]
        assert scaling == alpha / rank
        got = ops.routed_lora(x, a, b, torch.ones(3, 1), scaling)
    assert_close_rel(got, want, torch.float32, "T = 1 vs PEFT")


# ---------------------------------------------------------------- zero sizes
@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("lead,fin,fout,n_tasks,rank", [((0, 3), 5, 4, 2, 2), ((2, 0), 5, 4, 2, 2),
                                                         ((2, 3), 5, 4, 1, 1), ((2, 3), 5, 4, 3, 0),
                                                         ((2, 3), 0, 4, 2, 2), ((2, 3), 5, 0, 2, 2),
                                                         ((0,), 5, 4, 2, 2)])
def test_zero_size_dims(gen, backend, lead, fin, fout, n_tasks, rank):
    x, a, b, w = inputs(gen, (*lead,) if len(lead) > 1 else (lead[0], 1), fin, fout, n_tasks, rank,
                        torch.float32)
    if len(lead) == 1:
        x = x[:, 0]  # x [0, in]: B = 0, no per-sample dims
    dy = rand((*x.shape[:-1], fout), torch.float32, gen)
    y, grads = run(backend, x, a, b, w, 0.5, dy)
    assert_close_rel(y, oracle(x, a, b, w, 0.5), torch.float32, "y")
    for name, g, want in zip(GRADS, grads, oracle_grads(x, a, b, w, 0.5, dy)):
        assert_close_rel(g, want, torch.float32, name)


# ---------------------------------------------------------------- autograd machinery
def test_gradcheck_float64(gen):
    x, a, b, w = (t.requires_grad_() for t in inputs(gen, (2, 3), 5, 4, 3, 2, torch.float64))
    softtf_kernels.set_backend("cpp")
    assert torch.autograd.gradcheck(lambda *t: torch.ops.softtf.routed_lora(*t, 1.5), (x, a, b, w))


def test_only_needed_grads_and_backward_runs_once(gen, monkeypatch):
    calls = []
    real = ops.routed_lora_backward
    monkeypatch.setattr(ops, "routed_lora_backward", lambda *args: calls.append(1) or real(*args))
    x, a, b, w = inputs(gen, (2, 3), 5, 4, 3, 2, torch.float32)
    w.requires_grad_()
    torch.ops.softtf.routed_lora(x, a, b, w, 1.0).sum().backward()
    assert calls == [1] and w.grad is not None and a.grad is None


@pytest.mark.parametrize("dt", [torch.float32, torch.float64])
def test_opcheck(gen, dt):
    x, a, b, w = inputs(gen, (2, 3), 6, 5, 3, 2, dt, torch.float32)
    softtf_kernels.set_backend("cpp")
    torch.library.opcheck(torch.ops.softtf.routed_lora.default, (x, a, b, w, 0.5))
    torch.library.opcheck(torch.ops.softtf.routed_lora.default,
                          tuple(t.clone().requires_grad_() for t in (x, a, b, w)) + (2.0,))
    dy = rand((2, 3, 5), dt, gen)
    torch.library.opcheck(torch.ops.softtf.routed_lora_backward.default, (dy, x, a, b, w, 0.5))


class _RoutedLayer(torch.nn.Module):
    def __init__(self, fin=12, fout=10, n_tasks=3, rank=2):
        super().__init__()
        self.router = torch.nn.Linear(fin, n_tasks)
        self.lora_a = torch.nn.Parameter(torch.randn(n_tasks, rank, fin) * 0.3)
        self.lora_b = torch.nn.Parameter(torch.randn(n_tasks, fout, rank) * 0.3)

    def forward(self, x):
        w = torch.softmax(self.router(x.amax(1)), -1)
        return ops.routed_lora(x, self.lora_a, self.lora_b, w, 8.0).square().sum()


def test_torch_compile_fullgraph_no_graph_breaks(gen):
    softtf_kernels.set_backend("cpp")
    torch.manual_seed(0)
    layer = _RoutedLayer()
    x = rand((3, 5, 12), torch.float32, gen).requires_grad_()
    eager = layer(x)
    eager.backward()
    want = {n: p.grad.clone() for n, p in layer.named_parameters()}
    want_x = x.grad.clone()
    layer.zero_grad()
    x.grad = None
    out = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(out, eager)
    out.backward()
    for n, p in layer.named_parameters():
        torch.testing.assert_close(p.grad, want[n], msg=n)
    torch.testing.assert_close(x.grad, want_x)
    assert torch._dynamo.explain(layer)(x).graph_break_count == 0


def test_fake_cuda_tensors_trace_without_a_gpu():
    with FakeTensorMode():
        x = torch.empty(2, 3, 8, device="cuda", dtype=torch.bfloat16)
        a = torch.empty(4, 2, 8, device="cuda", dtype=torch.bfloat16)
        b = torch.empty(4, 6, 2, device="cuda", dtype=torch.bfloat16)
        w = torch.empty(2, 4, device="cuda")
        y = torch.ops.softtf.routed_lora(x, a, b, w, 2.0)
        assert (y.shape, y.device.type, y.dtype) == ((2, 3, 6), "cuda", torch.bfloat16)
        grads = torch.ops.softtf.routed_lora_backward(y, x, a, b, w, 2.0)
        assert [(g.shape, g.dtype) for g in grads] == [(t.shape, t.dtype) for t in (x, a, b, w)]


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_bad_inputs_raise_naming_the_argument(gen, backend):
    softtf_kernels.set_backend(backend)
    x, a, b, w = inputs(gen, (2, 3), 6, 5, 3, 2, torch.float32)
    f = torch.ops.softtf.routed_lora
    cases = [
        ((x[0, 0], a, b, w, 1.0), ValueError, r"x must have shape \[B, ..., 6\]"),
        ((x[..., :5], a, b, w, 1.0), ValueError, r"x must have shape \[B, ..., 6\] \(lora_a.shape\[2\]\)"),
        ((x.half(), a, b, w, 1.0), TypeError, r"x dtype torch.float16 must equal lora_a dtype"),
        ((x, a[0], b, w, 1.0), ValueError, r"lora_a must be 3-D \[T, r, in\]"),
        ((x, a[:0], b[:0], w[:, :0], 1.0), ValueError, r"lora_a must hold at least one task"),
        ((x, a, b[:, :, :1], w, 1.0), ValueError, r"lora_b must have shape \[3, out, 2\]"),
        ((x, a, b[:2], w, 1.0), ValueError, r"lora_b must have shape \[3, out, 2\]"),
        ((x, a, b.double(), w, 1.0), TypeError, r"lora_b dtype torch.float64 must equal lora_a dtype"),
        ((x, a, b, w[:1], 1.0), ValueError, r"weights must have shape \[2, 3\] \(one row per sample\)"),
        ((x, a, b, w[:, :2], 1.0), ValueError, r"weights must have shape \[2, 3\]"),
        ((x, a, b, w.long(), 1.0), TypeError, r"weights must be float32, bfloat16, float16 or float64"),
        ((x, a, b, w, float("nan")), ValueError, r"scaling must be a finite float"),
        ((x.int(), a, b, w, 1.0), TypeError, r"x must be float32"),
    ]
    for args, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            f(*args)
    dy = rand((2, 3, 5), torch.float32, gen)
    with pytest.raises(ValueError, match=r"grad_out must have shape \[B, ..., 5\] \(lora_b.shape\[1\]\)"):
        torch.ops.softtf.routed_lora_backward(dy[..., :4], x, a, b, w, 1.0)
    with pytest.raises(ValueError, match=r"grad_out and x must have the same leading dims"):
        torch.ops.softtf.routed_lora_backward(dy[:, :2], x, a, b, w, 1.0)
    with pytest.raises(TypeError, match=r"grad_out dtype torch.float64 must equal x dtype"):
        torch.ops.softtf.routed_lora_backward(dy.double(), x, a, b, w, 1.0)


def test_cpp_kernel_checks_for_itself(gen):
    # The private op bypasses the Python validation: the C++ checks name the argument too.
    x, a, b, w = inputs(gen, (2, 3), 6, 5, 3, 2, torch.float32)
    with pytest.raises(RuntimeError, match=r"weights must have shape \[2, 3\]"):
        torch.ops.softtf._cpp_routed_lora(x, a, b, w[:1], 1.0)
    with pytest.raises(RuntimeError, match=r"lora_b must have shape \[3, out, 2\]"):
        torch.ops.softtf._cpp_routed_lora_backward(rand((2, 3, 5), torch.float32, gen), x, a, b[:, :, :1], w, 1.0)
    with pytest.raises(RuntimeError, match=r"scaling must be finite"):
        torch.ops.softtf._cpp_routed_lora(x, a, b, w, float("inf"))
