"""Property-based tests of every op on the C++ backend against the float64 reference, forward,
the gradient ops directly, and autograd through torch.ops.softtf.masked_linear /
mixed_task_linear (cases and profiles: tests/fuzz_cases.py; SOFTTF_FUZZ_EXAMPLES=N for long runs)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import softtf_kernels
from softtf_kernels import table

from fuzz_cases import CPP_DTYPES, check_autograd, check_op, draw_autograd_case, draw_case, examples

pytestmark = pytest.mark.skipif(not softtf_kernels.cpp_available(), reason="C++ extension not built")


@pytest.mark.parametrize("op", table.NAMES)
@settings(max_examples=examples())
@given(data=st.data())
def test_op_matches_reference(op, data):
    check_op(op, draw_case(data.draw, op, CPP_DTYPES), "cpp")


@pytest.mark.parametrize("op", ["masked_linear", "mixed_task_linear", "routed_lora"])
@settings(max_examples=examples())
@given(data=st.data())
def test_autograd_matches_reference(op, data):
    args, want = draw_autograd_case(data.draw, op, CPP_DTYPES)
    check_autograd(op, args, want, "cpp")
