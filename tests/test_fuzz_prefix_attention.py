"""Property-based tests of softtf.prefix_attention on the CPU path (backend ``cpp``:
softtf_kernels/cpu_attention.py, ATen's flash attention + the gated prefix part) against the float64
reference: the forward and backward ops directly (out, lse, all seven gradients) and autograd through
torch.ops.softtf.prefix_attention. Random B, H, N, P (0 included), D (odd sizes), every dtype the op
claims, alpha / tau in any of them, the four activations, scale None or drawn, non-contiguous
layouts (cases and tolerances: tests/fuzz_attention.py; profiles and SOFTTF_FUZZ_EXAMPLES:
tests/fuzz_cases.py)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import softtf_kernels
from softtf_kernels import ops
from softtf_kernels import reference as R

from fuzz_attention import (ALL_DTYPES, NAMES, check_autograd, check_ops, close, draw_case, grad_tol_dtype,
                            natural_scales, uniform)
from fuzz_cases import examples

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: OpenMP fork/join would dominate


@settings(max_examples=2 * examples())
@given(data=st.data())
def test_ops_match_reference(data):
    args, activation, scale, gen = draw_case(data.draw, ALL_DTYPES, ALL_DTYPES)
    check_ops(data.draw, args, activation, scale, gen, "cpp")


@settings(max_examples=examples())
@given(data=st.data())
def test_autograd_matches_reference(data):
    args, activation, scale, gen = draw_case(data.draw, ALL_DTYPES, ALL_DTYPES)
    check_autograd(data.draw, args, activation, scale, gen, "cpp")


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_regression_stride_along_d_of_q_and_out(dtype):
    """Found by the fuzz cases: ATen's CPU flash kernels read rows of D as dense, so a q whose D is
    not its innermost dim (forward: garbage, NaN in low precision) or an out handed to the backward
    op with a step along D (wrong dq / dk / dv) came back wrong; cpu_attention copies those now."""
    gen = torch.Generator().manual_seed(0)
    b, h, n, p, d = 2, 3, 7, 3, 8
    q, k, v = (uniform((b, h, n, d), dtype, gen) for _ in range(3))
    pk, pv = (uniform((b, h, p, d), dtype, gen) for _ in range(2))
    args = [q, k, v, pk, pv, torch.tensor(0.7), torch.tensor(-1.2)]
    q_d_outer = torch.empty((b, d, n, h), dtype=dtype).permute(0, 3, 2, 1).copy_(q)  # strides (.., 1, h, n h)
    assert q_d_outer.stride(-1) != 1
    dy = uniform((b, h, n, d), dtype, gen)
    scales = natural_scales(dy, *args, "sigmoid", None)
    want_out, want_lse = R.prefix_attention_forward(*[a.double() for a in args], "sigmoid")
    want = R.prefix_attention_backward(dy.double(), *[a.double() for a in args], want_out, want_lse, "sigmoid")
    with softtf_kernels.use_backend("cpp"):
        out, _ = ops.prefix_attention_forward(q_d_outer, *args[1:], "sigmoid")
        close(out, want_out, dtype, "out with q strided along D", scales[0])
        out, lse = ops.prefix_attention_forward(*args, "sigmoid")
        out_step = torch.empty((b, h, n, 2 * d), dtype=dtype)[..., ::2].copy_(out)
        grads = ops.prefix_attention_backward(dy, *args, out_step, lse, "sigmoid")
    for i, (g, w) in enumerate(zip(grads, want)):
        close(g, w, grad_tol_dtype(dtype, g.dtype), f"d{NAMES[i]} with out strided along D", scales[1 + i])
