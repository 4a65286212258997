"""The op table (softtf_kernels.table) against everything derived from it or listed beside it: the
C++ schema list, the registered kernels, the reference and Triton modules, the typed wrappers,
the fakes; the cached backend choice; the composite superposed_linear."""
import inspect

import pytest
import torch

import softtf_kernels
from softtf_kernels import backend, cpu_attention, ops, reference, table, validate
from softtf_kernels import triton as triton_ops
from softtf_kernels.quant import quantize_mask

from helpers import assert_close_rel, rand, rand_mask


def _schema_args(qualname: str) -> list[str]:
    return [a.name for a in getattr(torch.ops.softtf, qualname).default._schema.arguments]


def _params(fn) -> list[str]:
    return [p.name for p in inspect.signature(fn).parameters.values() if p.kind != p.KEYWORD_ONLY]


def _float_args(qualname: str) -> set[int]:
    # Every float tensor argument and every dtype argument chooses the kernel (an fp64 one anywhere
    # must route forward and backward alike to the reference); task_ids does not.
    schema = getattr(torch.ops.softtf, qualname).default._schema.arguments
    return {i for i, a in enumerate(schema)
            if a.name == "mask_dtype" or (a.name != "task_ids" and str(a.type) in ("Tensor", "Tensor?", "Optional[Tensor]"))}


def test_table_and_cpp_list_and_modules_agree():
    names = table.ALL_NAMES
    assert len(set(names)) == len(names) == len(table.OPS)
    assert sorted(table.NAMES + table.PYTHON_NAMES) == sorted(names)
    composites = [c.name for c in table.COMPOSITES]
    # The C++ list (csrc/op_list.h) defines each of its ops three times; the Python-defined ops and
    # the composites are defined once (registry.py); nothing else is.
    defined = {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("softtf::")}
    assert defined == ({f"{p}{n}" for n in table.NAMES for p in ("", "_cpp_", "_cuda_")}
                       | set(table.PYTHON_NAMES) | set(composites))
    assert list(reference.__all__) == list(names)
    assert [n for n in triton_ops.__all__ if n in names] == list(names)
    assert [n for n in ops.__all__ if n != "superposed_linear"] == list(names) + composites
    for spec in table.OPS:
        args = _schema_args(spec.name)
        if spec.schema is None:
            assert _schema_args(f"_cpp_{spec.name}") == args == _schema_args(f"_cuda_{spec.name}"), spec.name
        else:
            assert str(getattr(torch.ops.softtf, spec.name).default._schema) == f"softtf::{spec.name}{spec.schema}"
        for module in (reference, ops, validate):
            assert _params(getattr(module, spec.name)) == args, (module.__name__, spec.name)
        assert spec.validate is getattr(validate, spec.name)
        assert all(i < len(args) for i in spec.dtype_args)
        assert set(spec.dtype_args) == _float_args(spec.name), (spec.name, spec.dtype_args)
    for comp in table.COMPOSITES:
        assert str(getattr(torch.ops.softtf, comp.name).default._schema) == f"softtf::{comp.name}{comp.schema}"
        assert _schema_args(comp.name) == _schema_args(comp.of)
        assert _params(getattr(ops, comp.name)) == _schema_args(comp.name)


def test_every_op_has_its_kernels_fake_and_autograd_registered():
    for spec in table.OPS:
        q = f"softtf::{spec.name}"
        for key in ("CPU", "CUDA", "Meta"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(q, key), (q, key)
        assert torch._C._dispatch_has_kernel_for_dispatch_key(q, "Autograd") == (spec.autograd is not None), q
        assert softtf_kernels.cpp_available(spec.name), spec.name
    # The CUDA kernels are built for every op of the C++ list or for none; the Python-defined ops
    # have none (their CUDA kernel is Triton).
    assert len({softtf_kernels.cuda_available(n) for n in table.NAMES}) == 1
    assert not any(softtf_kernels.cuda_available(n) for n in table.PYTHON_NAMES)
    for comp in table.COMPOSITES:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"softtf::{comp.name}", "CompositeImplicitAutograd")


