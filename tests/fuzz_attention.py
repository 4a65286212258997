"""Property-based cases of softtf.prefix_attention (hypothesis), shared by
tests/test_fuzz_prefix_attention.py (CPU path, backend ``cpp``) and
tests/test_fuzz_prefix_attention_triton.py (Triton under the interpreter).

A case draws B, H >= 0, N >= 1, P >= 0 (0 included), D (odd sizes included), the dtype of q/k/v and
the prefixes, the dtypes of alpha and tau independently, their values (negative too), the
activation, ``scale`` (None, i.e. D^-0.5, or a drawn float up to 3: peaked scores) and, for every
tensor independently, a layout (``relayout``): dense, a storage offset, a step along one dim, a
permuted storage order (the transposed [B, N, H, D] view of a qkv projection among them) or a
stride-0 expansion (one prompt for the whole batch). The op's results must match the float64
reference (``softtf_kernels.reference``) on the same values.

Tolerances: ``max |got - want| <= TOL[dtype] * scale``, where ``scale`` is the magnitude the
result is summed from (``natural_scales``), not only its own size: a result that cancels to ~0
(keys or queries repeated by a stride-0 layout, a peaked softmax, dalpha summed over every prefix
score) is accurate only to the precision times the size of its terms.
"""
from __future__ import annotations

import torch
from hypothesis import strategies as st
from torch import Tensor

import softtf_kernels
from softtf_kernels import backend, ops
from softtf_kernels import reference as R
from softtf_kernels.common import attention_scale, gate_activation

ACTS = ("none", "sigmoid", "tanh", "gelu")
NAMES = ("q", "k", "v", "prefix_k", "prefix_v", "alpha", "tau")
ALL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# relative to the result's scale; bf16 / fp16 results are rounded to 8 / 11 bits and ATen's flash
# attention keeps its probabilities in the input dtype for the P·V product
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}
# lse (fp32, fp64 for fp64) relative to the largest score: ATen's flash attention scales q in its
# dtype (bf16: 2^-9 relative), so the scores of bf16 / fp16 inputs carry that rounding
LSE_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 8e-3}
FLOOR = 1e-12  # a result whose every term is 0 must be 0
LAYOUTS = ("dense", "offset", "step", "permute", "expand")
CPU = torch.device("cpu")


# ---------------------------------------------------------------- layouts
def relayout(draw, t: Tensor, layouts=LAYOUTS) -> Tensor:
    """``t``'s values in a layout drawn from ``layouts``. "expand" repeats one slice of ``t`` along a
    dim of size > 1 with stride 0 (other values than ``t``'s: leave it out where they must stay)."""
    shape = tuple(t.shape)
    layout = draw(st.sampled_from(layouts))
    if layout == "expand" and any(s > 1 for s in shape):
        d = draw(st.sampled_from([i for i, s in enumerate(shape) if s > 1]))
        return t.narrow(d, 0, 1).clone().expand(shape)
    if layout == "offset":
        off = draw(st.integers(1, 5))
        v = torch.empty(t.numel() + off, dtype=t.dtype)[off:].view(shape)
    elif layout == "step" and t.dim() > 0:
        d = draw(st.integers(0, t.dim() - 1))
        big = list(shape)
        big[d] = 2 * shape[d]
        v = torch.full(big, float("nan"), dtype=t.dtype)  # NaN between the elements: a dense read fails
        v = v[tuple(slice(None, None, 2) if i == d else slice(None) for i in range(t.dim()))]
    elif layout == "permute" and t.dim() > 1:
        perm = draw(st.permutations(range(t.dim())))
        inv = [perm.index(i) for i in range(t.dim())]
        v = torch.empty([shape[p] for p in perm], dtype=t.dtype).permute(*inv)
    else:
        return t.clone()
    assert v.shape == t.shape
    v.copy_(t)
    return v


def uniform(shape, dtype, gen, low=-1.0, high=1.0) -> Tensor:
    return (torch.rand(shape, generator=gen, dtype=torch.float64) * (high - low) + low).to(dtype)


def scalar(draw, value: float, dtype: torch.dtype) -> Tensor:
    """A 0-dim tensor, dense or at a storage offset."""
    if draw(st.booleans()):
        return torch.tensor(value, dtype=dtype)
    buf = torch.zeros(3, dtype=dtype)
    buf[2] = value
    return buf[2]


