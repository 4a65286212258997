"""Property-based tests of every op on the Triton backend (CPU, TRITON_INTERPRET=1) against the
float64 reference: the ops directly and autograd (cases and profiles: tests/fuzz_cases.py).

The interpreter must be switched on before triton is imported, exactly as in
tests/test_triton_kernels.py: this module imports the kernels under TRITON_INTERPRET=1 when it can,
and otherwise (triton already loaded for a GPU in this process) skips its tests and reruns itself
in a subprocess. Dtypes: fp32/fp16 (the interpreter has no bf16); fp64 masks are drawn too and
must route to the reference in forward and backward alike. Few cases (the interpreter is slow).
"""
import importlib.util
import os
import sys


from triton_interpreter import load_interpreted_kernels, rerun_under_interpreter  # noqa: E402

_kmod, RUN_HERE = load_interpreted_kernels()
HAVE_TRITON = importlib.util.find_spec("triton") is not None

import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from softtf_kernels import table  # noqa: E402

from fuzz_cases import TRITON_DTYPES, check_autograd, check_op, draw_autograd_case, draw_case, examples  # noqa: E402

here = pytest.mark.skipif(not RUN_HERE, reason="triton missing, or loaded for a GPU in this process "
                                               "(test_fuzz_rerun_in_subprocess runs these)")


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("SOFTTF_POISON_OUTPUTS", "1")


@here
@pytest.mark.parametrize("op", table.NAMES)
@settings(max_examples=examples(triton=True))
@given(data=st.data())
def test_op_matches_reference(op, data):
    check_op(op, draw_case(data.draw, op, TRITON_DTYPES), "triton")


@here
@pytest.mark.parametrize("op", ["masked_linear", "mixed_task_linear", "routed_lora"])
@settings(max_examples=examples(triton=True))
@given(data=st.data())
def test_autograd_matches_reference(op, data):
    args, want = draw_autograd_case(data.draw, op, TRITON_DTYPES)
    check_autograd(op, args, want, "triton")


@pytest.mark.skipif(RUN_HERE or not HAVE_TRITON, reason="kernels run in this process under the interpreter")
def test_fuzz_rerun_in_subprocess():
    rerun_under_interpreter(__file__)
