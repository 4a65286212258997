"""Regression tests of issue 11 ("no silent wrong answers under any stride"), kernel part: strided
arguments read by raw pointer, fp16 overflow of W ⊙ M, zero-size dims, dtype routing of every
argument, and the scoped backend choice. The Triton parts run under the interpreter in
tests/test_triton_kernels.py; tests/test_fuzz_ops.py checks the same contract on random inputs."""
import threading

import pytest
import torch

import softtf_kernels
from softtf_kernels import reference as R

from helpers import assert_close_rel, rand, rand_mask

O = torch.ops.softtf


@pytest.fixture(autouse=True)
def _cpp():
    softtf_kernels.set_backend("cpp")


# ---------------------------------------------------------------- 1. strided arguments
@pytest.mark.parametrize("tokens", [2, 40])  # few-token path (raw pointers) and GEMM panels
def test_strided_bias_in_mixed_task_linear(gen, tokens):
    x, w = rand((tokens, 4), torch.float32, gen), rand((3, 4), torch.float32, gen)
    masks = rand_mask((2, 3, 4), torch.float32, gen)
    ids = torch.arange(tokens) % 2
    b = torch.arange(6.0)[::2]
    assert_close_rel(O.mixed_task_linear(x, w, masks, ids, b), R.mixed_task_linear(x, w, masks, ids, b),
                     torch.float32, "mixed_task_linear strided bias")
    assert_close_rel(O.masked_linear(x, w, masks[0], b), R.masked_linear(x, w, masks[0], b),
                     torch.float32, "masked_linear strided bias")


def _views(t: torch.Tensor, kind: str) -> torch.Tensor:
    """Same values as ``t`` in a non-dense layout."""
    if kind == "offset":  # storage offset, still contiguous
        buf = torch.empty(t.numel() + 3, dtype=t.dtype)
        v = buf[3:].view(t.shape)
    elif kind == "step":  # every other element of the last dim
        v = torch.empty((*t.shape[:-1], 2 * t.shape[-1]), dtype=t.dtype)[..., ::2]
    else:  # "T": transposed storage
        v = torch.empty(tuple(reversed(t.shape)), dtype=t.dtype).permute(*reversed(range(t.dim())))
    v.copy_(t)
    return v


@pytest.mark.parametrize("kind", ["offset", "step", "T"])
@pytest.mark.parametrize("tokens", [3, 40])
def test_every_argument_strided(gen, kind, tokens):
    B, fin, fout = tokens, 9, 5
    x, dy = rand((B, fin), torch.float32, gen), rand((B, fout), torch.float32, gen)
    w, b = rand((fout, fin), torch.float32, gen), rand((fout,), torch.float32, gen)
    m, masks = rand_mask((fout, fin), torch.float16, gen), rand_mask((3, fout, fin), torch.float32, gen)
    ids = torch.randint(0, 3, (2 * B,), generator=gen)[::2]
    s = lambda t: _views(t, kind) if t.dim() > 1 or kind != "T" else _views(t, "step")  # noqa: E731
    cases = {
        "masked_linear": ((x, w, m, b), {}),
        "masked_linear_grad_input": ((dy, w, m), {}),
        "masked_linear_grad_mask": ((dy, x, w), {"mask_dtype": torch.float16}),
        "mask_mixture_grad": ((dy, x, w, masks), {"per_sample": True}),
        "mixed_task_linear": ((x, w, masks, ids, b), {}),
        "mixed_task_linear_grad_input": ((dy, w, masks, ids), {}),
    }
    for op, (args, extra) in cases.items():
        strided = tuple(s(a) if a.dtype.is_floating_point else a for a in args)
        got = getattr(O, op)(*strided, *extra.values())
        want = getattr(R, op)(*(a.double() if a.dtype.is_floating_point else a for a in args), *extra.values())
        assert_close_rel(got, want.to(got.dtype), torch.float16 if got.dtype == torch.float16 else torch.float32, op)


