"""Property-based cases of the softtf ops (hypothesis), shared by tests/test_fuzz_ops.py (C++) and
tests/test_fuzz_triton.py (Triton under the interpreter).

Each case draws random shapes (sizes 0 and 1 included, odd sizes, 2-D to 4-D activations), dtypes
(x / weight dtype x mask dtype, as the backend accepts), values (masks with exact zeros, negatives
and large entries; bias or none; repeated and unordered task ids) and, for every tensor argument
independently, a layout holding the same values: dense, a storage offset, a step along one dim, a
permuted (transposed) storage order, or a stride-0 expansion. The op runs through
``torch.ops.softtf.<op>`` under ``use_backend(backend)`` and must match the float64 reference on
the same values within ``helpers.TOL`` of the result's dtype.

Profiles (hypothesis settings): ``softtf-ci`` (the default: derandomized, so reproducible, no
deadline, ``CI_EXAMPLES`` cases per test) and ``softtf-long``, chosen by setting
``SOFTTF_FUZZ_EXAMPLES=N`` (N random cases per test; Triton tests run N // 10 unless
``SOFTTF_FUZZ_TRITON_EXAMPLES`` is set). ``SOFTTF_FUZZ_SEED`` makes a long run reproducible.
"""
from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

import softtf_kernels
from softtf_kernels import reference as R

from helpers import TOL, assert_close_rel

CI_EXAMPLES = 120
CI_TRITON_EXAMPLES = 30

_common = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.function_scoped_fixture])
settings.register_profile("softtf-ci", derandomize=True, max_examples=CI_EXAMPLES, **_common)
LONG = os.environ.get("SOFTTF_FUZZ_EXAMPLES")
if LONG:
    settings.register_profile("softtf-long", derandomize=False, max_examples=int(LONG), **_common)
settings.load_profile("softtf-long" if LONG else "softtf-ci")


