"""What wrap makes trainable comes back: save_masks stores the modules_to_save (the classifier
head) beside the masks, and load_soft_model on a fresh model reproduces the saved model bit for bit."""
import warnings

import pytest
import torch

import softtf
from softtf.core.mask_file import write_mask_file

pytestmark = pytest.mark.usefixtures("one_thread")


def _vit(seed, num_classes=5):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=num_classes)


def _trained(tmp_path):
    model = softtf.wrap(_vit(0))
    x = torch.randn(4, 3, 32, 32)
    model.add_task("a", init=("uniform", 0.9, 1.1), seed=0)
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    model.freeze_task("a")
    path = tmp_path / "masks.safetensors"
    model.save_masks(path, extra={"keys": torch.ones(3)})
    return model, x, path


def test_reload_reproduces_outputs_exactly(tmp_path):
    model, x, path = _trained(tmp_path)
    with torch.no_grad(), softtf.use_task("a"):
        before = model(x)
    fresh = softtf.load_soft_model(_vit(1), path)  # another init: head and weights differ
    extras = softtf.read_extras(path)
    # the base weights are the user's to supply: give the fresh model the same pretrained weights
    assert set(extras) == {"keys"}
    torch.testing.assert_close(fresh.model.head.weight, model.model.head.weight, rtol=0, atol=0)
    fresh2 = softtf.load_soft_model(_base_like(model), path)
    with torch.no_grad(), softtf.use_task("a"):
        after = fresh2(x)
    assert torch.equal(before, after)


def _base_like(model):
    """A fresh base model with the same pretrained weights as ``model``'s but a re-initialised head."""
    base = _vit(0)
    torch.nn.init.normal_(base.head.weight)
    return base


def test_module_level_save_and_load_carry_the_head(tmp_path):
    model, x, _ = _trained(tmp_path)
    path = tmp_path / "m2.safetensors"
    softtf.save_masks(model, path)
    other = softtf.wrap(_base_like(model))
    softtf.load_masks(other, path)
    assert torch.equal(other.model.head.weight, model.model.head.weight)
    assert torch.equal(other.model.head.bias, model.model.head.bias)


def test_reserved_extra_keys_are_refused(tmp_path):
    model, _, _ = _trained(tmp_path)
    with pytest.raises(ValueError, match="reserved for modules_to_save"):
        model.save_masks(tmp_path / "x.safetensors", extra={"modules_to_save/head.weight": torch.ones(1)})


def test_mismatched_head_is_refused_before_anything_changes(tmp_path):
    _, _, path = _trained(tmp_path)
    other = softtf.wrap(_vit(0, num_classes=7))
    head = other.model.head.weight.clone()
    with pytest.raises(ValueError, match=r"head\.(weight|bias) in .* the model.s is"):
        other.load_masks(path)
    assert other.tasks == [] and torch.equal(other.model.head.weight, head)


def test_files_without_head_state_load_with_a_warning(tmp_path):
    model, _, _ = _trained(tmp_path)
    old = tmp_path / "old.safetensors"
    write_mask_file(model.soft_layers, model.soft_config, old)  # as softtf wrote before heads were saved
    other = softtf.wrap(_base_like(model))
    head = other.model.head.weight.clone()
    with pytest.warns(UserWarning, match="stores no modules_to_save state"):
        other.load_masks(old)
    assert other.tasks == ["a"] and torch.equal(other.model.head.weight, head)


def test_load_soft_model_returns_the_model_and_read_extras_the_extras(tmp_path):
    """PEFT's shape (issue 17): the model from load_soft_model, the caller's tensors by another call,
    which checks the file as a load does and leaves the saved head out."""
    model = softtf.wrap(_vit(0))
    model.add_task("a")
    path = str(tmp_path / "m.safetensors")
    model.save_masks(path, extra={"keys": torch.ones(2)})
    loaded = softtf.load_soft_model(_vit(1), path)
    assert isinstance(loaded, softtf.SoftModel) and loaded.tasks == ["a"]
    assert list(softtf.read_extras(path)) == ["keys"]
    (tmp_path / "bad.safetensors").write_bytes(b"not a mask file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        softtf.read_extras(str(tmp_path / "bad.safetensors"))