def _sample_args(name, gen, device=None):
    B, N, fin, fout, T = 3, 4, 12, 7, 2
    x, dy = rand((B, N, fin), torch.float32, gen), rand((B, N, fout), torch.float32, gen)
    w, b = rand((fout, fin), torch.float32, gen), rand((fout,), torch.float32, gen)
    m, masks = rand_mask((fout, fin), torch.bfloat16, gen), rand_mask((T, fout, fin), torch.float16, gen)
    ids = torch.tensor([1, 0, 1])
    args = {
        "masked_linear": (x, w, m, b),
        "masked_linear_grad_input": (dy, w, m),
        "masked_linear_grad_mask": (dy, x, w, torch.bfloat16),
        "mask_mixture_grad": (dy, x, w, masks, True),
        "mixed_task_linear": (x, w, masks, ids, b),
        "mixed_task_linear_grad_input": (dy, w, masks, ids),
        "routed_lora": (x, rand((T, 3, fin), torch.float32, gen), rand((T, fout, 3), torch.float32, gen),
                        rand((B, T), torch.bfloat16, gen), 0.5),
        "routed_lora_backward": (dy, x, rand((T, 3, fin), torch.float32, gen), rand((T, fout, 3), torch.float32, gen),
                                 rand((B, T), torch.bfloat16, gen), 0.5),
    }.get(name) or _attention_args(name, gen)
    return tuple(a.to(device) if device is not None and isinstance(a, torch.Tensor) else a for a in args)


def _attention_args(name, gen):
    B, H, N, P, D = 2, 3, 5, 4, 6
    q, k, v = (rand((B, H, N, D), torch.float32, gen) for _ in range(3))
    pk, pv = rand((B, H, P, D), torch.float32, gen), rand((B, H, P, D), torch.float32, gen)
    alpha, tau = torch.tensor(0.5), torch.tensor(1.5, dtype=torch.bfloat16)
    if name == "prefix_attention_forward":
        return (q, k, v, pk, pv, alpha, tau, "gelu", 0.3)
    out, lse = reference.prefix_attention_forward(q, k, v, pk, pv, alpha, tau, "gelu", 0.3)
    return (rand(q.shape, torch.float32, gen), q, k, v, pk, pv, alpha, tau, out, lse, "gelu", 0.3)


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("name", table.ALL_NAMES)
def test_fake_output_matches_the_reference(gen, name):
    expected = _as_tuple(getattr(reference, name)(*_sample_args(name, gen)))
    outs = _as_tuple(getattr(torch.ops.softtf, name)(*_sample_args(name, gen, "meta")))
    assert len(outs) == len(expected)
    for out, want in zip(outs, expected):
        assert (out.device.type, out.shape, out.dtype) == ("meta", want.shape, want.dtype)


@pytest.mark.parametrize("name", table.ALL_NAMES)
def test_typed_wrappers_run_the_op(gen, name):
    args = _sample_args(name, gen)
    softtf_kernels.set_backend("reference")
    got, want = _as_tuple(getattr(ops, name)(*args)), _as_tuple(getattr(reference, name)(*args))
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))


def test_composite_returns_the_output_of_its_op(gen):
    args = _sample_args("prefix_attention_forward", gen)
    softtf_kernels.set_backend("reference")
    assert torch.equal(ops.prefix_attention(*args), reference.prefix_attention_forward(*args)[0])
    meta = ops.prefix_attention(*_sample_args("prefix_attention_forward", gen, "meta"))
    assert (meta.device.type, meta.shape, meta.dtype) == ("meta", (2, 3, 5, 6), torch.float32)


