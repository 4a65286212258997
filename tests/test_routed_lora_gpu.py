"""routed_lora on a CUDA GPU: the Triton kernels and the C++ binding (cuBLAS) against the float64 oracle,
bf16 / fp16 / fp32, BERT-base-like shapes (T = 5, 10, 20 blocks of rank 4 on 768 features),
strided inputs, the op + autograd path, float64 to the reference. Skipped without CUDA. Like
tests/test_triton_gpu.py, the Triton kernels must be built for the GPU in this process (run the
file on its own if a CPU-interpreter suite ran first)."""
import pytest
import torch

from triton_interpreter import gpu_compiled_marks  # noqa: E402

pytestmark = gpu_compiled_marks("softtf_kernels.triton.lora")

import softtf_kernels  # noqa: E402

from helpers import rand  # noqa: E402
from test_routed_lora import GRADS, inputs, oracle, oracle_grads, strided  # noqa: E402

GPU_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2, torch.float64: 1e-10}


def _close(got, want, dtype, what):
    want = want.double().cpu()
    scale = max(want.abs().max().item(), 1e-6) if want.numel() else 1.0
    err = (got.double().cpu() - want).abs().max().item() / scale if want.numel() else 0.0
    assert torch.isfinite(got).all(), f"{what}: non-finite"
    assert err <= GPU_TOL[dtype], f"{what}: error {err:.2e} relative to {scale:.2e} > {GPU_TOL[dtype]:.0e}"


def _run(backend, x, a, b, w, s, dy):
    leaves = [t.detach().clone().cuda().requires_grad_() for t in (x, a, b, w)]
    with softtf_kernels.use_backend(backend):
        y = torch.ops.softtf.routed_lora(*leaves, s)
        y.backward(dy.cuda())
    return y, [t.grad for t in leaves]


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n_tasks", [5, 10, 20])
def test_backends_match_float64_at_bert_shapes(gen, backend, dt, n_tasks):
    if backend == "cuda" and not softtf_kernels.cuda_available("routed_lora"):
        pytest.skip("extension built without CUDA kernels")
    x, a, b, w = inputs(gen, (4, 128), 768, 768, n_tasks, 4, dt, torch.float32)
    dy = rand((4, 128, 768), dt, gen)
    y, grads = _run(backend, x, a, b, w, 8.0, dy)
    _close(y, oracle(x, a, b, w, 8.0), dt, f"{backend} y")
    for name, g, want, arg in zip(GRADS, grads, oracle_grads(x, a, b, w, 8.0, dy), (x, a, b, w)):
        assert g.dtype == arg.dtype and g.shape == arg.shape
        _close(g, want, dt, f"{backend} d{name}")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("layout", ["t", "step", "offset"])
def test_strided_and_odd_sizes(gen, backend, layout):
    if backend == "cuda" and not softtf_kernels.cuda_available("routed_lora"):
        pytest.skip("extension built without CUDA kernels")
    x, a, b, w = inputs(gen, (3, 37), 67, 45, 3, 5, torch.float16, torch.float16)
    dy = rand((3, 37, 45), torch.float16, gen)
    args = [strided(t.cuda(), layout) for t in (x, a, b, w)]
    with softtf_kernels.use_backend(backend):
        y = torch.ops.softtf.routed_lora(*args, -1.5)
        grads = torch.ops.softtf.routed_lora_backward(strided(dy.cuda(), layout), *args, -1.5)
    _close(y, oracle(x, a, b, w, -1.5), torch.float16, "y")
    for name, g, want in zip(GRADS, grads, oracle_grads(x, a, b, w, -1.5, dy)):
        _close(g, want, torch.float16, name)


def test_float64_goes_to_the_reference(gen):
    x, a, b, w = (t.cuda() for t in inputs(gen, (2, 5), 9, 7, 3, 2, torch.float64))
    with softtf_kernels.use_backend("triton"):
        y = torch.ops.softtf.routed_lora(x, a, b, w, 2.0)
    _close(y, oracle(x, a, b, w, 2.0), torch.float64, "y")
