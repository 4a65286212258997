"""PEFT parity of the front door (issue 17): ``wrap(model, **SoftConfig fields)``, ``get_base_model()``,
``merge_and_unload(task)`` (the same outputs from plain ``nn.Linear`` layers), and the warning when an
optimizer built before ``add_task`` misses the new task's masks."""
import copy
import dataclasses
import warnings

import pytest
import torch
from torch import nn

import softtf
from softtf.core.layer import SoftLinear, soft_layers
from softtf_kernels import use_backend

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_vit(seed=0):
    torch.manual_seed(seed)
    return VisionTransformer(img_size=32, patch_size=8, num_classes=10, embed_dim=64, depth=4, num_heads=4).eval()


class Toy(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1, self.fc2, self.out = nn.Linear(12, 24), nn.Linear(24, 16, bias=False), nn.Linear(16, 5)

    def forward(self, x):
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def images(n=3, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def train_masks(soft, x, steps=2, lr=0.05):
    """Move the active task's masks away from their init, so a merge that ignored them would show."""
    opt = torch.optim.SGD(soft.mask_parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        soft(x).pow(2).mean().backward()
        opt.step()


# ------------------------------------------------------------------------------------------ wrap(**fields)
def test_wrap_takes_softconfig_fields_as_keywords():
    soft = softtf.wrap(tiny_vit(), target_modules=["attn.qkv"], layers=[-1], mask_init=("uniform", 0.9, 1.0),
                       mask_dtype="bfloat16", modules_to_save=[])
    assert soft.layer_names == ["blocks.3.attn.qkv"]
    cfg = soft.soft_config
    assert cfg.mask_init == ("uniform", 0.9, 1.0) and cfg.mask_dtype == torch.bfloat16 and cfg.modules_to_save == []
    assert not any(p.requires_grad for p in soft.parameters())  # no head kept trainable


def test_wrap_keywords_override_a_copy_of_the_config():
    config = softtf.SoftConfig(target_modules=["attn.proj"], layers=[1, 2], mask_init="ones")
    before = dataclasses.asdict(config)
    soft = softtf.wrap(tiny_vit(), config, layers=[3], mask_init=("uniform", 0.99, 1.0))
    assert dataclasses.asdict(config) == before  # the user's config is not changed
    assert soft.layer_names == ["blocks.3.attn.proj"]  # target_modules from config, layers from the keyword
    assert soft.soft_config.mask_init == ("uniform", 0.99, 1.0)


def test_wrap_positional_and_keyword_config_still_work():
    config = softtf.SoftConfig(target_modules=["attn.qkv"], layers=[0])
    assert softtf.wrap(tiny_vit(), config).layer_names == ["blocks.0.attn.qkv"]
    assert softtf.wrap(tiny_vit(), config=config).layer_names == ["blocks.0.attn.qkv"]
    assert softtf.wrap(tiny_vit()).layer_names == [f"blocks.{i}.attn.{n}" for i in (1, 2, 3) for n in ("qkv", "proj")]


def test_wrap_unknown_keyword_is_a_type_error_naming_it_and_the_fields():
    vit = tiny_vit()
    with pytest.raises(TypeError) as info:
        softtf.wrap(vit, target_module=["attn.qkv"])
    msg = str(info.value)
    assert "'target_module'" in msg and "did you mean 'target_modules'" in msg
    for name in ("target_modules", "layers", "mask_init", "mask_dtype", "modules_to_save"):
        assert name in msg
    with pytest.raises(TypeError, match="'rank'"):
        softtf.wrap(vit, softtf.SoftConfig(), rank=8)
    assert not soft_layers(vit) and all(p.requires_grad for p in vit.parameters())  # nothing changed


def test_wrap_keyword_values_are_validated_like_the_config():
    vit = tiny_vit()
    with pytest.raises(ValueError, match="mask_init"):
        softtf.wrap(vit, mask_init="zeros")
    with pytest.raises(TypeError, match="config must be a SoftConfig"):
        softtf.wrap(vit, {"layers": [1]}, layers=[2])
    assert not soft_layers(vit)


def test_get_base_model_is_the_wrapped_model():
    vit = tiny_vit()
    soft = softtf.wrap(vit)
    assert soft.get_base_model() is vit and soft.get_base_model() is soft.model
    assert isinstance(soft.get_base_model().blocks[3].attn.qkv, SoftLinear)


# ------------------------------------------------------------------------------------------ merge_and_unload
def vit_with_two_tasks(mask_dtype=None):
    soft = softtf.wrap(tiny_vit(), mask_init=("uniform", 0.5, 1.5), mask_dtype=mask_dtype)
    x = images()
    soft.add_task("t0", seed=0)
    train_masks(soft, x)
    soft.freeze_task("t0")  # t0: frozen store (in mask_dtype)
    soft.add_task("t1", seed=1)
    train_masks(soft, x)  # t1: the trainable Parameter
    return soft, x


@pytest.mark.parametrize("task", ["t0", "t1"])
@pytest.mark.parametrize("mask_dtype", [None, torch.bfloat16])
def test_merge_and_unload_vit_gives_the_task_outputs_from_plain_linears(task, mask_dtype):
    soft, x = vit_with_two_tasks(mask_dtype)
    soft.set_task("t0" if task == "t1" else "t1")  # merging does not depend on the selected task
    with torch.no_grad():
        ref = soft(x, task_names=task)
        with use_backend("reference"):
            ref_exact = soft(x, task_names=task)
    vit = soft.get_base_model()
    merged = soft.merge_and_unload(task)
    assert merged is vit and isinstance(merged, VisionTransformer)  # in place, as PEFT
    assert not soft_layers(merged) and not any(isinstance(m, SoftLinear) for m in merged.modules())
    assert type(merged.blocks[3].attn.qkv) is nn.Linear
    with torch.no_grad():
        out = merged(x)
    # the merged weight is the product the forward multiplies by: only the GEMM's summation order differs
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6), (out - ref).abs().max()
    assert torch.equal(out, ref_exact)  # the reference forms W ⊙ M in fp32 and calls F.linear: bit for bit
    with pytest.raises(RuntimeError, match="unwrapped"):
        soft(x)


def test_merge_and_unload_restores_requires_grad_keeps_bias_and_loads_into_a_fresh_model():
    vit = tiny_vit()
    vit.pos_embed.requires_grad_(False)  # a user's own choice, restored as by unwrap()
    bias = vit.blocks[3].attn.qkv.bias.detach().clone()
    soft = softtf.wrap(vit, mask_init=("uniform", 0.5, 1.5))
    soft.add_task("t0", seed=0)
    mask = soft.soft_layers["blocks.3.attn.qkv"].mask("t0").detach().clone()
    weight = vit.blocks[3].attn.qkv.weight.detach().clone()
    x = images()
    with torch.no_grad():
        ref = soft(x)
    merged = soft.merge_and_unload("t0")
    qkv = merged.blocks[3].attn.qkv
    assert torch.equal(qkv.weight, weight * mask) and torch.equal(qkv.bias, bias)
    assert {n for n, p in merged.named_parameters() if not p.requires_grad} == {"pos_embed"}
    fresh = tiny_vit(seed=5)
    fresh.load_state_dict(merged.state_dict())  # strict: the plain model's keys, no masks
    with torch.no_grad():
        assert torch.allclose(fresh(x), ref, rtol=1e-5, atol=1e-6)


def test_merge_and_unload_toy_model_3d_input_and_bias_free_layer():
    soft = softtf.wrap(Toy(), target_modules=["fc1", "fc2"], mask_init=("uniform", 0.0, 2.0))
    x = torch.randn(4, 7, 12, generator=torch.Generator().manual_seed(3))
    soft.add_task("a", seed=0)
    soft.add_task("b", seed=1)
    with torch.no_grad():
        ref = {t: soft(x, task_names=t) for t in ("a", "b")}
    other = copy.deepcopy(soft)
    for s, task in ((soft, "a"), (other, "b")):
        merged = s.merge_and_unload(task)
        assert type(merged.fc1) is nn.Linear and type(merged.fc2) is nn.Linear and merged.fc2.bias is None
        assert not soft_layers(merged)
        with torch.no_grad():
            out = merged(x)
        assert torch.allclose(out, ref[task], rtol=1e-5, atol=1e-6), (out - ref[task]).abs().max()


def test_merge_and_unload_bf16_weights_round_the_fp32_product_once():
    soft = softtf.wrap(Toy().to(torch.bfloat16), target_modules=["fc1"], mask_init=("uniform", 0.5, 1.5))
    soft.add_task("a", seed=0)
    layer = soft.soft_layers["fc1"]
    w, m = layer.weight.detach().clone(), layer.mask("a").detach().clone()
    assert m.dtype == torch.float32  # masks train in fp32 beside bf16 weights
    x = torch.randn(3, 12, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.no_grad():
        ref = soft(x)
    merged = soft.merge_and_unload("a")
    assert merged.fc1.weight.dtype == torch.bfloat16
    assert torch.equal(merged.fc1.weight, (w.float() * m).to(torch.bfloat16))
    with torch.no_grad():
        assert torch.allclose(merged(x).float(), ref.float(), rtol=2e-2, atol=2e-2)


def test_merge_and_unload_unknown_task_changes_nothing():
    soft, x = vit_with_two_tasks()
    with torch.no_grad():
        ref = soft(x, task_names="t1")
    weights = {n: p.detach().clone() for n, p in soft.named_parameters()}
    with pytest.raises(KeyError) as info:
        soft.merge_and_unload("t9")
    assert "'t9'" in str(info.value) and "t0" in str(info.value) and "t1" in str(info.value)
    assert len(soft_layers(soft.model)) == 6
    assert all(torch.equal(p, weights[n]) for n, p in soft.named_parameters())
    with torch.no_grad():
        assert torch.equal(soft(x, task_names="t1"), ref)


# ------------------------------------------------------------------------------------------ optimizer warning
def step(soft, opts, x):
    for opt in opts:
        opt.zero_grad()
    soft(x).pow(2).mean().backward()
    for opt in opts:
        opt.step()


def missed(record):
    return [w for w in record if issubclass(w.category, softtf.MissedMaskWarning)]


def test_an_optimizer_built_before_add_task_is_warned_about_once():
    soft = softtf.wrap(Toy(), target_modules=["fc1", "fc2"])
    x = torch.randn(4, 12)
    soft.add_task("t0")
    opt = torch.optim.Adam(soft.mask_parameters(), lr=1e-3)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):
            step(soft, [opt], x)
        soft.freeze_task("t0")
        soft.add_task("t1")
        step(soft, [opt], x)  # the first step after add_task: held back (another optimizer may step next)
        assert not missed(record)
        step(soft, [opt], x)
        step(soft, [opt], x)
    found = missed(record)
    assert len(found) == 1, [str(w.message) for w in found]
    msg = str(found[0].message)
    assert "'t1'" in msg and "add_task" in msg and "add_param_group" in msg and "2 mask parameters" in msg
    assert found[0].filename == __file__  # points at the user's step() call
    opt.add_param_group({"params": soft.mask_parameters()})  # the fix the message gives
    before = soft.soft_layers["fc1"].mask("t1").detach().clone()
    step(soft, [opt], x)
    assert not torch.equal(soft.soft_layers["fc1"].mask("t1"), before)


def test_an_optimizer_built_before_the_first_task_is_warned_about():
    soft = softtf.wrap(Toy(), target_modules=["fc1"], modules_to_save=["out"])
    opt = torch.optim.SGD(soft.trainable_parameters(), lr=0.1)  # the head only: no task exists yet
    soft.add_task("t0")
    with pytest.warns(softtf.MissedMaskWarning, match="'t0'"):
        for _ in range(2):
            step(soft, [opt], torch.randn(2, 12))


def test_no_warning_when_the_optimizer_is_built_after_add_task_or_masks_have_their_own():
    soft = softtf.wrap(Toy(), target_modules=["fc1", "fc2"], modules_to_save=["out"])
    x = torch.randn(4, 12)
    head_opt = torch.optim.SGD(soft.model.out.parameters(), lr=0.1)  # kept across tasks, steps first
    unrelated = nn.Linear(3, 3)
    other_opt = torch.optim.SGD(unrelated.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", softtf.MissedMaskWarning)
        for task in ("t0", "t1", "t2"):
            soft.add_task(task)
            opt = torch.optim.Adam(soft.trainable_parameters(), lr=1e-3)  # built after add_task
            for _ in range(3):
                step(soft, [opt], x)
            mask_opt = torch.optim.Adam(soft.mask_parameters(), lr=1e-3)  # a separate optimizer for the masks
            for _ in range(3):
                step(soft, [head_opt, mask_opt], x)
                unrelated(torch.randn(2, 3)).sum().backward()
                other_opt.step()  # an optimizer of another model while the masks hold gradients
            soft.freeze_task(task)


def test_no_warning_after_unwrap_or_merge():
    soft = softtf.wrap(Toy(), target_modules=["fc1"], modules_to_save=["out"])
    soft.add_task("t0")
    opt = torch.optim.SGD(soft.model.out.parameters(), lr=0.1)
    x = torch.randn(2, 12)
    soft(x).sum().backward()
    plain = soft.merge_and_unload("t0")
    with warnings.catch_warnings():
        warnings.simplefilter("error", softtf.MissedMaskWarning)
        for _ in range(3):
            opt.zero_grad()
            plain(x).sum().backward()
            opt.step()


def test_no_warning_from_an_optimizer_of_another_model():
    """A run trains the masks with an optimizer it then drops, and fits something else (a task
    classifier) while the masks still hold their last gradients: that optimizer is not warned."""
    soft = softtf.wrap(Toy(), target_modules=["fc1"])
    soft.add_task("t0")
    x = torch.randn(2, 12)
    step(soft, [torch.optim.SGD(soft.mask_parameters(), lr=0.1)], x)  # dropped right away
    assert soft.mask_parameters()[0].grad is not None
    other = nn.Linear(3, 3)
    other_opt = torch.optim.SGD(other.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", softtf.MissedMaskWarning)
        for _ in range(3):
            other_opt.zero_grad()
            other(torch.randn(2, 3)).sum().backward()
            other_opt.step()
