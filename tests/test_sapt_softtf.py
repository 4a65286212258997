"""--method sapt-softtf: SAPT's router choosing among Soft-TF masks. A masked layer must compute
y_b = x_b (W ⊙ Σ_t w_bt M_t)ᵀ + b for every sample (checked in float64, values and gradients of the
trained mask and of the routing weights); frozen masks stay bit-identical; a digits run trains,
routes and resumes to the same numbers."""
import copy
import shutil

import pytest
import torch

from softtf.cl import ContinualClassifier, RunConfig, load_digits, pretrain, run_continual
from softtf.core.files import load_tensors

from test_runner import truncate_run  # noqa: E402
from test_text_tasks import minilm_text_tasks  # noqa: E402
from timm.models.vision_transformer import VisionTransformer


@pytest.fixture(scope="module", autouse=True)
def _one_thread(module_one_thread):
    """Every test and module fixture here runs on one torch thread (conftest)."""


def tiny_vit():
    torch.manual_seed(0)
    return VisionTransformer(img_size=16, patch_size=4, num_classes=0, embed_dim=32, depth=2, num_heads=4, global_pool="avg")


def test_a_masked_layer_mixes_each_samples_masks():
    from softtf.methods.sapt_softtf import SAPTSoftTFMethod

    clf = ContinualClassifier(tiny_vit(), 6)
    m = SAPTSoftTFMethod(clf, RunConfig(method="sapt-softtf", n_tasks=3, progress=False))
    gen = torch.Generator().manual_seed(0)
    for t in range(3):
        m.begin_task(t, f"task{t}")
        with torch.no_grad():
            for p in m.soft.mask_parameters():
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
        if t < 2:
            m.end_task(t, f"task{t}")
    name, layer = next(iter(m.soft.soft_layers.items()))
    x = torch.randn(3, 5, layer.in_features, generator=gen)
    w = torch.softmax(torch.randn(3, 3, generator=gen), -1).requires_grad_(True)
    with m.routing.use(w):
        m.soft.set_task("task2")
        y = layer(x)
    cur = layer.masks["task2"]
    g = torch.randn(y.shape, generator=gen)
    (y * g).sum().backward()

    masks64 = [layer.frozen_masks[0].double(), layer.frozen_masks[1].double(), cur.detach().double().requires_grad_(True)]
    w64 = w.detach().double().requires_grad_(True)
    W, b = layer.weight.double(), layer.bias.double()
    y64 = torch.stack([x[i].double() @ (W * sum(w64[i, t] * masks64[t] for t in range(3))).T + b for i in range(3)])
    (y64 * g.double()).sum().backward()
    torch.testing.assert_close(y.double(), y64, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cur.grad.double(), masks64[2].grad, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-3)
    with m.pretrained():  # the pretrained layer, no router needed
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))


@pytest.fixture(scope="module")
def digits():
    return load_digits(img_size=16, seed=0)


@pytest.fixture(scope="module")
def backbone(digits):
    return pretrain(tiny_vit(), digits.train, 10, epochs=4, lr=2e-3, batch_size=32, seed=0)


def run(backbone, digits, out):
    cfg = RunConfig(method="sapt-softtf", n_tasks=5, epochs=2, lr=0.01, progress=False)
    return run_continual(copy.deepcopy(backbone), digits, cfg, output_dir=out)


def test_digits_run_freezes_masks_and_resumes(backbone, digits, tmp_path):
    out = tmp_path / "run"
    res = run(backbone, digits, out)
    assert res["task_id_mode"] == "none" and res["acc"] > 40.0, res["accuracy_matrix"]  # chance: 10
    m = res.method
    assert m.soft.tasks == [f"task{t}" for t in range(5)] and m.router.n_keys == 5
    assert res["method_info"]["mask_layers"] == ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.1.attn.qkv", "blocks.1.attn.proj"]
    # task 0's masks and key after task 0 = after task 4, bit for bit
    ck = load_tensors(out / "checkpoints" / "task_000.safetensors")
    assert torch.equal(ck["extra::sapt::router::keys.0"], m.router.keys[0].detach())  # the mask-file format's extras
    for name, layer in m.soft.soft_layers.items():
        assert torch.equal(ck[f"{name}::task0"], layer.frozen_masks[0]), name
    part = tmp_path / "part"
    shutil.copytree(out, part)
    truncate_run(part, 2)
    (part / "results.json").unlink()
    resumed = run(backbone, digits, part)
    assert resumed["accuracy_matrix"] == res["accuracy_matrix"]


def test_generated_text_tasks_on_minilm(tmp_path):
    bert, data = minilm_text_tasks(tmp_path / "t")
    res = run_continual(bert, data, RunConfig(method="sapt-softtf", n_tasks=3, epochs=2, batch_size=8, lr=0.01, progress=False),
                        output_dir=tmp_path / "run")
    assert res.method.soft.tasks == ["topics", "news", "reviews"]
    assert res["method_info"]["mask_layers"][0] == "encoder.layer.3.attention.self.query"  # q/k/v of the last 3 layers
    assert res["acc"] > 34.0, res["accuracy_matrix"]  # chance over the 7 classes: 14
