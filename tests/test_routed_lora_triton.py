"""The Triton routed-LoRA kernels (softtf_kernels/triton/lora.py) against the float64 oracle on
CPU, through the Triton interpreter, as tests/test_prefix_attention_triton.py does: the kernels are
imported with TRITON_INTERPRET=1 before anything else can load triton; if triton was already
loaded for a GPU in this process, the tests skip and one test reruns this file in a subprocess.
Small shapes, fp32 / fp16 (the interpreter has no bf16); split-K forced on once."""
import importlib.util

from triton_interpreter import load_interpreted_module, rerun_under_interpreter  # noqa: E402

_rmod, RUN_HERE = load_interpreted_module("softtf_kernels.triton.lora")  # the kernels too, for the interpreter

import pytest  # noqa: E402
import torch  # noqa: E402

import softtf_kernels  # noqa: E402
import softtf_kernels.triton as T  # noqa: E402

from helpers import assert_close_rel, rand  # noqa: E402
from test_routed_lora import GRADS, inputs, oracle, oracle_grads, run, strided  # noqa: E402

HAVE_TRITON = importlib.util.find_spec("triton") is not None
here = pytest.mark.skipif(not RUN_HERE, reason="triton missing, or loaded for a GPU in this process "
                                               "(test_rerun_in_subprocess runs these)")


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("SOFTTF_POISON_OUTPUTS", "1")  # unwritten outputs are NaN and fail


@here
@pytest.mark.parametrize("dt,wdt", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                    (torch.float16, torch.float32), (torch.float32, torch.float16)])
@pytest.mark.parametrize("lead,fin,fout,n_tasks,rank", [((3, 5), 13, 11, 3, 5), ((2, 3, 4), 7, 9, 5, 1),
                                                         ((2, 37), 20, 70, 3, 4)])
def test_kernels_match_float64(gen, dt, wdt, lead, fin, fout, n_tasks, rank):
    x, a, b, w = inputs(gen, lead, fin, fout, n_tasks, rank, dt, wdt)
    dy = rand((*lead, fout), dt, gen)
    y = T.routed_lora(x, a, b, w, 2.5)
    assert y.dtype == dt and y.is_contiguous()
    assert_close_rel(y, oracle(x, a, b, w, 2.5), dt, "y")
    grads = T.routed_lora_backward(dy, x, a, b, w, 2.5)
    for name, g, want, arg in zip(GRADS, grads, oracle_grads(x, a, b, w, 2.5, dy), (x, a, b, w)):
        assert g.dtype == arg.dtype and g.shape == arg.shape, name
        tol = torch.float16 if torch.float16 in (dt, arg.dtype) else torch.float32
        assert_close_rel(g, want, tol, name)


@here
@pytest.mark.parametrize("layout", ["t", "step", "offset"])
def test_ops_route_to_triton_with_any_strides(gen, layout):
    x, a, b, w = inputs(gen, (4, 6), 10, 7, 3, 2, torch.float32)
    dy = rand((4, 6, 7), torch.float32, gen)
    args = [strided(t, layout) for t in (x, a, b, w)]
    y, grads = run("triton", *args, -0.5, strided(dy, layout))
    assert_close_rel(y, oracle(x, a, b, w, -0.5), torch.float32, "y")
    for name, g, want in zip(GRADS, grads, oracle_grads(x, a, b, w, -0.5, dy)):
        assert_close_rel(g, want, torch.float32, name)


@here
def test_split_k_partials_sum_to_the_same(gen, monkeypatch):
    monkeypatch.setattr(_rmod, "FORCE_SPLIT", 3)
    x, a, b, w = inputs(gen, (3, 40), 9, 6, 2, 3, torch.float32)
    dy = rand((3, 40, 6), torch.float32, gen)
    for name, g, want in zip(GRADS, T.routed_lora_backward(dy, x, a, b, w, 1.0), oracle_grads(x, a, b, w, 1.0, dy)):
        assert_close_rel(g, want, torch.float32, name)


@here
@pytest.mark.parametrize("lead,fin,fout,n_tasks,rank", [((0, 3), 5, 4, 2, 2), ((2, 0), 5, 4, 2, 2),
                                                         ((2, 3), 5, 4, 1, 1), ((2, 3), 5, 4, 3, 0),
                                                         ((2, 3), 0, 4, 2, 2), ((2, 3), 5, 0, 2, 2)])
def test_zero_size_dims(gen, lead, fin, fout, n_tasks, rank):
    x, a, b, w = inputs(gen, lead, fin, fout, n_tasks, rank, torch.float32)
    dy = rand((*lead, fout), torch.float32, gen)
    y, grads = run("triton", x, a, b, w, 0.5, dy)
    assert_close_rel(y, oracle(x, a, b, w, 0.5), torch.float32, "y")
    for name, g, want in zip(GRADS, grads, oracle_grads(x, a, b, w, 0.5, dy)):
        assert_close_rel(g, want, torch.float32, name)


@here
def test_float64_routes_to_the_reference_and_bf16_is_refused(gen):
    x, a, b, w = inputs(gen, (2, 3), 5, 4, 2, 2, torch.float32, torch.float64)
    softtf_kernels.set_backend("triton")
    assert_close_rel(torch.ops.softtf.routed_lora(x, a, b, w, 1.0), oracle(x, a, b, w, 1.0), torch.float32, "y")
    with pytest.raises(TypeError, match=r"routed_lora: weights must be float32, float16 or bfloat16"):
        T.routed_lora(x, a, b, w, 1.0)
    with pytest.raises(TypeError, match=r"bfloat16, which the Triton CPU interpreter"):
        T.routed_lora(x.bfloat16(), a.bfloat16(), b.bfloat16(), w.float(), 1.0)


@pytest.mark.skipif(RUN_HERE or not HAVE_TRITON, reason="kernels run in this process under the interpreter")
def test_rerun_in_subprocess():
    rerun_under_interpreter(__file__)
