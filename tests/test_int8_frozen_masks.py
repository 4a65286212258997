"""int8 frozen masks in a model (issue 16): SoftConfig(mask_dtype="int8") freezes each task's mask
row-quantized; every way a frozen task is used reads it (single task, mixed batches, Gradient ID,
a trainable task beside it, merge), files keep it, and it stays close to the fp32 original."""
import pytest
import torch

import softtf
from softtf_kernels.quant import QMASK_TAIL, dequantize_mask
from timm.models.vision_transformer import VisionTransformer

pytestmark = pytest.mark.usefixtures("one_thread")
TASKS = ("a", "b", "c")


def vit(seed=0):
    torch.manual_seed(seed)
    return VisionTransformer(img_size=16, patch_size=4, num_classes=6, embed_dim=32, depth=2, num_heads=4).eval()


def trained(mask_dtype, seed=0):
    """Three frozen tasks whose masks look trained (a narrow band around 1, set by a seed)."""
    model = softtf.wrap(vit(seed), mask_dtype=mask_dtype)
    g = torch.Generator().manual_seed(7)
    for t in TASKS:
        model.add_task(t)
        for layer in model.soft_layers.values():
            with torch.no_grad():
                layer.mask(t).copy_(0.97 + 0.06 * torch.rand(layer.weight.shape, generator=g))
        model.freeze_task(t)
    return model


@pytest.fixture(scope="module")
def pair():
    return trained("float32"), trained("int8")


def test_frozen_int8_masks_are_stored_quantized(pair):
    ref, q = pair
    for name, layer in q.soft_layers.items():
        out_f, in_f = layer.weight.shape
        assert layer.frozen_masks.dtype == torch.int8 and layer.frozen_masks.shape == (3, out_f, in_f + QMASK_TAIL)
        for t in TASKS:
            err = (dequantize_mask(layer.mask(t)) - ref.soft_layers[name].mask(t)).abs().max()
            assert err <= 0.06 / 254 / 2 * 1.01 + 1e-7, (name, t, float(err))


def test_every_use_of_a_frozen_task_reads_it(pair):
    ref, q = pair
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        for t in TASKS:
            with softtf.use_task(t):
                torch.testing.assert_close(q(x), ref(x), atol=2e-3, rtol=0)
        names = ["c", "a", "b", "a"]
        torch.testing.assert_close(q(x, task_names=names), ref(x, task_names=names), atol=2e-3, rtol=0)
    got, want = softtf.gradient_id(q, x), softtf.gradient_id(ref, x)
    assert got.tasks == want.tasks and torch.equal(got.task_index, want.task_index)
    torch.testing.assert_close(got.scores, want.scores, atol=1e-3, rtol=1e-3)


def test_a_trainable_task_beside_int8_frozen_ones():
    model = trained("int8")
    model.add_task("d")
    x = torch.randn(3, 3, 16, 16)
    out = model(x, task_names=["a", "d", "b"])  # the trainable mask keeps its gradient
    out.sum().backward()
    grads = [layer.mask("d").grad for layer in model.soft_layers.values()]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("mmap", [False, True])
def test_files_keep_int8_masks(pair, tmp_path, mmap):
    _, q = pair
    path = str(tmp_path / "m.safetensors")
    q.save_masks(path)
    back = softtf.load_soft_model(vit(), path, mmap=mmap)
    x = torch.randn(2, 3, 16, 16)
    for name, layer in back.soft_layers.items():
        assert layer.mask_dtype == torch.int8
        for t in TASKS:
            assert torch.equal(layer.mask(t), q.soft_layers[name].mask(t))
    with torch.no_grad(), softtf.use_task("b"):
        assert torch.equal(back(x), q(x))


def test_merge_uses_the_dequantized_mask():
    model = trained("int8")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad(), softtf.use_task("b"):
        want = model(x)
    plain = model.merge_and_unload("b")
    with torch.no_grad():
        torch.testing.assert_close(plain(x), want, atol=1e-5, rtol=1e-5)


def test_config_names_int8():
    assert softtf.SoftConfig(mask_dtype="int8").mask_dtype == torch.int8
    with pytest.raises(ValueError, match="mask_dtype must be None, a torch dtype or one of"):
        softtf.SoftConfig(mask_dtype="uint8")
