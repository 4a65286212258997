"""torch.autocast over wrapped models and the softtf ops: the ops run in the autocast dtype, as
torch's own linear does, and trainable fp32 masks still get fp32 gradients."""
import copy

import pytest
import torch

import softtf

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_vit():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)


def _tiny_bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32, num_labels=4)
    return transformers.BertForSequenceClassification(cfg).eval()


@pytest.mark.parametrize("kind", ["vit", "bert"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_wrapped_model_under_cpu_autocast(kind, dtype):
    pytest.importorskip("timm")
    base = _tiny_vit() if kind == "vit" else _tiny_bert()
    plain = copy.deepcopy(base)
    model = softtf.wrap(base)
    model.add_task("a")  # all-ones masks: the wrapped model computes what the plain one does
    if kind == "vit":
        inputs = {"x": torch.randn(2, 3, 32, 32)}
    else:
        inputs = {"input_ids": torch.randint(1, 100, (2, 9)), "attention_mask": torch.ones(2, 9, dtype=torch.long)}

    def logits(m):
        out = m(**inputs)
        return getattr(out, "logits", out)

    with torch.autocast("cpu", dtype=dtype):
        y, ref = logits(model), logits(plain)
    assert y.dtype == ref.dtype
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2)
    y.float().pow(2).sum().backward()
    masks = [p for p in model.trainable_parameters() if p.dim() == 2 and p.requires_grad]
    assert masks and all(p.dtype == torch.float32 for p in masks)
    soft = [m for m in model.modules() if isinstance(m, softtf.SoftLinear)]
    for layer in soft:
        mask = layer.masks["a"]
        assert mask.grad is not None and mask.grad.dtype == torch.float32 and torch.isfinite(mask.grad).all()


def test_ops_cast_to_the_autocast_dtype_and_leave_float64():
    x, w = torch.randn(3, 8), torch.randn(5, 8)
    m = torch.rand(5, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = torch.ops.softtf.masked_linear(x, w, m, None)
        y64 = torch.ops.softtf.masked_linear(x.double(), w.double(), m.detach().double(), None)
        masks = torch.rand(2, 5, 8)
        ym = torch.ops.softtf.mixed_task_linear(x, w, masks, torch.tensor([0, 1, 0]), None)
        a, b, wts = torch.randn(2, 4, 8), torch.randn(2, 8, 4), torch.rand(3, 2)
        yl = torch.ops.softtf.routed_lora(x, a, b, wts, 2.0)
    assert y.dtype == ym.dtype == yl.dtype == torch.bfloat16
    assert y64.dtype == torch.float64
    ref = torch.nn.functional.linear(x.bfloat16(), (w.bfloat16() * m.detach().bfloat16()))
    torch.testing.assert_close(y, ref, rtol=2e-2, atol=2e-2)
    y.float().sum().backward()
    assert m.grad.dtype == torch.float32
    # outside autocast nothing is cast
    assert torch.ops.softtf.masked_linear(x, w, m, None).dtype == torch.float32


def test_prefix_attention_under_autocast():
    b, h, n, p, d = 2, 2, 5, 3, 8
    q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
    pk, pv = torch.randn(b, h, p, d), torch.randn(b, h, p, d)
    alpha, tau = torch.tensor(1.0), torch.tensor(1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = torch.ops.softtf.prefix_attention(q, k, v, pk, pv, alpha, tau, "none")
    assert out.dtype == torch.bfloat16
    ref = torch.ops.softtf.prefix_attention(q, k, v, pk, pv, alpha, tau, "none")
    torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2)


def test_autocast_kernels_registered_for_cpu_and_cuda():
    from softtf_kernels.registry import AUTOCAST_OPS

    for name in AUTOCAST_OPS:
        for key in ("AutocastCPU", "AutocastCUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"softtf::{name}", key), (name, key)