# ---------------------------------------------------------------- cases
def draw_case(draw, dtypes, param_dtypes, *, batch=st.integers(0, 3), heads=st.integers(0, 3),
              tokens=st.one_of(st.integers(1, 9), st.sampled_from([16, 17, 33])),
              prefix=st.one_of(st.just(0), st.integers(1, 7), st.sampled_from([16, 20])),
              head_dim=st.one_of(st.integers(1, 9), st.sampled_from([15, 16, 31, 64]))):
    """(args [q, k, v, prefix_k, prefix_v, alpha, tau], activation, scale, generator)."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    dt = draw(st.sampled_from(dtypes))
    b, h, n, p, d = draw(batch), draw(heads), draw(tokens), draw(prefix), draw(head_dim)
    if b * h > 0 and draw(st.integers(0, 9)) == 0:  # now and then an empty batch or no heads
        b, h = (0, h) if draw(st.booleans()) else (b, 0)
    args = [relayout(draw, uniform(shape, dt, gen)) for shape in [(b, h, n, d)] * 3 + [(b, h, p, d)] * 2]
    alpha = scalar(draw, draw(st.floats(-2.0, 2.0)), draw(st.sampled_from(param_dtypes)))
    tau = scalar(draw, draw(st.floats(-3.0, 3.0)), draw(st.sampled_from(param_dtypes)))
    activation = draw(st.sampled_from(ACTS))
    scale = draw(st.one_of(st.none(), st.floats(0.05, 3.0)))
    return args + [alpha, tau], activation, scale, gen


def describe(args, activation, scale) -> str:
    ts = ", ".join(f"{n}{tuple(a.shape)}:{str(a.dtype)[6:]}:{tuple(a.stride())}" for n, a in zip(NAMES, args))
    vals = f"alpha={args[5].item():.4g} tau={args[6].item():.4g}"
    return f"{ts}; {vals}; activation={activation!r}, scale={scale!r}"


# ---------------------------------------------------------------- tolerances
def close(got: Tensor, want: Tensor, dtype: torch.dtype, what: str, scale: float, tols=TOL) -> None:
    """max |got - want| <= tols[dtype] * scale (``scale``: the result's natural magnitude), plus the
    smallest subnormal of got's dtype (an fp16 dtau of 1e-9 can only be 0 or 6e-8)."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if want.numel() == 0:
        return
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    scale = max(scale, want.double().abs().max().item(), FLOOR)
    subnormal = torch.finfo(got.dtype).tiny * torch.finfo(got.dtype).eps
    err = max((got.double() - want.double()).abs().max().item() - subnormal, 0.0) / scale
    assert err <= tols[dtype], f"{what}: error {err:.2e} relative to {scale:.2e} > {tols[dtype]:.0e}"


def natural_scales(grad_out, q, k, v, prefix_k, prefix_v, alpha, tau, activation, scale) -> list[float]:
    """[out, the seven gradients, lse]: the magnitudes they are summed from, in float64. Out and the
    gradients: each formula of the reference with every term replaced by its absolute value
    (|dS| = P ⊙ (|dO| |V|ᵀ + |rowsum(dO ⊙ O)|)), its largest element; lse: the largest |score|, at
    least 1. A sum computed in precision eps is accurate to about eps times that, which is what
    the kernels can be held to where the result itself cancels to ~0 (keys or queries repeated by
    a stride-0 layout, a peaked softmax, dalpha summed over every prefix score)."""
    if q.numel() == 0:
        return [0.0] * 9
    q, k, v, pk, pv, do = (t.double() for t in (q, k, v, prefix_k, prefix_v, grad_out))
    al, ta, sc, n_p = alpha.double(), tau.double(), attention_scale(q, scale), pk.shape[2]
    out, lse = R.prefix_attention_forward(q, k, v, pk, pv, al, ta, activation, scale)
    s_p = sc * q @ pk.transpose(-1, -2)
    a, da = gate_activation(ta * s_p, activation) if activation != "none" else (torch.zeros_like(s_p),) * 2
    s = torch.cat([s_p + al * a, sc * q @ k.transpose(-1, -2)], -1)
    probs = torch.exp(s - lse.unsqueeze(-1))
    vs, ks = torch.cat([pv, v], -2).abs(), torch.cat([pk, k], -2).abs()
    ds = probs * (do.abs() @ vs.transpose(-1, -2) + (do * out).sum(-1, keepdim=True).abs())
    ds_p = ds[..., :n_p] * (1 + (al * ta * da).abs())
    ds_raw = torch.cat([ds_p, ds[..., n_p:]], -1)
    pt = probs.transpose(-1, -2)
    nat = [probs @ vs, sc * ds_raw @ ks, sc * ds[..., n_p:].transpose(-1, -2) @ q.abs(), pt[..., n_p:, :] @ do.abs(),
           sc * ds_p.transpose(-1, -2) @ q.abs(), pt[..., :n_p, :] @ do.abs(),
           (ds[..., :n_p] * a.abs()).sum(), (ds[..., :n_p] * (al * da * s_p).abs()).sum(), s.abs().clamp_min(1.0)]
    return [t.max().item() if t.numel() else 0.0 for t in nat]


def grad_tol_dtype(dtype: torch.dtype, grad_dtype: torch.dtype) -> torch.dtype:
    """The looser of q's dtype and the gradient's own (alpha / tau may have another dtype)."""
    return max(dtype, grad_dtype, key=TOL.get)


# ---------------------------------------------------------------- checks
def expected_backend(name: str, args) -> str:
    """Which implementation ``name`` must run: fp64 anywhere sends triton to the reference."""
    if name == "triton" and any(a.dtype == torch.float64 for a in args):
        return "reference"
    return name


def check_ops(draw, args, activation, scale, gen, backend_name: str) -> None:
    """prefix_attention_forward (out, lse) and prefix_attention_backward (all seven gradients, from
    the forward's own out and lse; grad_out and out in drawn layouts) against the reference."""
    dtypes = tuple(a.dtype for a in args)
    dt, what = args[0].dtype, f"{backend_name}: {describe(args, activation, scale)}"
    acc = torch.float64 if dt == torch.float64 else torch.float32
    d = [a.double() for a in args]
    with softtf_kernels.use_backend(backend_name):
        got = backend.resolve("prefix_attention_forward", CPU, dtypes)[0]
        assert got == expected_backend(backend_name, args), (got, what)
        out, lse = ops.prefix_attention_forward(*args, activation, scale)
    assert out.dtype == dt and lse.dtype == acc, what
    dy = relayout(draw, uniform(out.shape, dt, gen))
    scales = natural_scales(dy, *args, activation, scale)
    want_out, want_lse = R.prefix_attention_forward(*d, activation, scale)
    close(out, want_out, dt, f"out, {what}", scales[0])
    close(lse, want_lse, dt, f"lse, {what}", scales[8], LSE_TOL)
    with softtf_kernels.use_backend(backend_name):
        grads = ops.prefix_attention_backward(dy, *args, relayout(draw, out, LAYOUTS[:4]), lse, activation, scale)
    want = R.prefix_attention_backward(dy.double(), *d, want_out, want_lse, activation, scale)
    _check_grads(grads, want, range(7), args, scales, what)


def check_autograd(draw, args, activation, scale, gen, backend_name: str) -> None:
    """torch.ops.softtf.prefix_attention with a drawn subset of the seven inputs requiring grad,
    backward with a grad_out in a drawn layout; the others get no gradient."""
    which = [i for i in range(7) if draw(st.booleans())] or [draw(st.integers(0, 6))]
    what = f"{backend_name} autograd d{[NAMES[i] for i in which]}: {describe(args, activation, scale)}"
    leaves = [a.detach().requires_grad_(i in which) for i, a in enumerate(args)]
    with softtf_kernels.use_backend(backend_name):
        out = torch.ops.softtf.prefix_attention(*leaves, activation, scale)
    dt = args[0].dtype
    dy = relayout(draw, uniform(out.shape, dt, gen))
    with softtf_kernels.use_backend(backend_name):
        out.backward(dy)
    scales = natural_scales(dy, *args, activation, scale)
    d = [a.double() for a in args]
    want_out, want_lse = R.prefix_attention_forward(*d, activation, scale)
    assert out.dtype == dt, what
    close(out.detach(), want_out, dt, f"out, {what}", scales[0])
    want = R.prefix_attention_backward(dy.double(), *d, want_out, want_lse, activation, scale)
    assert all(leaves[i].grad is None for i in range(7) if i not in which), what
    _check_grads([leaves[i].grad for i in range(7)], want, which, args, scales, what)


def _check_grads(grads, want, which, args, scales, what) -> None:
    """Gradient i: its input's dtype and shape, within tolerance of the reference (scales[1 + i])."""
    dt = args[0].dtype
    for i in which:
        g, a = grads[i], args[i]
        assert g is not None and g.dtype == a.dtype and g.shape == a.shape, (NAMES[i], g, what)
        close(g, want[i], grad_tol_dtype(dt, g.dtype), f"d{NAMES[i]}, {what}", scales[1 + i])
