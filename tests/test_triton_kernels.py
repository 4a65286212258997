"""Triton kernels against the float64 oracle on CPU, through the Triton interpreter.

Whether triton interprets is fixed when a function is decorated: triton's own library functions
(tl.cdiv, the tl.sum combiner, ...) at ``import triton``, ours at import of the kernel module. So
this module imports the kernels with TRITON_INTERPRET=1 before anything else can, provided
triton itself is not loaded yet (or was loaded under the interpreter). If another module of this
pytest process already loaded triton for a GPU (timm/transformers do, through torch), every test
here skips and one test reruns this file in a subprocess instead, so the modes never mix. The
variable is restored after the import and only set around each test, so other test modules do
not see it.

Shapes stay small (the interpreter runs tiles in numpy); the interpreter has no bf16, which
tests/test_triton_gpu.py covers on a GPU.
"""
import inspect
import os
import subprocess
import sys


from triton_interpreter import load_interpreted_kernels, rerun_under_interpreter  # noqa: E402

_kmod, RUN_HERE = load_interpreted_kernels()

import pytest  # noqa: E402
import torch  # noqa: E402

import softtf_kernels  # noqa: E402
import softtf_kernels.triton as T  # noqa: E402
from softtf_kernels import reference as R  # noqa: E402
from softtf_kernels import table  # noqa: E402
from softtf_kernels.triton import host  # noqa: E402

from helpers import assert_close_rel, rand, rand_mask  # noqa: E402

here = pytest.mark.skipif(
    not RUN_HERE, reason="triton was loaded for a GPU in this process; test_rerun_in_subprocess runs these"
)


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    # The dispatcher reads TRITON_INTERPRET per call; outputs start as NaN (unwritten -> fail).
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("SOFTTF_POISON_OUTPUTS", "1")


