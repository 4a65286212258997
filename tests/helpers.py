"""Shared test utilities: random inputs, tolerance per dtype, float64 oracle comparison."""
from __future__ import annotations

import torch

# Every (x / weight dtype, mask dtype) pair the GPU kernels support.
KERNEL_DTYPE_PAIRS = [
    (torch.float32, torch.float32),
    (torch.float32, torch.bfloat16),
    (torch.float32, torch.float16),
    (torch.float16, torch.float16),
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.float16),
]

TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def rand(shape, dtype, gen, low=-1.0, high=1.0):
    return (torch.rand(shape, generator=gen, dtype=torch.float64) * (high - low) + low).to(dtype)


def rand_mask(shape, dtype, gen, zero_frac=0.2):
    """A soft mask around 1 with some exact zeros (pruned entries must stay pruned)."""
    m = torch.rand(shape, generator=gen, dtype=torch.float64) * 1.5
    m[torch.rand(shape, generator=gen) < zero_frac] = 0
    return m.to(dtype)


def assert_close_rel(actual, expected, dtype, what=""):
    """|a - e| <= tol * max|e| (+ tiny) elementwise: a relative error at the scale of the result."""
    tol = TOL[dtype]
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    a, e = actual.double(), expected.double()
    assert torch.isfinite(a).all(), f"{what}: non-finite values in result"
    if e.numel() == 0:
        return
    scale = e.abs().max().clamp_min(1e-6)
    err = (a - e).abs().max() / scale
    assert err <= tol, f"{what}: max error {err:.3e} (relative to max |ref| {scale:.3e}) > {tol:.1e}"


def wrapped_vit(names=("a", "b", "c"), frozen=("a",)):
    """A tiny wrapped timm ViT (eval mode) with tasks ``names`` (U(0.5, 1.5) masks, seed = index),
    ``frozen`` of them frozen: the serving tests' model."""
    import softtf
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = softtf.wrap(VisionTransformer(img_size=16, patch_size=4, num_classes=3, embed_dim=32, depth=2, num_heads=4))
    for i, name in enumerate(names):
        model.add_task(name, init=("uniform", 0.5, 1.5), seed=i)
        if name in frozen:
            model.freeze_task(name)
    return model.eval()
