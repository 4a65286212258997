"""What model.to(dtype) / .half() / .bfloat16() / .double() / .float() do to a wrapped model: the
frozen base weights convert, trainable masks stay in their training dtype (fp32; fp64 for an fp64
model), frozen masks keep their stored dtype; the Parameter objects survive (optimizers keep them)."""
import pytest
import torch

import softtf

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def model():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)
    m = softtf.wrap(vit, softtf.SoftConfig(mask_dtype=torch.bfloat16))
    m.add_task("a", init=("uniform", 0.9, 1.1), seed=0)
    m.freeze_task("a")
    m.add_task("b", init=("uniform", 0.9, 1.1), seed=1)
    return m


def _layers(m):
    return [x for x in m.modules() if isinstance(x, softtf.SoftLinear)]


@pytest.mark.parametrize("convert, weight_dtype, train_dtype", [
    (lambda m: m.to(torch.bfloat16), torch.bfloat16, torch.float32),
    (lambda m: m.half(), torch.float16, torch.float32),
    (lambda m: m.bfloat16().float(), torch.float32, torch.float32),
    (lambda m: m.double(), torch.float64, torch.float64),
])
def test_dtype_conversion_keeps_the_masks_roles(model, convert, weight_dtype, train_dtype):
    layers = _layers(model)
    params = [layer.masks["b"] for layer in layers]
    opt = torch.optim.Adam(params, lr=1e-3)  # the masks (an fp16 head under Adam would overflow on its own)
    frozen_before = [layer.frozen_masks.clone() for layer in layers]
    convert(model)
    for layer, p, fb in zip(layers, params, frozen_before):
        assert layer.weight.dtype == weight_dtype
        assert layer.masks["b"] is p and p.dtype == train_dtype and p.requires_grad
        assert layer.frozen_masks.dtype == torch.bfloat16  # the stored dtype, untouched
        assert torch.equal(layer.frozen_masks, fb)
    # the model still trains (the optimizer built before the conversion holds the same masks)
    x = torch.randn(2, 3, 32, 32, dtype=weight_dtype)
    with softtf.use_task("b"):
        model(x).float().pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.dtype == train_dtype for p in params)
    opt.step()
    with softtf.use_task("a"), torch.no_grad():
        assert torch.isfinite(model(x).float()).all()


def test_device_move_keeps_dtypes(model):
    layers = _layers(model)
    model.to("cpu")
    assert all(layer.masks["b"].dtype == torch.float32 and layer.frozen_masks.dtype == torch.bfloat16 for layer in layers)
