"""The ops trace on fake CUDA tensors without a GPU: shapes/dtypes for torch.compile on any box,
and the same argument errors as the real kernels."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import softtf_kernels  # noqa: F401


def test_fake_cuda_shapes_and_dtypes():
    with FakeTensorMode():
        x = torch.empty(2, 5, 16, device="cuda", dtype=torch.bfloat16)
        w = torch.empty(8, 16, device="cuda", dtype=torch.bfloat16)
        m = torch.empty(8, 16, device="cuda")
        masks = torch.empty(3, 8, 16, device="cuda", dtype=torch.float16)
        dy = torch.empty(2, 5, 8, device="cuda", dtype=torch.bfloat16)
        y = torch.ops.softtf.masked_linear(x, w, m, torch.empty(8, device="cuda", dtype=torch.bfloat16))
        assert (y.shape, y.device.type, y.dtype) == ((2, 5, 8), "cuda", torch.bfloat16)
        assert torch.ops.softtf.masked_linear_grad_input(dy, w, m).shape == (2, 5, 16)
        dm = torch.ops.softtf.masked_linear_grad_mask(dy, x, w, torch.float16)
        assert (dm.shape, dm.dtype) == ((8, 16), torch.float16)
        s = torch.ops.softtf.mask_mixture_grad(dy, x, w, masks, True)
        assert (s.shape, s.dtype) == ((2, 3), torch.float32)
        assert torch.ops.softtf.mask_mixture_grad(dy, x, w, masks, False).shape == (3,)
        ids = torch.zeros(2, dtype=torch.long, device="cuda")
        assert torch.ops.softtf.mixed_task_linear(x, w, masks, ids).shape == (2, 5, 8)
        assert torch.ops.softtf.mixed_task_linear_grad_input(dy, w, masks, ids).shape == (2, 5, 16)
        # int8 masks [.., out, in + 8] (softtf_kernels.quant), which the CUDA kernels read as they are
        q = torch.empty(8, 24, device="cuda", dtype=torch.int8)
        qs = torch.empty(3, 8, 24, device="cuda", dtype=torch.int8)
        assert torch.ops.softtf.masked_linear(x, w, q).shape == (2, 5, 8)
        assert torch.ops.softtf.masked_linear_grad_input(dy, w, q).shape == (2, 5, 16)
        assert torch.ops.softtf.mask_mixture_grad(dy, x, w, qs, True).shape == (2, 3)
        assert torch.ops.softtf.mixed_task_linear(x, w, qs, ids).shape == (2, 5, 8)
        assert torch.ops.softtf.mixed_task_linear_grad_input(dy, w, qs, ids).shape == (2, 5, 16)


def test_fake_cuda_bad_input_raises_the_same_errors():
    with FakeTensorMode():
        x = torch.empty(2, 16, device="cuda")
        w = torch.empty(8, 16, device="cuda")
        with pytest.raises(ValueError, match=r"mask must have weight's shape \(8, 16\), got \(16, 8\)"):
            torch.ops.softtf.masked_linear(x, w, torch.empty(16, 8, device="cuda"))
        with pytest.raises(TypeError, match=r"x dtype torch.float16 must equal weight dtype torch.float32"):
            torch.ops.softtf.masked_linear(x.half(), w, torch.empty(8, 16, device="cuda"))
        with pytest.raises(ValueError, match=r"mask must have \[out, in \+ 8\] = \[8, 24\] \(an int8 mask\), got \(8, 16\)"):
            torch.ops.softtf.masked_linear(x, w, torch.empty(8, 16, device="cuda", dtype=torch.int8))


def test_opcheck_on_meta_tensors():
    # No kernel runs on meta tensors: this exercises the fake kernels and the schema alone.
    x = torch.empty(3, 16, device="meta")
    w = torch.empty(8, 16, device="meta")
    m = torch.empty(8, 16, device="meta")
    y = torch.ops.softtf.masked_linear(x, w, m)
    assert y.device.type == "meta" and y.shape == (3, 8)
