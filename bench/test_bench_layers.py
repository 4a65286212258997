"""pytest-benchmark suite, layer level: ViT qkv 768->2304, ViT proj 768->768, BERT query 768->768.

    python -m pytest bench/test_bench_layers.py --benchmark-group-by=group
    SOFTTF_BENCH_QUICK=1 python -m pytest bench/test_bench_layers.py      # tiny shapes (smoke)

Same cases, modules and step functions as ``softtf bench`` (softtf/bench/), one candidate x
task per benchmark, grouped by case and task. torch.compile rows are left to ``softtf bench``.
No asserts on time.
"""
from __future__ import annotations

import os

import pytest
import torch  # noqa: F401  (loads libc10 before softtf_kernels._C)

from softtf.bench import CANDIDATES, LAYER_CASES, TASKS, Suite

QUICK = os.environ.get("SOFTTF_BENCH_QUICK", "0") == "1"


@pytest.fixture(scope="module")
def suite():
    return Suite(quick=QUICK)  # one case alive at a time, freed with the module


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("key", [c for c in CANDIDATES if c != "compiled"])
@pytest.mark.parametrize("case", LAYER_CASES)
def test_layer(benchmark, suite, case, key, task):
    reason = suite.run(benchmark, case, key, task, rounds=3 if QUICK else 7, warmup=1)
    if reason:
        pytest.skip(reason)