# ---------------------------------------------------------------- 5. fp16 W ⊙ M overflow
@pytest.mark.parametrize("tokens", [32, 33])  # 32: few-token path; 33: GEMM panels
def test_fp16_product_beyond_fp16_range_is_formed_in_fp32(tokens):
    w = torch.full((3, 4), 300.0, dtype=torch.float16)
    m = torch.full((3, 4), 300.0, dtype=torch.float16)  # W ⊙ M = 90000 > fp16 max 65504
    x = torch.full((tokens, 4), 0.002, dtype=torch.float16)
    y, want = O.masked_linear(x, w, m), R.masked_linear(x, w, m)
    assert torch.isfinite(want).all()
    assert_close_rel(y, want, torch.float16, "masked_linear")
    dy = torch.full((tokens, 3), 0.002, dtype=torch.float16)
    dx, want = O.masked_linear_grad_input(dy, w, m), R.masked_linear_grad_input(dy, w, m)
    assert_close_rel(dx, want, torch.float16, "masked_linear_grad_input")
    ids = torch.zeros(tokens, dtype=torch.long)
    assert_close_rel(O.mixed_task_linear(x, w, m[None], ids), R.mixed_task_linear(x, w, m[None], ids),
                     torch.float16, "mixed_task_linear")
    assert_close_rel(O.mixed_task_linear_grad_input(dy, w, m[None], ids),
                     R.mixed_task_linear_grad_input(dy, w, m[None], ids), torch.float16,
                     "mixed_task_linear_grad_input")


# ---------------------------------------------------------------- 6. zero-size dims
ZERO_SHAPES = [  # (x shape, in, out): 0 tokens, 0 samples with 3-D x, 0 in- or out-features
    ((0, 5), 5, 3), ((0, 7, 5), 5, 3), ((2, 0, 5), 5, 3), ((2, 0), 0, 3), ((2, 3, 0), 0, 3),
    ((2, 5), 5, 0), ((2, 3, 5), 5, 0), ((0, 0), 0, 0),
]


def _zero_case(op, lead, fin, fout, gen, bias):
    x, dy = rand((*lead, fin), torch.float32, gen), rand((*lead, fout), torch.float32, gen)
    w, m = rand((fout, fin), torch.float32, gen), rand_mask((fout, fin), torch.float32, gen)
    masks = rand_mask((2, fout, fin), torch.float32, gen)
    ids = torch.arange(lead[0]) % 2
    b = rand((fout,), torch.float32, gen) if bias else None
    return {
        "masked_linear": (x, w, m, b),
        "masked_linear_grad_input": (dy, w, m),
        "masked_linear_grad_mask": (dy, x, w, torch.float32),
        "mask_mixture_grad": (dy, x, w, masks, True),
        "mask_mixture_grad_total": (dy, x, w, masks, False),
        "mixed_task_linear": (x, w, masks, ids, b),
        "mixed_task_linear_grad_input": (dy, w, masks, ids),
    }[op]


@pytest.mark.parametrize("shape", ZERO_SHAPES, ids=str)
@pytest.mark.parametrize("op", ["masked_linear", "masked_linear_grad_input", "masked_linear_grad_mask",
                                "mask_mixture_grad", "mask_mixture_grad_total", "mixed_task_linear",
                                "mixed_task_linear_grad_input"])
@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_zero_size_dims(gen, shape, op, backend):
    lead, fin, fout = shape[0][:-1], shape[1], shape[2]
    args = _zero_case(op, lead, fin, fout, gen, bias=True)
    name = op.removesuffix("_total")
    want = getattr(R, name)(*(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                              for a in args))
    with softtf_kernels.use_backend(backend):
        got = getattr(O, name)(*args)
    assert got.shape == want.shape
    assert_close_rel(got, want.to(got.dtype), torch.float32, f"{backend} {op} {shape}")


