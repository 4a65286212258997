"""The Triton prefix-attention kernels on a CUDA GPU against the float64 reference: bf16 / fp16 /
fp32, ViT-like shapes (197 tokens, prompt length 5 and 20, head dims 64, 80, 128, 256), strided
inputs, and the op + autograd path. Skipped without CUDA. Like tests/test_triton_gpu.py, the
kernels must be built for the GPU in this process (run the file on its own if a CPU-interpreter
suite ran first)."""
import pytest
import torch

from triton_interpreter import gpu_compiled_marks  # noqa: E402

pytestmark = gpu_compiled_marks("softtf_kernels.triton.prefix_attention")
COMPILED = not any(mark.args[0] for mark in pytestmark)
if COMPILED:
    import softtf_kernels.triton.prefix_attention as _P

import softtf_kernels  # noqa: E402
from softtf_kernels import reference as R  # noqa: E402

from helpers import rand  # noqa: E402
from test_prefix_attention import NAMES, TOL, inputs, reference_grads, run_op, strided  # noqa: E402

GPU_TOL = {**TOL, torch.float32: 1e-4}


def _close(got, want, dtype, what, floor=1e-2):
    scale = max(want.double().abs().max().item(), floor) if want.numel() else 1.0
    err = (got.double().cpu() - want.double().cpu()).abs().max().item() / scale if want.numel() else 0.0
    assert torch.isfinite(got).all(), f"{what}: non-finite"
    assert err <= GPU_TOL[dtype], f"{what}: error {err:.2e} relative to {scale:.2e} > {GPU_TOL[dtype]:.0e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(4, 12, 197, 5, 64), (2, 6, 197, 20, 80), (2, 4, 130, 7, 128), (1, 2, 65, 3, 256)])
@pytest.mark.parametrize("activation", ["none", "sigmoid", "gelu"])
def test_kernels_match_reference(gen, dtype, shape, activation):
    args = [a.cuda() for a in inputs(gen, shape, dtype)]
    d = [a.double() for a in args]
    out, lse = _P.prefix_attention_forward(*args, activation)
    want_out, want_lse = R.prefix_attention_forward(*d, activation)
    _close(out, want_out, dtype, "out")
    _close(lse, want_lse, torch.float32, "lse")
    dy = rand(out.shape, dtype, gen).cuda()
    grads = _P.prefix_attention_backward(dy, *args, out, lse, activation)
    want = R.prefix_attention_backward(dy.double(), *d, want_out, want_lse, activation)
    for name, g, w in zip(NAMES, grads, want):
        _close(g, w, dtype, f"d{name}", floor=1.0 if name in ("alpha", "tau") else 1e-2)


def test_op_autograd_and_strides_on_cuda(gen):
    softtf_kernels.set_backend("auto")
    args = [a.cuda() for a in strided(inputs(gen, (3, 4, 50, 5, 64), torch.float16))]
    dy = rand((3, 4, 50, 64), torch.float16, gen).cuda()
    out, grads = run_op(args, "tanh", dy)
    want_out, want_grads = reference_grads([a.cpu() for a in args], "tanh", dy.cpu())
    _close(out, want_out, torch.float16, "out")
    for name, g, w in zip(NAMES, grads, want_grads):
        _close(g, w, torch.float16, f"d{name}", floor=1.0)