def test_backend_choice_is_cached_per_key_and_follows_set_backend(gen):
    cpu, dtypes = torch.device("cpu"), (torch.float32,) * 4  # x, weight, mask, bias
    x, w, m, b = _sample_args("masked_linear", gen)
    backend.choose.cache_clear()
    softtf_kernels.set_backend("cpp")
    assert backend.resolve("masked_linear", cpu, dtypes)[0] == "cpp"
    assert backend.resolve("masked_linear", cpu, dtypes)[0] == "cpp"
    torch.ops.softtf.masked_linear(x, w, m.float(), b)  # the op's own dispatch uses the same key
    info = backend.choose.cache_info()
    assert (info.misses, info.hits) == (1, 2)
    softtf_kernels.set_backend("reference")  # the setting is part of the key: takes effect at once
    name, impl = backend.resolve("masked_linear", cpu, dtypes)
    assert (name, impl) == ("reference", reference.masked_linear)
    softtf_kernels.set_backend("cpp")
    assert backend.resolve("masked_linear", cpu, dtypes)[0] == "cpp"
    assert backend.resolve("masked_linear", cpu, (torch.float64,) * 3)[0] == "cpp"  # another key
    info = backend.choose.cache_info()
    assert (info.misses, info.hits) == (3, 3)
    # Errors are raised on every call, never cached as a choice.
    with softtf_kernels.use_backend("cuda"):
        for _ in range(2):
            with pytest.raises(RuntimeError, match=r"backend 'cuda' runs CUDA tensors only"):
                backend.resolve("masked_linear", cpu, dtypes)


def test_auto_on_cuda_follows_the_measured_order(monkeypatch):
    """`auto` on CUDA tensors takes each op's first runnable entry of CUDA_AUTO_ORDER (no GPU needed:
    choose is a pure function of device type, dtypes and what is built); float64 -> reference."""
    cuda = torch.device("cuda")
    assert set(backend.CUDA_AUTO_ORDER) == set(table.ALL_NAMES)
    for op in table.ALL_NAMES:
        assert backend.CUDA_AUTO_ORDER[op][-1] == "reference", op
        assert backend.choose(op, cuda, "auto", (torch.float64,) * 7, False) == "reference"
    backend.choose.cache_clear()
    monkeypatch.setattr(backend, "cuda_available", lambda op="masked_linear": True)
    monkeypatch.setattr(backend, "triton_available", lambda: True)
    try:
        assert backend.choose("masked_linear", cuda, "auto", (torch.bfloat16,) * 3, False) == "reference"
        assert backend.choose("routed_lora", cuda, "auto", (torch.bfloat16,) * 3, False) == "cuda"
        assert backend.choose("prefix_attention_forward", cuda, "auto", (torch.bfloat16,) * 7, False) == "triton"
        monkeypatch.setattr(backend, "cuda_available", lambda op="masked_linear": False)
        backend.choose.cache_clear()
        assert backend.choose("routed_lora", cuda, "auto", (torch.bfloat16,) * 3, False) == "triton"
        # Named explicitly, a kernel still runs (auto's order never hides one).
        assert backend.choose("masked_linear", cuda, "triton", (torch.bfloat16,) * 3, False) == "triton"
    finally:
        backend.choose.cache_clear()


def test_auto_on_cuda_runs_int8_masks_on_triton(monkeypatch, gen):
    """An int8 mask sends the ops that read masks to Triton under `auto` on CUDA (the reference
    would dequantize the whole mask in memory), or to the reference without triton or with float64;
    the dtypes the dispatcher passes include the mask's."""
    cuda = torch.device("cuda")
    assert set(backend.INT8_MASK_OPS) == {n for n in table.ALL_NAMES if {"mask", "masks"} & set(_schema_args(n))}
    seen = []
    real = backend.resolve
    monkeypatch.setattr(backend, "resolve", lambda op, dev, dtypes=(): seen.append((op, dtypes)) or real(op, dev, dtypes))
    w = rand((7, 12), torch.float32, gen)
    torch.ops.softtf.masked_linear(rand((3, 12), torch.float32, gen), w, quantize_mask(rand_mask((7, 12), torch.float32, gen)))
    assert seen == [("masked_linear", (torch.float32, torch.float32, torch.int8))]
    backend.choose.cache_clear()
    monkeypatch.setattr(backend, "cuda_available", lambda op="masked_linear": True)
    monkeypatch.setattr(backend, "triton_available", lambda: True)
    try:
        for op in backend.INT8_MASK_OPS:
            for dt in (torch.float16, torch.bfloat16, torch.float32):
                assert backend.choose(op, cuda, "auto", (dt, dt, torch.int8), False) == "triton", op
                assert backend.choose(op, cuda, "auto", (dt, dt, dt), False) == backend.CUDA_AUTO_ORDER[op][0], op
            assert backend.choose(op, cuda, "auto", (torch.float64, torch.float64, torch.int8), False) == "reference"
            assert backend.choose(op, cuda, "cuda", (torch.float32, torch.float32, torch.int8), False) == "cuda"  # named
        monkeypatch.setattr(backend, "triton_available", lambda: False)
        backend.choose.cache_clear()
        assert backend.choose("masked_linear", cuda, "auto", (torch.float16, torch.float16, torch.int8), False) == "reference"
    finally:
        backend.choose.cache_clear()


