"""Gradient ID through torch.compile(fullgraph=True) (issue 17 #7).

superposed_linear used to choose between its two algorithms with ``torch.equal`` on α, a
data-dependent ``aten.equal`` that Dynamo cannot trace, so a compiled model failed in every
Gradient-ID rule. The choice now comes from α's stride (Gradient ID passes one row expanded) and,
under compile, never from its values. The "aot_eager" backend keeps these tests fast on a CPU while
still running the forward and the backward through AOT autograd's compiled graphs; the inductor
backend gives the same scores (measured on this 2-core CPU: ~16 s to compile the MLP below,
differences <= 3e-8), too slow for the default suite.
"""
import pytest
import torch
from torch import nn

import softtf
from softtf.core.layer import soft_layers
from softtf.inference.gradient_id import entropy, gradient_id, predict_with_tasks
from softtf_kernels.ops import superposed_linear

from timm.models.vision_transformer import VisionTransformer

TASKS = ("a", "b", "c", "d")
RULES = ("sample", "batch", "binary", "binary-sample")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def with_tasks(soft, seed=0):
    g = torch.Generator().manual_seed(seed)
    for t in TASKS:
        soft.add_task(t)
        with torch.no_grad():
            for p in soft.mask_parameters():
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
        soft.freeze_task(t)
    return soft


def mlp(mask_dtype=torch.float32):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 5))
    return with_tasks(softtf.wrap(base, softtf.SoftConfig(target_modules=["0", "2"], modules_to_save=[], mask_dtype=mask_dtype)))


def assert_same(compiled, eager):
    assert compiled.tasks == eager.tasks
    assert torch.equal(compiled.task_index, eager.task_index)
    fin = torch.isfinite(eager.scores)  # binary rules: eliminated tasks score +inf
    assert torch.equal(fin, torch.isfinite(compiled.scores))
    torch.testing.assert_close(compiled.scores[fin], eager.scores[fin], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.bfloat16], ids=["fp32-masks", "bf16-masks"])
def test_every_rule_through_a_fullgraph_compiled_model_matches_eager(mask_dtype):
    soft = mlp(mask_dtype)
    x = torch.randn(9, 6, generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(soft, fullgraph=True, backend="aot_eager")
    for rule in RULES:
        assert_same(gradient_id(compiled, x, rule=rule, k_shot=3, topk=3), gradient_id(soft, x, rule=rule, k_shot=3, topk=3))
    for task in TASKS:  # the layers' own modes are guarded: a compiled model follows set_task after Gradient ID
        soft.set_task(task)
        torch.testing.assert_close(compiled(x), soft(x))


def test_predict_with_tasks_through_a_compiled_model():
    soft = mlp()
    x = torch.randn(9, 6, generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(soft, fullgraph=True, backend="aot_eager")
    res = gradient_id(soft, x)
    torch.testing.assert_close(predict_with_tasks(compiled, x, res.task_index, res.tasks),
                               predict_with_tasks(soft, x, res.task_index, res.tasks))


def test_a_compiled_model_follows_use_task_and_use_tasks():
    """The task chosen per call (a context variable) is read under torch.compile too: switching it
    re-guards the graph instead of running the layer's active task (it used to, silently)."""
    soft = mlp()
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(2))
    compiled = torch.compile(soft, fullgraph=True, backend="aot_eager")
    for name in ("b", "a", "d", "b"):
        with softtf.use_task(name):
            torch.testing.assert_close(compiled(x), soft(x), rtol=0, atol=0)
            eager = soft(x)
        with softtf.use_task(name):
            torch.testing.assert_close(compiled(x), eager, rtol=0, atol=0)
    names = ["c", "a", "a", "d", "b"]
    with softtf.use_tasks(names):
        mixed = compiled(x)
    with softtf.use_tasks(names):
        torch.testing.assert_close(mixed, soft(x))
    torch.testing.assert_close(compiled(x), soft(x))  # no selection: the active task


def test_the_superposed_vit_forward_has_no_graph_break():
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=4, num_classes=6, embed_dim=32, depth=2, num_heads=4).eval()
    soft = with_tasks(softtf.wrap(vit))
    x = torch.randn(5, 3, 16, 16)
    layers = list(soft_layers(soft).values())
    alpha = torch.full((1, len(TASKS)), 1 / len(TASKS), requires_grad=True).expand(5, len(TASKS))
    for layer in layers:
        layer.set_superposed(TASKS, alpha)
    explanation = torch._dynamo.explain(soft)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    eager = gradient_id(soft, x, topk=3)
    assert_same(gradient_id(torch.compile(soft, fullgraph=True, backend="aot_eager"), x, topk=3), eager)


def test_the_scoring_step_compiles_whole_with_autograd_grad_traced():
    """Forward, entropy and ∂H/∂α in one fullgraph region. Dynamo traces torch.autograd.grad only
    with torch._dynamo.config.trace_autograd_ops (PyTorch's default: off, a graph break)."""
    soft = mlp()
    layers = list(soft_layers(soft).values())
    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(2))

    def scores(x, alpha):
        h = entropy(soft(x), topk=3)
        (g,) = torch.autograd.grad(h.sum(), alpha)
        return g

    def run(fn):
        alpha = torch.full((1, len(TASKS)), 1 / len(TASKS), requires_grad=True).expand(len(x), len(TASKS))
        for layer in layers:
            layer.set_superposed(TASKS, alpha)
        with torch.enable_grad():
            return fn(x, alpha)

    eager = run(scores)
    torch.testing.assert_close(eager, gradient_id(soft, x, topk=3).scores, rtol=0, atol=0)
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        compiled = run(torch.compile(scores, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("rows", ["expanded", "equal", "differ"])
def test_superposed_linear_compiles_for_any_alpha(rows):
    """α's rows equal by stride (one GEMM), equal by value (compiled: the per-sample path, same
    result) or differing (SAPT's router): fullgraph traces all three and matches eager."""
    g = torch.Generator().manual_seed(3)
    x, w, b = torch.randn(4, 3, 8, generator=g), torch.randn(5, 8, generator=g), torch.randn(5, generator=g)
    masks = torch.rand(3, 5, 8, generator=g) + 0.5
    row = torch.rand(1, 3, generator=g)
    alpha = {"expanded": row.expand(4, 3), "equal": row.repeat(4, 1), "differ": torch.rand(4, 3, generator=g)}[rows]
    alpha = alpha.detach().requires_grad_(True) if rows != "expanded" else row.clone().requires_grad_(True).expand(4, 3)

    def fn(x, alpha):
        y = superposed_linear(x, w, masks, alpha, b)
        (da,) = torch.autograd.grad(y.square().sum(), alpha)
        return y.detach(), da

    eager = fn(x, alpha)
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(x, alpha)
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)