@pytest.fixture(params=[False, True], ids=["masked-second", "masked-first"])
def orientation(request, monkeypatch):
    """Run masked_mm_kernel in both of its orientations (constexpr MASKED_FIRST: C, or C^T with the
    masked tile as the dot's first operand); on a GPU autotuning picks one per shape."""
    kernel = _kmod.masked_mm_kernel
    (cfg,) = _kmod.MM_CONFIGS
    one = _kmod.triton.Config({**cfg.kwargs, "MASKED_FIRST": request.param},
                              num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    monkeypatch.setattr(kernel, "configs", [one])
    monkeypatch.setattr(kernel, "cache", {})
    return request.param


def _d(t):
    return None if t is None else t.double()


# (x factory, in, out): one token, odd sizes that straddle the 32-wide interpreter tiles, 3-D,
# even K (the unmasked-K path).
SHAPES = [((1,), 67, 45), ((2, 5), 67, 45), ((3, 7), 64, 96), ((37,), 80, 33)]
DTYPES = [(torch.float32, torch.float32), (torch.float32, torch.float16),
          (torch.float16, torch.float16), (torch.float16, torch.float32)]


def _noncontig(t: torch.Tensor, kind: str) -> torch.Tensor:
    """Same values as ``t`` in a strided layout: 'T' = transposed leading dims, 'slice' = a
    column slice of a wider buffer (row stride != last dim), 'both' = both."""
    if kind == "contig":
        return t
    if kind in ("T", "both") and t.dim() >= 3:
        t = t.transpose(0, 1).contiguous().transpose(0, 1)
    if kind in ("slice", "both"):
        wide = torch.empty((*t.shape[:-1], t.shape[-1] + 5), dtype=t.dtype)
        wide[..., 2 : 2 + t.shape[-1]] = t
        t = wide[..., 2 : 2 + t.shape[-1]]
    return t


@here
@pytest.mark.parametrize("lead,fin,fout", SHAPES)
@pytest.mark.parametrize("dt,mdt", DTYPES)
def test_forward(gen, orientation, lead, fin, fout, dt, mdt):
    x = rand((*lead, fin), dt, gen)
    w, m, b = rand((fout, fin), dt, gen), rand_mask((fout, fin), mdt, gen), rand((fout,), dt, gen)
    y = T.masked_linear(x, w, m, b)
    assert y.dtype == dt and y.shape == (*lead, fout)
    assert_close_rel(y, R.masked_linear(x.double(), w.double(), m.double(), b.double()), dt, "forward")
    assert_close_rel(T.masked_linear(x, w, m), R.masked_linear(x.double(), w.double(), m.double()), dt, "no bias")


@here
@pytest.mark.parametrize("kind", ["T", "slice", "both"])
@pytest.mark.parametrize("dt", [torch.float32, torch.float16])
def test_strided_inputs(gen, orientation, kind, dt):
    """Non-contiguous x / dy (3-D transposed views, sliced rows) and transposed W and mask."""
    x = _noncontig(rand((4, 3, 67), dt, gen), kind)
    dy = _noncontig(rand((4, 3, 45), dt, gen), kind)
    w = rand((67, 45), dt, gen).T  # [45, 67] with stride (1, 45)
    m = rand_mask((67, 45), torch.float32, gen).T
    b = rand((90,), dt, gen)[::2]
    assert not x.is_contiguous() and not w.is_contiguous()
    ptr = x.data_ptr()
    y = T.masked_linear(x, w, m, b)
    assert x.data_ptr() == ptr
    assert_close_rel(y, R.masked_linear(x.double(), w.double(), m.double(), b.double()), dt, f"forward {kind}")
    assert_close_rel(T.masked_linear_grad_input(dy, w, m),
                     R.masked_linear_grad_input(dy.double(), w.double(), m.double()), dt, f"dx {kind}")
    dm = T.masked_linear_grad_mask(dy, x, w, torch.float32)
    assert_close_rel(dm, R.masked_linear_grad_mask(dy.double(), x.double(), w.double(), torch.float64),
                     dt, f"dM {kind}")


def test_rows_view_avoids_copies():
    base = torch.zeros(4, 3, 10)
    for t, flat in [(base, True), (base.transpose(0, 1), False), (base[:, :, 2:7], True),
                    (base[1:3], True), (base[:, 0], True), (base.expand(2, 4, 3, 10)[:, :, 1], False)]:
        view, rows, l1, s0, s1, is_flat = host._rows(t)
        assert view.data_ptr() == t.data_ptr() and is_flat == flat
        idx = torch.arange(rows)
        got = (idx // l1) * s0 + (idx % l1) * s1 if not is_flat else idx * s1
        want = torch.as_strided(torch.arange(base.numel()), t.shape, t.stride(), t.storage_offset())
        want = want[..., 0].reshape(-1) - t.storage_offset()
        assert torch.equal(got, want), (t.shape, t.stride())


@here
@pytest.mark.parametrize("lead,fin,fout", SHAPES)
@pytest.mark.parametrize("dt,mdt", DTYPES)
def test_grad_input(gen, orientation, lead, fin, fout, dt, mdt):
    dy = rand((*lead, fout), dt, gen)
    w, m = rand((fout, fin), dt, gen), rand_mask((fout, fin), mdt, gen)
    dx = T.masked_linear_grad_input(dy, w, m)
    assert dx.dtype == dt and dx.shape == (*lead, fin)
    assert_close_rel(dx, R.masked_linear_grad_input(dy.double(), w.double(), m.double()), dt, "dx")


@here
@pytest.mark.parametrize("lead,fin,fout", SHAPES)
@pytest.mark.parametrize("dt,mdt", DTYPES)
@pytest.mark.parametrize("split", [None, 3])
def test_grad_mask(gen, monkeypatch, lead, fin, fout, dt, mdt, split):
    if split is not None:  # force the split-K path (partials + reduce kernel)
        monkeypatch.setattr(host, "_choose_split", lambda *a: split)
    x, dy = rand((*lead, fin), dt, gen), rand((*lead, fout), dt, gen)
    w = rand((fout, fin), dt, gen)
    dm = T.masked_linear_grad_mask(dy, x, w, mdt)
    assert dm.dtype == mdt and dm.shape == (fout, fin)
    ref = R.masked_linear_grad_mask(dy.double(), x.double(), w.double(), torch.float64)
    assert_close_rel(dm, ref, mdt if dt == torch.float32 else dt, "dM")


@here
def test_split_covers_long_token_runs(gen, monkeypatch):
    # 300 tokens in 3 chunks of 128 (the last one short): every token counted exactly once.
    monkeypatch.setattr(host, "_choose_split", lambda *a: 3)
    x, dy, w = rand((300, 20), torch.float32, gen), rand((300, 12), torch.float32, gen), rand((12, 20), torch.float32, gen)
    ref = R.masked_linear_grad_mask(dy.double(), x.double(), w.double(), torch.float64)
    assert_close_rel(T.masked_linear_grad_mask(dy, x, w, torch.float32), ref, torch.float32, "dM split")


@here
@pytest.mark.parametrize("lead,fin,fout", [((2, 5), 67, 45), ((3, 1), 40, 70), ((4,), 33, 17)])
@pytest.mark.parametrize("dt,mdt", DTYPES)
@pytest.mark.parametrize("per_sample", [False, True])
def test_mask_mixture_grad(gen, lead, fin, fout, dt, mdt, per_sample):
    n_tasks = 3
    x, dy = rand((*lead, fin), dt, gen), rand((*lead, fout), dt, gen)
    w, masks = rand((fout, fin), dt, gen), rand_mask((n_tasks, fout, fin), mdt, gen)
    got = T.mask_mixture_grad(dy, x, w, masks, per_sample)
    ref = R.mask_mixture_grad(dy.double(), x.double(), w.double(), masks.double(), per_sample)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert_close_rel(got, ref, dt, "mixture grad")


@here
@pytest.mark.parametrize("dt", [torch.float32, torch.float16])
def test_mask_mixture_grad_strided(gen, dt):
    x = _noncontig(rand((3, 4, 50), dt, gen), "both")
    dy = _noncontig(rand((3, 4, 40), dt, gen), "T")
    w, masks = rand((40, 50), dt, gen), rand_mask((2, 40, 50), torch.float16, gen)
    for per_sample in (False, True):
        ref = R.mask_mixture_grad(dy.double(), x.double(), w.double(), masks.double(), per_sample)
        assert_close_rel(T.mask_mixture_grad(dy, x, w, masks, per_sample), ref, dt, f"mixture {per_sample}")


@here
@pytest.mark.parametrize("lead,fin,fout", [((3, 5), 67, 45), ((4,), 40, 70), ((2, 3, 2), 33, 17)])
@pytest.mark.parametrize("dt,mdt", DTYPES)
def test_mixed_task(gen, orientation, lead, fin, fout, dt, mdt):
    n_tasks = 3
    x, dy = rand((*lead, fin), dt, gen), rand((*lead, fout), dt, gen)
    w, b = rand((fout, fin), dt, gen), rand((fout,), dt, gen)
    masks = rand_mask((n_tasks, fout, fin), mdt, gen)
    tid = torch.randint(0, n_tasks, (lead[0],), generator=gen)
    tid[0] = n_tasks - 1
    for ids in (tid, tid.int()):
        y = T.mixed_task_linear(x, w, masks, ids, b)
        assert y.dtype == dt and y.shape == (*lead, fout)
        ref = R.mixed_task_linear(x.double(), w.double(), masks.double(), ids, b.double())
        assert_close_rel(y, ref, dt, "mixed forward")
        dx = T.mixed_task_linear_grad_input(dy, w, masks, ids)
        assert_close_rel(dx, R.mixed_task_linear_grad_input(dy.double(), w.double(), masks.double(), ids), dt,
                         "mixed dx")
    xs = _noncontig(x, "both")
    assert_close_rel(T.mixed_task_linear(xs, w, masks, tid),
                     R.mixed_task_linear(xs.double(), w.double(), masks.double(), tid), dt, "mixed strided")


@here
def test_mask_zeros_prune_exactly(gen):
    # A zero mask entry removes its weight entirely, even when the weight is huge.
    x = rand((5, 40), torch.float32, gen)
    w = rand((24, 40), torch.float32, gen)
    m = torch.ones(24, 40)
    m[:, 37:] = 0
    w[:, 37:] = 1e30
    y = T.masked_linear(x, w, m)
    assert_close_rel(y, x[:, :37].double() @ w[:, :37].double().T, torch.float32, "pruned")


@here
def test_outputs_fully_written(gen):
    # Poisoned allocation: every output element must be overwritten by the kernels.
    x, dy = rand((2, 3, 67), torch.float16, gen), rand((2, 3, 45), torch.float16, gen)
    w, m = rand((45, 67), torch.float16, gen), rand_mask((45, 67), torch.float16, gen)
    masks = rand_mask((2, 45, 67), torch.float32, gen)
    outs = [T.masked_linear(x, w, m), T.masked_linear_grad_input(dy, w, m),
            T.masked_linear_grad_mask(dy, x, w, torch.float32), T.mask_mixture_grad(dy, x, w, masks, True),
            T.mixed_task_linear(x, w, masks, torch.tensor([1, 0]))]
    for out in outs:
        assert not torch.isnan(out).any()


@here
def test_empty_inputs():
    w, m = torch.randn(5, 4), torch.rand(5, 4)
    assert T.masked_linear(torch.randn(0, 4), w, m).shape == (0, 5)
    assert T.masked_linear_grad_input(torch.randn(2, 0, 5), w, m).shape == (2, 0, 4)
    assert torch.equal(T.masked_linear_grad_mask(torch.randn(0, 5), torch.randn(0, 4), w, torch.float32),
                       torch.zeros(5, 4))
    assert torch.equal(T.mask_mixture_grad(torch.randn(0, 5), torch.randn(0, 4), w, m[None], False), torch.zeros(1))
    b = torch.randn(3)
    y = T.masked_linear(torch.randn(2, 0), torch.randn(3, 0), torch.rand(3, 0), b)
    assert torch.equal(y, b.expand(2, 3))


def test_unsupported_dtype_names_the_argument():
    w, m = torch.randn(5, 4, dtype=torch.float64), torch.rand(5, 4)
    with pytest.raises(TypeError, match="masked_linear: x must be float32, float16 or bfloat16"):
        T.masked_linear(torch.randn(2, 4, dtype=torch.float64), w, m)
    with pytest.raises(TypeError, match="mask must be float32"):
        T.masked_linear_grad_input(torch.randn(2, 5), torch.randn(5, 4), m.double())
    with pytest.raises(TypeError, match="mask_dtype must be float32"):
        T.masked_linear_grad_mask(torch.randn(2, 5), torch.randn(2, 4), torch.randn(5, 4), torch.float64)
    with pytest.raises(TypeError, match="masks must be float32"):
        T.mask_mixture_grad(torch.randn(2, 5), torch.randn(2, 4), torch.randn(5, 4), m[None].double(), False)
    with pytest.raises(TypeError, match="bfloat16"):
        if RUN_HERE:  # the interpreter refuses bf16 clearly instead of computing garbage
            T.masked_linear(torch.randn(2, 4).bfloat16(), torch.randn(5, 4).bfloat16(), m)
        else:
            raise TypeError("bfloat16 (GPU build: covered in test_triton_gpu.py)")


def test_kernels_take_the_op_signatures():
    # One Triton function per op of the table, which the dispatcher calls with the op's arguments.
    for name in table.NAMES:
        schema = [a.name for a in getattr(torch.ops.softtf, name).default._schema.arguments]
        assert list(inspect.signature(getattr(T, name)).parameters) == schema, name


def test_fp32_precision_switch():
    assert T.get_fp32_precision() in ("ieee", "tf32", "tf32x3")
    before = T.get_fp32_precision()
    try:
        T.set_fp32_precision("TF32")
        assert T.get_fp32_precision() == "tf32"
        with pytest.raises(ValueError, match="ieee, tf32, tf32x3"):
            T.set_fp32_precision("fp16")
    finally:
        T.set_fp32_precision(before)
    env = dict(os.environ, SOFTTF_TRITON_FP32_PRECISION="bogus", TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", "import torch, softtf_kernels.triton as T; T.masked_linear"],
                          env=env, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode != 0 and "SOFTTF_TRITON_FP32_PRECISION must be one of" in proc.stderr


# ----------------------------------------------------------------- through torch.ops + autograd
@here
@pytest.mark.parametrize("dt,mdt", DTYPES)
def test_ops_and_autograd_route_to_triton(gen, monkeypatch, dt, mdt):
    calls = []
    for name in ("masked_linear", "masked_linear_grad_input", "masked_linear_grad_mask"):
        fn = getattr(host, name)
        monkeypatch.setattr(T, name, lambda *a, _fn=fn, _n=name: calls.append(_n) or _fn(*a), raising=False)
    softtf_kernels.set_backend("triton")
    x = rand((2, 5, 67), dt, gen).requires_grad_()
    w = rand((45, 67), dt, gen)
    m = rand_mask((45, 67), mdt, gen).requires_grad_()
    b = rand((45,), dt, gen).requires_grad_()
    y = torch.ops.softtf.masked_linear(x, w, m, b)
    dy = rand(y.shape, dt, gen)
    y.backward(dy)
    assert calls == ["masked_linear", "masked_linear_grad_input", "masked_linear_grad_mask"]

    xd, md, bd = x.detach().double().requires_grad_(), m.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    yd = R.masked_linear(xd, w.double(), md, bd)
    yd.backward(dy.double())
    assert_close_rel(y, yd, dt, "op forward")
    assert x.grad.dtype == dt and m.grad.dtype == mdt
    assert_close_rel(x.grad, xd.grad, dt, "op dx")
    assert_close_rel(m.grad, md.grad, mdt if dt == torch.float32 else dt, "op dM")
    assert_close_rel(b.grad, bd.grad, dt, "op db")


@here
def test_gradient_id_ops_route_to_triton(gen):
    softtf_kernels.set_backend("triton")
    x, dy = rand((3, 4, 40), torch.float32, gen), rand((3, 4, 24), torch.float32, gen)
    w, masks = rand((24, 40), torch.float32, gen), rand_mask((2, 24, 40), torch.float16, gen)
    tid = torch.tensor([1, 0, 1])
    got = torch.ops.softtf.mask_mixture_grad(dy, x, w, masks, True)
    assert_close_rel(got, R.mask_mixture_grad(dy.double(), x.double(), w.double(), masks.double(), True),
                     torch.float32, "op mixture")
    xr = x.clone().requires_grad_()
    y = torch.ops.softtf.mixed_task_linear(xr, w, masks, tid)
    y.backward(dy)
    xd = x.double().requires_grad_()
    yd = R.mixed_task_linear(xd, w.double(), masks.double(), tid)
    yd.backward(dy.double())
    assert_close_rel(y, yd, torch.float32, "op mixed forward")
    assert_close_rel(xr.grad, xd.grad, torch.float32, "op mixed dx")


# ----------------------------------------------------------------- subprocess fallback
@here
@pytest.mark.parametrize("ids", ["strided", "expanded"])
def test_mixed_task_honours_task_ids_strides(gen, ids):
    """task_ids is read at its strides: [0,0,1,1][::2] is tasks 0,1 (not 0,0), and a stride-0
    expansion of one id reads that one element (not past the storage)."""
    task_ids = torch.tensor([0, 0, 1, 1])[::2] if ids == "strided" else torch.tensor([1]).expand(4)
    B = task_ids.shape[0]
    x, dy = rand((B, 3, 33), torch.float32, gen), rand((B, 3, 17), torch.float32, gen)
    w, masks = rand((17, 33), torch.float32, gen), rand_mask((2, 17, 33), torch.float32, gen)
    b = rand((17,), torch.float32, gen)
    d = lambda t: t.double()  # noqa: E731
    assert_close_rel(T.mixed_task_linear(x, w, masks, task_ids, b),
                     R.mixed_task_linear(d(x), d(w), d(masks), task_ids, d(b)), torch.float32, "forward")
    assert_close_rel(T.mixed_task_linear_grad_input(dy, w, masks, task_ids),
                     R.mixed_task_linear_grad_input(d(dy), d(w), d(masks), task_ids), torch.float32, "dx")


@here
@pytest.mark.parametrize("op", ["masked_linear", "mixed_task_linear"])
def test_fp64_mask_routes_forward_and_backward_alike(gen, op):
    """An fp64 mask on fp32 weights: forward goes to the reference, and so must every backward op
    (grad_mask is keyed on its mask_dtype argument), instead of Triton raising TypeError."""
    softtf_kernels.set_backend("triton")
    x = rand((2, 3, 8), torch.float32, gen).requires_grad_()
    w, b = rand((5, 8), torch.float32, gen), rand((5,), torch.float32, gen).requires_grad_()
    if op == "masked_linear":
        m = rand_mask((5, 8), torch.float64, gen).requires_grad_()
        y = torch.ops.softtf.masked_linear(x, w, m, b)
        ref = lambda xx, mm, bb: R.masked_linear(xx.double(), w.double(), mm, bb.double())  # noqa: E731
    else:
        m = rand_mask((2, 5, 8), torch.float64, gen).requires_grad_()
        ids = torch.tensor([1, 0])
        y = torch.ops.softtf.mixed_task_linear(x, w, m, ids, b)
        ref = lambda xx, mm, bb: R.mixed_task_linear(xx.double(), w.double(), mm, ids, bb.double())  # noqa: E731
    dy = rand(y.shape, torch.float32, gen)
    y.backward(dy)
    xr, mr, br = (t.detach().double().requires_grad_() for t in (x, m, b))
    ref(xr, mr, br).backward(dy.double())
    for got, want, what in [(x.grad, xr.grad, "dx"), (m.grad, mr.grad, "dM"), (b.grad, br.grad, "db")]:
        assert got.dtype == want.dtype or what != "dM"
        assert_close_rel(got, want, torch.float32, what)


@pytest.mark.skipif(RUN_HERE, reason="kernels run in this process under the interpreter")
def test_rerun_in_subprocess():
    rerun_under_interpreter(__file__)



@pytest.mark.parametrize("major,limit", [(9, 232448), (8, 166912)])
def test_autotune_pruning_of_the_gpu_config_lists(monkeypatch, major, limit):
    """The GPU config lists (not used by the interpreter) pruned for an H100 / A100."""
    import softtf_kernels.triton.kernels as K  # the config lists and pruner need no interpreter

    monkeypatch.setattr(K, "_device_info", lambda t: (limit, major))

    def args(dt, mdt, rows, n, k):
        e = lambda d: torch.empty(1, dtype=d)  # noqa: E731
        return {"a_ptr": e(dt), "w_ptr": e(dt), "m_ptr": e(mdt), "ROWS": rows, "N": n, "K": k}

    all_mm = K._MM_CONFIGS_16 + K._MM_CONFIGS_32
    kept = K._mm_prune(all_mm, args(torch.bfloat16, torch.bfloat16, 12608, 2304, 768))
    assert kept and all(c in K._MM_CONFIGS_16 for c in kept)
    assert all(K._mm_smem(c, 2, 2, 2, major) <= limit for c in kept)
    big = [c for c in kept if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > 128 * 128]
    assert bool(big) == (major >= 9)  # 128x256 tiles only where wgmma keeps them spill-free
    kept32 = K._mm_prune(all_mm, args(torch.float32, torch.float32, 12608, 768, 768))
    assert kept32 and all(c in K._MM_CONFIGS_32 for c in kept32)
    few = K._mm_prune(all_mm, args(torch.float16, torch.float32, 3, 2304, 768))
    assert few and all(c.kwargs["BLOCK_M"] == 16 for c in few)
    tiny = K._mm_prune(all_mm, args(torch.float16, torch.float16, 1, 8, 8))
    assert len(tiny) == 1  # nothing fits the extents: the smallest tile of the right width
    gm = K._gm_prune(K._GM_CONFIGS_16 + K._GM_CONFIGS_32,
                     {"x_ptr": torch.empty(1, dtype=torch.bfloat16), "w_ptr": torch.empty(1, dtype=torch.bfloat16),
                      "N": 768, "K": 768, "CHUNK": 3200})
    assert gm and all(c in K._GM_CONFIGS_16 for c in gm)