def examples(triton: bool = False) -> int:
    if triton:
        t = os.environ.get("SOFTTF_FUZZ_TRITON_EXAMPLES")
        if t:
            return int(t)
        return max(CI_TRITON_EXAMPLES, int(LONG) // 10) if LONG else CI_TRITON_EXAMPLES
    return int(LONG) if LONG else CI_EXAMPLES


CPP_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
TRITON_DTYPES = (torch.float32, torch.float16)  # the interpreter has no bf16; fp64 masks route to the reference

sizes = st.one_of(st.integers(0, 3), st.sampled_from([5, 7]))
features = st.one_of(st.integers(0, 3), st.integers(4, 40), st.sampled_from([67]))
batch = st.one_of(st.integers(0, 4), st.sampled_from([7, 33, 40]))  # 33+: the C++ GEMM panel path


# ---------------------------------------------------------------- values and layouts
def _values(shape, dtype, gen, kind):
    if kind == "mask":  # zeros, negatives and large values mixed
        v = torch.rand(shape, generator=gen, dtype=torch.float64) * 1.5
        sel = torch.rand(shape, generator=gen)
        v[sel < 0.2] = 0
        v[(sel >= 0.2) & (sel < 0.3)] *= -1
        v[(sel >= 0.3) & (sel < 0.35)] *= 40
    else:
        v = torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1
    return v.to(dtype)


LAYOUTS = ("dense", "offset", "step", "permute", "expand")


def tensor(draw, shape, dtype, gen, kind="value", layouts=LAYOUTS):
    """A tensor of ``shape``/``dtype`` with random values, in a layout drawn from ``layouts``."""
    shape = tuple(shape)
    layout = draw(st.sampled_from(layouts))
    if layout == "expand" and any(s > 1 for s in shape):
        d = draw(st.sampled_from([i for i, s in enumerate(shape) if s > 1]))
        base = _values(shape[:d] + (1,) + shape[d + 1:], dtype, gen, kind)
        return base.expand(shape)
    t = _values(shape, dtype, gen, kind)
    if layout == "offset":
        off = draw(st.integers(1, 5))
        buf = torch.empty(t.numel() + off, dtype=dtype)
        v = buf[off:].view(shape)
    elif layout == "step" and t.dim() > 0:
        d = draw(st.integers(0, t.dim() - 1))
        big = list(shape)
        big[d] *= 2
        v = torch.empty(big, dtype=dtype).narrow(d, 0, 2 * shape[d])
        v = v[tuple(slice(None, None, 2) if i == d else slice(None) for i in range(t.dim()))]
    elif layout == "permute" and t.dim() > 1:
        perm = draw(st.permutations(range(t.dim())))
        inv = [perm.index(i) for i in range(t.dim())]
        v = torch.empty([shape[p] for p in perm], dtype=dtype).permute(*inv)
    else:
        return t
    assert v.shape == shape
    v.copy_(t)
    return v


def ids_tensor(draw, n, n_tasks, gen):
    dtype = draw(st.sampled_from([torch.int64, torch.int32]))
    layout = draw(st.sampled_from(["dense", "step", "offset", "expand"]))
    if layout == "expand" and n > 0:
        return torch.tensor([draw(st.integers(0, n_tasks - 1))], dtype=dtype).expand(n)
    vals = torch.tensor(draw(st.lists(st.integers(0, n_tasks - 1), min_size=n, max_size=n)), dtype=dtype)
    if layout == "step":
        buf = torch.zeros(2 * n, dtype=dtype)
        buf[::2] = vals
        buf[1::2] = n_tasks + 7  # out-of-range garbage between the ids: a dense read would fail
        return buf[::2]
    if layout == "offset":
        buf = torch.full((n + 3,), n_tasks + 7, dtype=dtype)
        buf[3:] = vals
        return buf[3:]
    return vals


# ---------------------------------------------------------------- cases
def draw_case(draw, op, dtypes):
    """(args, extra) of one random call of ``op``; dtypes: the float dtypes the backend takes."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    dt = draw(st.sampled_from(dtypes))
    mdt = draw(st.sampled_from(dtypes + ((torch.float64,) if torch.float64 not in dtypes else ())))
    batched = op in ("mixed_task_linear", "mixed_task_linear_grad_input") or (op == "mask_mixture_grad")
    n_lead = draw(st.integers(1 if not batched else 1, 3))
    lead = [draw(batch)] + [draw(sizes) for _ in range(n_lead - 1)]
    fin, fout = draw(features), draw(features)
    if op in ("mixed_task_linear", "mixed_task_linear_grad_input") and len(lead) < 2:
        lead.append(draw(sizes))
    x = lambda: tensor(draw, (*lead, fin), dt, gen)  # noqa: E731
    dy = lambda: tensor(draw, (*lead, fout), dt, gen)  # noqa: E731
    w = tensor(draw, (fout, fin), dt, gen)
    bias = (lambda: tensor(draw, (fout,), dt, gen)) if draw(st.booleans()) else (lambda: None)  # noqa: E731
    n_tasks = draw(st.integers(1, 4))
    masks = lambda: tensor(draw, (n_tasks, fout, fin), mdt, gen, "mask")  # noqa: E731
    mask = lambda: tensor(draw, (fout, fin), mdt, gen, "mask")  # noqa: E731
    if op == "masked_linear":
        return (x(), w, mask(), bias())
    if op == "masked_linear_grad_input":
        return (dy(), w, mask())
    if op == "masked_linear_grad_mask":
        return (dy(), x(), w, mdt)
    if op == "mask_mixture_grad":
        per_sample = len(lead) >= 2 and draw(st.booleans())
        return (dy(), x(), w, masks(), per_sample)
    if op == "mixed_task_linear":
        return (x(), w, masks(), ids_tensor(draw, lead[0], n_tasks, gen), bias())
    if op == "mixed_task_linear_grad_input":
        return (dy(), w, masks(), ids_tensor(draw, lead[0], n_tasks, gen))
    if op in ("routed_lora", "routed_lora_backward"):
        # x [B, ..., in], lora_a [T, r, in], lora_b [T, out, r] in x's dtype; weights [B, T] in any.
        if len(lead) < 2:
            lead.append(draw(sizes))
        rank = draw(sizes)
        args = (x(), tensor(draw, (n_tasks, rank, fin), dt, gen), tensor(draw, (n_tasks, fout, rank), dt, gen),
                tensor(draw, (lead[0], n_tasks), mdt, gen), draw(st.sampled_from([1.0, 0.5, 8.0, -2.0])))
        return args if op == "routed_lora" else (dy(), *args)
    raise ValueError(op)


def _double(a):
    return a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a


def _tol_dtype(*dts):
    return max((d for d in dts if isinstance(d, torch.dtype) and d.is_floating_point), key=lambda d: TOL[d])


def check_op(op, args, backend):
    with softtf_kernels.use_backend(backend):
        got = getattr(torch.ops.softtf, op)(*args)
    ref_args = [_double(a) for a in args]
    if op == "masked_linear_grad_mask":
        ref_args[3] = torch.float64
    want = getattr(R, op)(*ref_args)
    dt = args[0].dtype
    if op == "routed_lora_backward":  # (dx, dlora_a, dlora_b, dweights), each in its input's dtype
        for i, (g, w, a) in enumerate(zip(got, want, args[1:5])):
            assert g.dtype == a.dtype and g.shape == a.shape, (i, g.dtype, g.shape)
            assert_close_rel(g, w, _tol_dtype(dt, a.dtype), f"{backend} {op} grad {i} {_describe(args)}")
        return
    out_dt = args[3] if op == "masked_linear_grad_mask" else got.dtype
    assert got.dtype == (out_dt if op != "mask_mixture_grad" else (torch.float64 if dt == torch.float64 else torch.float32))
    assert_close_rel(got, want, _tol_dtype(dt, out_dt), f"{backend} {op} {_describe(args)}")


def _describe(args):
    return ", ".join(f"{tuple(a.shape)}:{str(a.dtype)[6:]}:{tuple(a.stride())}" if isinstance(a, torch.Tensor)
                     else repr(a) for a in args)


# ---------------------------------------------------------------- autograd
def draw_autograd_case(draw, op, dtypes):
    args = list(draw_case(draw, op, dtypes))
    # Which float arguments want a gradient (weights are frozen in Soft-TF but dW is offered too).
    float_idx = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_floating_point()]
    want = [i for i in float_idx if draw(st.booleans())] or float_idx[:1]
    return args, want


def check_autograd(op, args, want, backend, gen_seed=0):
    def leaves(double):
        out = []
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor) and a.is_floating_point():
                a = a.detach().double() if double else a.detach()
                a.requires_grad_(i in want)
            out.append(a)
        return out

    mine, ref = leaves(False), leaves(True)
    with softtf_kernels.use_backend(backend):
        y = getattr(torch.ops.softtf, op)(*mine)
    y_ref = getattr(R, op)(*ref)
    g = torch.Generator().manual_seed(gen_seed)
    dy = (torch.rand(y.shape, generator=g, dtype=torch.float64) * 2 - 1).to(y.dtype)
    with softtf_kernels.use_backend(backend):
        y.backward(dy)
    y_ref.backward(dy.double())
    dt = args[0].dtype
    assert_close_rel(y, y_ref, dt, f"{backend} {op} forward {_describe(args)}")
    for i in want:
        got, exp = mine[i].grad, ref[i].grad
        assert got is not None and got.dtype == mine[i].dtype, (i, got)
        assert_close_rel(got, exp, _tol_dtype(dt, mine[i].dtype), f"{backend} {op} grad of arg {i} {_describe(args)}")
