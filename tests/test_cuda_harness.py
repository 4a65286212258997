"""The CUDA kernels' own source lines, run on the CPU against the float64 oracle.

csrc/cuda/tile_gemm.cuh holds the whole per-block code of every CUDA kernel (index computation,
bounds-checked tile loads, the masked staging of W ⊙ M, the MMA/FMA loop, the epilogues) as
templates over an execution context. tests/cuda_harness/ compiles those same templates with the
host C++ compiler into a small shared library whose context runs each block's CUDA threads as
fibers, phase by phase between __syncthreads in a shuffled order (or, with
SOFTTF_HARNESS_THREADS=1, as one std::thread each with a std::barrier), with poisoned shared
memory, an emulation of the WMMA fragment API for the tensor-core step, and the same host-side
planning (csrc/cuda/plan.h) as the torch binding. This file drives it over odd shapes, tails, unaligned buffers and every
dtype pair, int8 masks (softtf_kernels.quant) included, and shows that a planted tail-bound bug
(-DSOFTTF_PLANT_BUG) is caught.

Needs a C++20 compiler (g++ or clang++, or $CXX); skipped only when none is found.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from softtf_kernels import reference as R
from softtf_kernels.quant import quantize_mask

from helpers import KERNEL_DTYPE_PAIRS, TOL, assert_close_rel, rand, rand_mask
from test_int8_masks import oracle_mask as _q, soft_mask  # a trained-looking mask, its float64 oracle

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / "tests" / "cuda_harness" / "harness.cpp"
CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3, torch.int8: 4}


def _compiler() -> str | None:
    for cand in (os.environ.get("CXX"), "g++", "clang++", "c++"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


# Harness variants: the real kernels, and two with a deliberately planted defect.
VARIANTS = {"ok": [], "bug": ["-DSOFTTF_PLANT_BUG"], "race": ["-DSOFTTF_PLANT_RACE"]}


def _build_cmd(out_dir: Path, name: str) -> tuple[list[str], Path]:
    lib = out_dir / f"libsofttf_harness_{name}.so"
    cmd = [_compiler(), *VARIANTS[name], "-std=c++20", "-O2", "-shared", "-fPIC", "-pthread", "-Wall",
           "-Wno-unknown-pragmas", "-I", str(ROOT / "csrc"), "-I", str(HARNESS.parent), str(HARNESS),
           "-o", str(lib)]
    return cmd, lib


def _build_all(out_dir: Path) -> dict[str, ctypes.CDLL]:
    """Builds the harness and its planted-defect variants (in parallel) and loads them."""
    jobs = {name: _build_cmd(out_dir, name) for name in VARIANTS}
    procs = {name: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, (cmd, _) in jobs.items()}
    libs = {}
    for name, proc in procs.items():
        _, err = proc.communicate()
        cmd, lib = jobs[name]
        assert proc.returncode == 0, f"harness build failed:\n{' '.join(cmd)}\n{err}"
        libs[name] = _bind(ctypes.CDLL(str(lib)))
    return libs


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    P, I64, INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    sig = {
        "sth_masked_linear": [INT, INT, P, P, P, P, P, I64, I64, I64],
        "sth_grad_input": [INT, INT, P, P, P, P, I64, I64, I64],
        "sth_grad_mask": [INT, INT, P, P, P, P, I64, I64, I64],
        "sth_mixed_linear": [INT, INT, P, P, P, P, INT, P, P, I64, I64, I64, I64],
        "sth_mixed_grad_input": [INT, INT, P, P, P, P, INT, P, I64, I64, I64, I64],
        "sth_mixture": [INT, INT, P, P, P, P, INT, I64, I64, I64, I64, P],
        "sth_round_f16": [P, P, I64],
        "sth_round_bf16": [P, P, I64],
        "sth_widen_f16": [P, P, I64],
    }
    for name, args in sig.items():
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = None if name.startswith(("sth_round", "sth_widen")) else INT
    lib.sth_last_vec.restype = INT
    lib.sth_planted_bug.restype = INT
    return lib


@pytest.fixture(scope="session")
def libs(tmp_path_factory):
    if _compiler() is None:
        pytest.skip("no C++ compiler (g++/clang++/$CXX) to build the CUDA-kernel CPU harness")
    return _build_all(tmp_path_factory.mktemp("cuda_harness"))


@pytest.fixture(scope="session")
def lib(libs):
    return libs["ok"]


# ----------------------------------------------------------------------------- buffers
def _buf(src: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """A contiguous copy of src whose data starts `offset` elements into a fresh allocation
    (offset 1 makes every row start unaligned for 16-byte loads)."""
    flat = torch.empty(src.numel() + offset, dtype=src.dtype)
    out = flat[offset:].view(src.shape)
    out.copy_(src)
    return out


def _poisoned(shape, dtype, offset: int = 0) -> torch.Tensor:
    return _buf(torch.full(shape, float("nan"), dtype=dtype), offset)


def _p(t):
    return ctypes.c_void_p(0 if t is None else t.data_ptr())


def _tol_dtype(*dts):
    return max(dts, key=lambda d: TOL[d])


# ----------------------------------------------------------------------------- op wrappers
# An int8 mask's buffer is its bytes (offset 1: one byte, so its rows and tails are unaligned).
def h_masked_linear(lib, x, w, m, b=None, offset=0):
    out_f, in_f = w.shape
    xs, ws, ms = _buf(x, offset), _buf(w, offset), _buf(m, offset)
    bs = None if b is None else _buf(b, offset)
    y = _poisoned((*x.shape[:-1], out_f), x.dtype, offset)
    rc = lib.sth_masked_linear(CODE[x.dtype], CODE[m.dtype], _p(xs), _p(ws), _p(ms), _p(bs), _p(y),
                               x.numel() // in_f, out_f, in_f)
    assert rc == 0
    return y


def h_grad_input(lib, dy, w, m, offset=0):
    out_f, in_f = w.shape
    dys, ws, ms = _buf(dy, offset), _buf(w, offset), _buf(m, offset)
    dx = _poisoned((*dy.shape[:-1], in_f), dy.dtype, offset)
    rc = lib.sth_grad_input(CODE[dy.dtype], CODE[m.dtype], _p(dys), _p(ws), _p(ms), _p(dx),
                            dy.numel() // out_f, out_f, in_f)
    assert rc == 0
    return dx


def h_grad_mask(lib, dy, x, w, mask_dtype, offset=0):
    out_f, in_f = w.shape
    dys, xs, ws = _buf(dy, offset), _buf(x, offset), _buf(w, offset)
    dm = _poisoned((out_f, in_f), mask_dtype, offset)
    rc = lib.sth_grad_mask(CODE[x.dtype], CODE[mask_dtype], _p(dys), _p(xs), _p(ws), _p(dm),
                           x.numel() // in_f, out_f, in_f)
    assert rc == 0
    return dm


def h_mixed_linear(lib, x, w, masks, ids, b=None, offset=0):
    out_f, in_f = w.shape
    xs, ws, ms = _buf(x, offset), _buf(w, offset), _buf(masks, offset)
    bs = None if b is None else _buf(b, offset)
    y = _poisoned((*x.shape[:-1], out_f), x.dtype, offset)
    batch = x.shape[0]
    rc = lib.sth_mixed_linear(CODE[x.dtype], CODE[masks.dtype], _p(xs), _p(ws), _p(ms), _p(ids),
                              int(ids.dtype == torch.int64), _p(bs), _p(y), batch,
                              x.numel() // (in_f * batch), out_f, in_f)
    assert rc == 0
    return y


def h_mixed_grad_input(lib, dy, w, masks, ids, offset=0):
    out_f, in_f = w.shape
    dys, ws, ms = _buf(dy, offset), _buf(w, offset), _buf(masks, offset)
    dx = _poisoned((*dy.shape[:-1], in_f), dy.dtype, offset)
    batch = dy.shape[0]
    rc = lib.sth_mixed_grad_input(CODE[dy.dtype], CODE[masks.dtype], _p(dys), _p(ws), _p(ms), _p(ids),
                                  int(ids.dtype == torch.int64), _p(dx), batch,
                                  dy.numel() // (out_f * batch), out_f, in_f)
    assert rc == 0
    return dx


def h_mixture(lib, dy, x, w, masks, per_sample, offset=0):
    out_f, in_f = w.shape
    dys, xs, ws, ms = _buf(dy, offset), _buf(x, offset), _buf(w, offset), _buf(masks, offset)
    batch = x.shape[0] if per_sample else 1
    t = masks.shape[0]
    out = _poisoned((batch, t), torch.float32)
    rc = lib.sth_mixture(CODE[x.dtype], CODE[masks.dtype], _p(dys), _p(xs), _p(ws), _p(ms), t, batch,
                         x.numel() // (in_f * batch), out_f, in_f, _p(out))
    assert rc == 0
    return out if per_sample else out.view(t)


def _d(t):
    return None if t is None else t.double()


# ----------------------------------------------------------------------------- cases
# (leading dims, in, out): 1 / 7 / 197 tokens, K and N tails (67, 257, 45, 129), 3-D x, and one
# aligned multiple-of-16 shape that takes the 16-byte vector path.
SHAPES = [((1,), 67, 45), ((7,), 257, 129), ((197,), 67, 129), ((2, 5), 257, 45), ((3, 4), 64, 128)]
DTYPES = KERNEL_DTYPE_PAIRS  # (x / weight dtype, mask dtype)


@pytest.mark.parametrize("lead,fin,fout", SHAPES)
@pytest.mark.parametrize("dt,mdt", DTYPES)
def test_forward(lib, gen, lead, fin, fout, dt, mdt):
    x, w = rand((*lead, fin), dt, gen), rand((fout, fin), dt, gen)
    m, b = rand_mask((fout, fin), mdt, gen), rand((fout,), dt, gen)
    y = h_masked_linear(lib, x, w, m, b)
    assert_close_rel(y, R.masked_linear(_d(x), _d(w), _d(m), _d(b)), _tol_dtype(dt, mdt), "forward")
    y0 = h_masked_linear(lib, x, w, m, None, offset=1)  # unaligned rows: scalar load path
    assert lib.sth_last_vec() == 0
    assert_close_rel(y0, R.masked_linear(_d(x), _d(w), _d(m)), _tol_dtype(dt, mdt), "forward, unaligned")


@pytest.mark.parametrize("lead,fin,fout", SHAPES)
@pytest.mark.parametrize("dt,mdt", DTYPES)
def test_grad_input(lib, gen, lead, fin, fout, dt, mdt):
    dy, w, m = rand((*lead, fout), dt, gen), rand((fout, fin), dt, gen), rand_mask((fout, fin), mdt, gen)
    dx = h_grad_input(lib, dy, w, m)
    assert_close_rel(dx, R.masked_linear_grad_input(_d(dy), _d(w), _d(m)), _tol_dtype(dt, mdt), "dx")


@pytest.mark.parametrize("lead,fin,fout", SHAPES)
@pytest.mark.parametrize("dt,mdt", DTYPES + [(torch.float32, torch.float64)])
def test_grad_mask(lib, gen, lead, fin, fout, dt, mdt):
    dy, x, w = rand((*lead, fout), dt, gen), rand((*lead, fin), dt, gen), rand((fout, fin), dt, gen)
    dm = h_grad_mask(lib, dy, x, w, mdt, offset=1 if lead == (7,) else 0)
    assert dm.dtype == mdt
    ref = R.masked_linear_grad_mask(_d(dy), _d(x), _d(w), torch.float64)
    assert_close_rel(dm, ref, _tol_dtype(dt, mdt if mdt != torch.float64 else dt), "dM")


def test_vector_path_is_taken(lib, gen):
    """Aligned rows of a multiple-of-16-byte width take the vector loads; odd widths do not."""
    x, w, m = rand((5, 64), torch.float16, gen), rand((128, 64), torch.float16, gen), rand_mask((128, 64), torch.float32, gen)
    y = h_masked_linear(lib, x, w, m)
    assert lib.sth_last_vec() == 7  # x, W and the mask (its own flag: 16-byte loads of W need not wait for it)
    assert_close_rel(y, R.masked_linear(_d(x), _d(w), _d(m)), torch.float16, "vector path")
    h_masked_linear(lib, rand((5, 67), torch.float16, gen), rand((128, 67), torch.float16, gen),
                    rand_mask((128, 67), torch.float32, gen))
    assert lib.sth_last_vec() == 0
    dm = h_grad_mask(lib, rand((3, 40), torch.float32, gen), rand((3, 36), torch.float32, gen),
                     rand((40, 36), torch.float32, gen), torch.float32)
    assert lib.sth_last_vec() == 3 and torch.isfinite(dm).all()


MIX_SHAPES = [((3, 7), 67, 45), ((2, 197), 257, 129), ((4, 1, 3), 64, 128), ((1, 5), 33, 17)]


@pytest.mark.parametrize("lead,fin,fout", MIX_SHAPES)
@pytest.mark.parametrize("dt,mdt", DTYPES[::2] + [(torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
def test_mixed_task(lib, gen, lead, fin, fout, dt, mdt, id_dtype):
    n_tasks = 3
    x, w = rand((*lead, fin), dt, gen), rand((fout, fin), dt, gen)
    masks, b = rand_mask((n_tasks, fout, fin), mdt, gen), rand((fout,), dt, gen)
    ids = torch.randint(0, n_tasks, (lead[0],), generator=gen).to(id_dtype)
    tol = _tol_dtype(dt, mdt)
    y = h_mixed_linear(lib, x, w, masks, ids, b)
    assert_close_rel(y, R.mixed_task_linear(_d(x), _d(w), _d(masks), ids, _d(b)), tol, "mixed forward")
    dy = rand((*lead, fout), dt, gen)
    dx = h_mixed_grad_input(lib, dy, w, masks, ids, offset=1)
    assert_close_rel(dx, R.mixed_task_linear_grad_input(_d(dy), _d(w), _d(masks), ids), tol, "mixed dx")


@pytest.mark.parametrize("lead,fin,fout", MIX_SHAPES)
@pytest.mark.parametrize("dt,mdt", DTYPES[::2] + [(torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("per_sample", [False, True])
def test_mask_mixture_grad(lib, gen, lead, fin, fout, dt, mdt, per_sample):
    n_tasks = 4
    dy, x = rand((*lead, fout), dt, gen), rand((*lead, fin), dt, gen)
    w, masks = rand((fout, fin), dt, gen), rand_mask((n_tasks, fout, fin), mdt, gen)
    g = h_mixture(lib, dy, x, w, masks, per_sample, offset=1 if fin == 67 else 0)
    ref = R.mask_mixture_grad(_d(dy), _d(x), _d(w), _d(masks), per_sample)
    assert g.shape == ref.shape and g.dtype == torch.float32
    assert_close_rel(g, ref, _tol_dtype(dt, mdt), "mixture scores")


def test_mask_mixture_grad_single_task_equals_grad_mask_sum(lib, gen):
    """With one all-ones mask the score is Σ dM: ties the mixture epilogue to the dM kernel."""
    dy, x, w = rand((9, 45), torch.float32, gen), rand((9, 67), torch.float32, gen), rand((45, 67), torch.float32, gen)
    g = h_mixture(lib, dy, x, w, torch.ones(1, 45, 67), per_sample=False)
    dm = h_grad_mask(lib, dy, x, w, torch.float32)
    torch.testing.assert_close(g[0].double(), dm.double().sum(), rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------- int8 masks
# One int8 tensor [.., out, in + 8] per mask (codes, then the row's fp32 scale and offset), read by
# the kernels as it is and dequantized in registers; the oracle gets dequantize_mask in float64.
Q_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# SHAPES, plus rows of 128, 32 and 44 bytes: the mask's chunk-vector path (in = 36: for fp32 only,
# its tails 4- but not 8-byte aligned).
Q_SHAPES = SHAPES + [((9,), 120, 70), ((5,), 24, 33), ((3,), 36, 20)]


@pytest.mark.parametrize("lead,fin,fout", Q_SHAPES)
@pytest.mark.parametrize("dt", Q_DTYPES)
def test_int8_mask_forward_and_grad_input(lib, gen, lead, fin, fout, dt):
    x, w, b = rand((*lead, fin), dt, gen), rand((fout, fin), dt, gen), rand((fout,), dt, gen)
    q = quantize_mask(soft_mask((fout, fin), gen))
    ref = R.masked_linear(_d(x), _d(w), _q(q), _d(b))
    assert_close_rel(h_masked_linear(lib, x, w, q, b), ref, dt, "int8 forward")
    chunk = 16 // x.element_size()  # an int8 mask chunk: one code per element of a 16-byte x chunk
    assert bool(lib.sth_last_vec() & 4) == ((fin + 8) % chunk == 0)
    y0 = h_masked_linear(lib, x, w, q, b, offset=1)  # every row and tail unaligned: byte-wise reads
    assert lib.sth_last_vec() == 0
    assert_close_rel(y0, ref, dt, "int8 forward, unaligned")
    dy = rand((*lead, fout), dt, gen)
    ref = R.masked_linear_grad_input(_d(dy), _d(w), _q(q))
    for offset in (0, 1):
        assert_close_rel(h_grad_input(lib, dy, w, q, offset), ref, dt, f"int8 dx, offset {offset}")


@pytest.mark.parametrize("lead,fin,fout", MIX_SHAPES)
@pytest.mark.parametrize("dt", Q_DTYPES)
def test_int8_mixed_task(lib, gen, lead, fin, fout, dt):
    x, w, b = rand((*lead, fin), dt, gen), rand((fout, fin), dt, gen), rand((fout,), dt, gen)
    qs = quantize_mask(soft_mask((5, fout, fin), gen))[1:4]  # three tasks of a bigger stack
    ids = torch.randint(0, 3, (lead[0],), generator=gen).to(torch.int32 if dt == torch.float16 else torch.int64)
    y = h_mixed_linear(lib, x, w, qs, ids, b)
    assert_close_rel(y, R.mixed_task_linear(_d(x), _d(w), _q(qs), ids, _d(b)), dt, "int8 mixed forward")
    dy = rand((*lead, fout), dt, gen)
    dx = h_mixed_grad_input(lib, dy, w, qs, ids, offset=1)
    assert_close_rel(dx, R.mixed_task_linear_grad_input(_d(dy), _d(w), _q(qs), ids), dt, "int8 mixed dx")


@pytest.mark.parametrize("lead,fin,fout", MIX_SHAPES)
@pytest.mark.parametrize("dt", Q_DTYPES)
@pytest.mark.parametrize("per_sample", [False, True])
def test_int8_mask_mixture_grad(lib, gen, lead, fin, fout, dt, per_sample):
    dy, x, w = rand((*lead, fout), dt, gen), rand((*lead, fin), dt, gen), rand((fout, fin), dt, gen)
    qs = quantize_mask(soft_mask((4, fout, fin), gen))
    g = h_mixture(lib, dy, x, w, qs, per_sample, offset=1 if fin == 67 else 0)
    assert bool(lib.sth_last_vec() & 4) == (fin == 64)  # tails read as words where 4-byte aligned
    ref = R.mask_mixture_grad(_d(dy), _d(x), _d(w), _q(qs), per_sample)
    assert g.shape == ref.shape and g.dtype == torch.float32
    assert_close_rel(g, ref, dt, "int8 mixture scores")


# ----------------------------------------------------------------------------- the harness itself
@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16])
def test_os_thread_mode(lib, gen, monkeypatch, dt):
    """The same kernels with one real std::thread per CUDA thread and a std::barrier for
    __syncthreads (true concurrency between barriers) instead of the default fibers."""
    monkeypatch.setenv("SOFTTF_HARNESS_THREADS", "1")
    x, w, m = rand((70, 67), dt, gen), rand((45, 67), dt, gen), rand_mask((45, 67), torch.float16, gen)
    assert_close_rel(h_masked_linear(lib, x, w, m), R.masked_linear(_d(x), _d(w), _d(m)), dt, "threads fwd")
    dy = rand((70, 45), dt, gen)
    assert_close_rel(h_grad_mask(lib, dy, x, w, torch.float32),
                     R.masked_linear_grad_mask(_d(dy), _d(x), _d(w), torch.float64), dt, "threads dM")
    masks = rand_mask((3, 45, 67), torch.float32, gen)
    assert_close_rel(h_mixture(lib, dy.view(2, 35, 45), x.view(2, 35, 67), w, masks, True),
                     R.mask_mixture_grad(_d(dy.view(2, 35, 45)), _d(x.view(2, 35, 67)), _d(w), _d(masks), True),
                     dt, "threads mixture")


def test_soft_half_types_are_bit_exact(lib, gen):
    """The harness's software fp16/bf16 round exactly as torch (and __float2half_rn) do."""
    v = torch.cat([
        torch.randn(20000, generator=gen, dtype=torch.float64).float() * 10.0 ** torch.randint(-9, 6, (20000,), generator=gen),
        torch.tensor([0.0, -0.0, 65504.0, 65519.0, 65520.0, 1e-8, 2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -26,
                      float("inf"), -float("inf"), 1e30, -1e-30, 1.0 + 2.0 ** -11, 1.0 + 3 * 2.0 ** -11]),
    ]).float().contiguous()
    for fn, dt in ((lib.sth_round_f16, torch.float16), (lib.sth_round_bf16, torch.bfloat16)):
        out = torch.empty(v.shape, dtype=torch.int16)
        fn(_p(v), _p(out), v.numel())
        assert torch.equal(out, v.to(dt).view(torch.int16)), f"{dt} rounding differs from torch"
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    wide = torch.empty(bits.shape, dtype=torch.float32)
    lib.sth_widen_f16(_p(bits), _p(wide), bits.numel())
    ref = bits.view(torch.float16).float()
    same = (wide == ref) | (wide.isnan() & ref.isnan())
    assert bool(same.all())


