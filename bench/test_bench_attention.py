"""pytest-benchmark suite, attention: softtf.prefix_attention against the eager composite and SDPA
without prefix, at ViT-B/16 shapes (q, k, v [4, 12, 197, 64], prefix P = 5), DualPrompt's prefix
(no gate) and NoRGa's (sigmoid gate).

    python -m pytest bench/test_bench_attention.py --benchmark-group-by=group
    SOFTTF_BENCH_QUICK=1 python -m pytest bench/test_bench_attention.py      # tiny shapes (smoke)

Same cases, modules and step functions as ``softtf bench --cases attn_dualprompt attn_norga``
(softtf/bench/attention.py), one candidate x task per benchmark ("train" is forward + backward +
Adam on the prompt). torch.compile rows are left to ``softtf bench``. No asserts on time.
"""
from __future__ import annotations

import os

import pytest
import torch  # noqa: F401  (loads libc10 before softtf_kernels._C)

from softtf.bench import ATTENTION_CANDIDATES, ATTENTION_CASES, Suite

QUICK = os.environ.get("SOFTTF_BENCH_QUICK", "0") == "1"


@pytest.fixture(scope="module")
def suite():
    return Suite(quick=QUICK)  # one case alive at a time, freed with the module


@pytest.mark.parametrize("task", ["infer", "train"])
@pytest.mark.parametrize("key", [c for c in ATTENTION_CANDIDATES if c != "compiled"])
@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_attention(benchmark, suite, case, key, task):
    reason = suite.run(benchmark, case, key, task, rounds=3 if QUICK else 7, warmup=1)
    if reason:
        pytest.skip(reason)