@pytest.mark.parametrize("shape", [((0, 7, 5), 5, 3), ((2, 4), 0, 3), ((2, 4), 4, 0)], ids=str)
def test_zero_size_autograd(gen, shape):
    lead, fin, fout = shape[0][:-1], shape[1], shape[2]
    x = rand((*lead, fin), torch.float32, gen).requires_grad_()
    w, b = rand((fout, fin), torch.float32, gen), rand((fout,), torch.float32, gen).requires_grad_()
    m = rand_mask((fout, fin), torch.float32, gen).requires_grad_()
    y = O.masked_linear(x, w, m, b)
    y.sum().backward()
    assert x.grad.shape == x.shape and m.grad.shape == m.shape and b.grad.shape == b.shape
    assert (m.grad == 0).all() if 0 in lead else True
    masks = rand_mask((2, fout, fin), torch.float32, gen).requires_grad_()
    ids = torch.arange(lead[0]) % 2
    x.grad = None
    O.mixed_task_linear(x, w, masks, ids, b).sum().backward()
    assert x.grad.shape == x.shape and masks.grad.shape == masks.shape


# ---------------------------------------------------------------- 7. dtype routing (C++ side)
def test_grad_mask_routes_on_its_mask_dtype_argument(monkeypatch):
    """The dispatcher keys the choice on mask_dtype too, so an fp64 mask sends forward and
    backward to the same kind of kernel (Triton's half of this is in test_triton_kernels.py)."""
    from softtf_kernels import backend

    seen = []
    real = backend.resolve
    monkeypatch.setattr(backend, "resolve", lambda op, dev, dtypes=(): seen.append((op, dtypes)) or real(op, dev, dtypes))
    x = torch.randn(2, 4, requires_grad=True)
    w, m = torch.randn(3, 4), torch.ones(3, 4, dtype=torch.float64, requires_grad=True)
    O.masked_linear(x, w, m).sum().backward()
    by_op = dict(seen)
    assert torch.float64 in by_op["masked_linear"]
    assert torch.float64 in by_op["masked_linear_grad_input"]
    assert torch.float64 in by_op["masked_linear_grad_mask"]


# ---------------------------------------------------------------- 9. scoped backend choice
def test_use_backend_is_thread_local_and_leaves_the_default():
    softtf_kernels.set_backend("auto")
    barrier = threading.Barrier(2)
    seen, errors = {}, []

    def worker(name):
        try:
            with softtf_kernels.use_backend(name):
                barrier.wait(timeout=10)  # both blocks are open now
                seen[name] = softtf_kernels.get_backend()
                barrier.wait(timeout=10)  # ... and stay open until both have looked
                seen[name + "+"] = softtf_kernels.get_backend()
            seen[name + " after"] = softtf_kernels.get_backend()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("reference", "cpp")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert seen == {"reference": "reference", "reference+": "reference", "cpp": "cpp", "cpp+": "cpp",
                    "reference after": "auto", "cpp after": "auto"}
    assert softtf_kernels.get_backend() == "auto"


def test_set_backend_inside_use_backend_sets_the_default_only():
    softtf_kernels.set_backend("auto")
    with softtf_kernels.use_backend("reference"):
        softtf_kernels.set_backend("cpp")
        assert softtf_kernels.get_backend() == "reference"  # the block still wins
        with softtf_kernels.use_backend("cpp"):
            assert softtf_kernels.get_backend() == "cpp"
        assert softtf_kernels.get_backend() == "reference"
    assert softtf_kernels.get_backend() == "cpp"
    with pytest.raises(ValueError, match="backend must be one of"):
        with softtf_kernels.use_backend("nope"):
            pass


def test_use_backend_is_asyncio_task_local():
    import asyncio

    async def task(name, ready, go):
        with softtf_kernels.use_backend(name):
            ready.set()
            await go.wait()
            return softtf_kernels.get_backend()

    async def main():
        r1, r2, go = asyncio.Event(), asyncio.Event(), asyncio.Event()
        t1 = asyncio.create_task(task("reference", r1, go))
        t2 = asyncio.create_task(task("cpp", r2, go))
        await r1.wait()
        await r2.wait()
        go.set()
        return await t1, await t2

    softtf_kernels.set_backend("auto")
    assert asyncio.run(main()) == ("reference", "cpp")
    assert softtf_kernels.get_backend() == "auto"