def test_backend_choice_of_the_python_defined_ops():
    """CPU: backend cpp is the ATen flash-attention composition (fp64 too, as for the C++ ops);
    CUDA: Triton, fp64 -> reference; backend 'cuda' names a kernel these ops do not have."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for op in table.PYTHON_NAMES:
        for dt in (torch.float32, torch.bfloat16, torch.float64):
            assert backend.choose(op, cpu, "auto", (dt,) * 7, False) == "cpp"
        assert backend.implementation(op, "cpp") is getattr(cpu_attention, op)
        assert backend.implementation(op, "reference") is getattr(reference, op)
        if backend.triton_available():
            assert backend.choose(op, cuda, "auto", (torch.float16,) * 7, False) == "triton"
            assert backend.choose(op, cuda, "triton", (torch.float32,) * 6 + (torch.float64,), False) == "reference"
        assert backend.choose(op, cuda, "auto", (torch.float64,) * 7, False) == "reference"
        with pytest.raises(RuntimeError, match=r"has no CUDA C\+\+ kernel \(its CUDA kernel is Triton\)"):
            backend.choose(op, cuda, "cuda", (torch.float32,) * 7, False)
        with pytest.raises(RuntimeError, match=r"backend 'cuda' runs CUDA tensors only"):
            backend.choose(op, cpu, "cuda", (torch.float32,) * 7, False)
        assert "cpp" in softtf_kernels.available_backends("cpu", op)


# ---------------------------------------------------------------- composite: superposed_linear
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("mdt", [torch.float32, torch.bfloat16])
def test_superposed_linear_matches_oracle(gen, per_sample, mdt):
    B, N, fin, fout, T = 3, 4, 20, 9, 5
    x = rand((B, N, fin), torch.float32, gen).requires_grad_()
    w = rand((fout, fin), torch.float32, gen)
    b = rand((fout,), torch.float32, gen).requires_grad_()
    masks = rand_mask((T, fout, fin), mdt, gen)
    a = torch.rand(T, generator=gen)
    alpha = (a.expand(B, T).clone() if per_sample else a.clone()).requires_grad_()
    y = ops.superposed_linear(x, w, masks, alpha, b)
    dy = rand(y.shape, torch.float32, gen)
    dx, da, db = torch.autograd.grad(y, (x, alpha, b), dy)
    xr, ar, br = (t.detach().double().requires_grad_() for t in (x, alpha, b))
    a_b = ar if per_sample else ar.expand(B, T)  # per-sample alpha: each row drives its sample
    yr = torch.einsum("bni,boi->bno", xr, w.double() * torch.einsum("bt,toi->boi", a_b, masks.double())) + br
    rx, ra, rb = torch.autograd.grad(yr, (xr, ar, br), dy.double())
    assert y.dtype == x.dtype and da.dtype == alpha.dtype and da.shape == alpha.shape
    assert_close_rel(y, yr.detach(), torch.float32, "y")
    assert_close_rel(dx, rx, torch.float32, "dx")
    assert_close_rel(da, ra, torch.float32, "dalpha")
    assert_close_rel(db, rb, torch.float32, "db")


def test_superposed_linear_errors(gen):
    x, w = rand((3, 4, 8), torch.float32, gen), rand((5, 8), torch.float32, gen)
    masks = rand_mask((2, 5, 8), torch.float32, gen)
    with pytest.raises(ValueError, match=r"alpha \[B, T\] needs masks \[T, out, in\] with the same T"):
        ops.superposed_linear(x, w, masks, torch.tensor([[0.2, 0.8, 0.0], [0.5, 0.5, 0.0], [0.2, 0.8, 0.0]]))
    with pytest.raises(ValueError, match=r"alpha \[B, T\] needs x \[B, ...\] with the same B, got alpha \(2, 2\)"):
        ops.superposed_linear(x, w, masks, torch.ones(2, 2))
