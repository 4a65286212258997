"""pytest-benchmark suite, model level: random-init timm vit_base_patch16_224 (Soft-TF on qkv+proj of
blocks 9-11) and BERT-base from BertConfig() (Soft-TF on query/key/value of layers 9-11).

    python -m pytest bench/test_bench_models.py --benchmark-group-by=group
    SOFTTF_BENCH_QUICK=1 python -m pytest bench/test_bench_models.py      # tiny models (smoke)

Same cases, modules and step functions as ``softtf bench`` (softtf/bench/). A full-size call
takes seconds on a CPU: meant for a GPU or a quiet machine. No asserts on time.
"""
from __future__ import annotations

import os

import pytest
import torch  # noqa: F401  (loads libc10 before softtf_kernels._C)

pytest.importorskip("timm")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from softtf.bench import CANDIDATES, MODEL_CASES, TASKS, Suite  # noqa: E402

QUICK = os.environ.get("SOFTTF_BENCH_QUICK", "0") == "1"


@pytest.fixture(scope="module")
def suite():
    return Suite(quick=QUICK)  # one case alive at a time, freed with the module


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("key", [c for c in CANDIDATES if c != "compiled"])
@pytest.mark.parametrize("case", MODEL_CASES)
def test_model(benchmark, suite, case, key, task):
    reason = suite.run(benchmark, case, key, task, rounds=2 if QUICK else 3, warmup=1)
    if reason:
        pytest.skip(reason)
