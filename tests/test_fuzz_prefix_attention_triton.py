"""Property-based tests of softtf.prefix_attention on the Triton backend (CPU, TRITON_INTERPRET=1)
against the float64 reference: the forward and backward ops (all seven gradients) and autograd, as
tests/test_fuzz_prefix_attention.py does for the CPU path (cases: tests/fuzz_attention.py).

The interpreter must be switched on before triton is imported, exactly as in
tests/test_prefix_attention_triton.py: this module imports the kernels under TRITON_INTERPRET=1 when
it can, and otherwise (triton already loaded for a GPU in this process) skips its tests and reruns
itself in a subprocess. Dtypes: fp32 / fp16 (the interpreter has no bf16); fp64 alpha / tau are
drawn too and must route forward and backward to the reference. Tiny shapes, around the 16-wide
tiles of the interpreter, and few cases (it runs every tile in numpy).
"""
import importlib.util

from triton_interpreter import load_interpreted_module, rerun_under_interpreter  # noqa: E402

_pmod, RUN_HERE = load_interpreted_module("softtf_kernels.triton.prefix_attention")  # the kernels too, for the interpreter

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fuzz_attention import check_autograd, check_ops, draw_case  # noqa: E402
from fuzz_cases import examples  # noqa: E402

here = pytest.mark.skipif(not RUN_HERE, reason="triton missing, or loaded for a GPU in this process "
                                               "(test_fuzz_rerun_in_subprocess runs these)")
DTYPES = (torch.float32, torch.float16)
PARAM_DTYPES = (torch.float32, torch.float16, torch.float32, torch.float64)  # fp64: 1 in 4, to the reference
SIZES = dict(batch=st.integers(0, 2), heads=st.integers(1, 2), tokens=st.sampled_from([1, 2, 5, 16, 17]),
             prefix=st.sampled_from([0, 1, 3, 16, 17]), head_dim=st.sampled_from([1, 5, 8, 16, 19]))


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tiles: OpenMP fork/join would dominate


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("SOFTTF_POISON_OUTPUTS", "1")  # unwritten outputs are NaN and fail


@here
@settings(max_examples=examples(triton=True))
@given(data=st.data())
def test_ops_match_reference(data):
    args, activation, scale, gen = draw_case(data.draw, DTYPES, PARAM_DTYPES, **SIZES)
    check_ops(data.draw, args, activation, scale, gen, "triton")


@here
@settings(max_examples=examples(triton=True) // 2)
@given(data=st.data())
def test_autograd_matches_reference(data):
    args, activation, scale, gen = draw_case(data.draw, DTYPES, PARAM_DTYPES, **SIZES)
    check_autograd(data.draw, args, activation, scale, gen, "triton")


@pytest.mark.skipif(RUN_HERE or importlib.util.find_spec("triton") is None,
                    reason="kernels run in this process under the interpreter")
def test_fuzz_rerun_in_subprocess():
    rerun_under_interpreter(__file__)