def test_planted_tail_bug_is_caught(libs, gen):
    """-DSOFTTF_PLANT_BUG drops the last element of every partial (tail) chunk in the tile loader.
    The harness must then disagree with the oracle on odd shapes, while shapes without tails
    still agree (the bug is exactly a tail-bound bug)."""
    ok, bug = libs["ok"], libs["bug"]
    assert ok.sth_planted_bug() == 0 and bug.sth_planted_bug() == 1
    for dt in (torch.float32, torch.float16):
        x, w = rand((7, 67), dt, gen), rand((45, 67), dt, gen)
        m = rand_mask((45, 67), torch.float32, gen)
        ref = R.masked_linear(_d(x), _d(w), _d(m))
        assert_close_rel(h_masked_linear(ok, x, w, m), ref, dt, "correct build")
        with pytest.raises(AssertionError, match="max error"):
            assert_close_rel(h_masked_linear(bug, x, w, m), ref, dt, "planted bug")
        dy = rand((7, 45), dt, gen)
        with pytest.raises(AssertionError, match="max error"):
            assert_close_rel(h_grad_input(bug, dy, w, m), R.masked_linear_grad_input(_d(dy), _d(w), _d(m)),
                             dt, "planted bug dx")
        # No tails (every contiguous extent a multiple of the chunk width): the bug is invisible.
        x, w, m = rand((7, 64), dt, gen), rand((48, 64), dt, gen), rand_mask((48, 64), torch.float32, gen)
        assert_close_rel(h_masked_linear(bug, x, w, m), R.masked_linear(_d(x), _d(w), _d(m)), dt, "no tails")


def test_planted_missing_barrier_is_caught(libs, gen):
    """-DSOFTTF_PLANT_RACE removes the __syncthreads between staging a tile in shared memory and
    the MMA step. The fiber scheduler runs threads in a shuffled order in every barrier phase, so
    some threads multiply tiles that others have not written yet (poisoned NaN or stale data)."""
    race = libs["race"]
    for dt in (torch.float32, torch.bfloat16):
        x, w = rand((70, 64), dt, gen), rand((64, 64), dt, gen)
        m = rand_mask((64, 64), torch.float32, gen)
        y = h_masked_linear(race, x, w, m)
        ref = R.masked_linear(_d(x), _d(w), _d(m))
        with pytest.raises(AssertionError, match="non-finite|max error"):
            assert_close_rel(y, ref, dt, "planted race")
