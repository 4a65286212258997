"""Prompt methods (L2P, DualPrompt, NoRGa), alone and with Soft-TF masks: the prompt machinery
against hand-written float64 versions of the official codes' formulas, and digits runs checking
what trains, what stays frozen, and that a resumed run equals an uninterrupted one."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

import softtf
from softtf.cl import RunConfig, load_data, run_continual
from softtf.cl.classifier import ContinualClassifier
from softtf.cl.runner import ContinualRun
from softtf.cl.scenario import scenario_for
from softtf.methods import method_class
from softtf.prompts import Prefix, PrefixPrompts, PromptedViT, TokenPromptPool, disable_prefixes, enable_prefixes, prompting
from softtf.prompts.attention import PREFIX_ACTIVATIONS

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT_METHODS = ("l2p", "dualprompt", "norga")


def tiny_vit(depth=4, embed_dim=32, heads=4, seed=0, pool="token"):
    torch.manual_seed(seed)
    return VisionTransformer(img_size=16, patch_size=4, num_classes=0, embed_dim=embed_dim, depth=depth,
                             num_heads=heads, global_pool=pool).eval()


def manual_attention(attn, x, pk=None, pv=None, alpha=0.0, tau=0.0, act=None):
    """timm's attention in float64 with prefixes the way MoE_PromptCL's attention.py applies them:
    prefix scores scaled, then s + alpha * act(tau * s), concatenated before the token scores."""
    B, N, C = x.shape
    H, D = attn.num_heads, attn.head_dim
    W, b = attn.qkv.weight.double(), attn.qkv.bias.double()
    qkv = (x.double() @ W.T + b).reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    s = (q @ k.transpose(-2, -1)) * attn.scale
    if pk is not None:
        kp, vp = pk.double().transpose(1, 2), pv.double().transpose(1, 2)
        sp = (q @ kp.transpose(-2, -1)) * attn.scale
        if act is not None:
            sp = sp + alpha * act(tau * sp)
        s, v = torch.cat([sp, s], -1), torch.cat([vp, v], 2)
    o = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, N, C)
    return o @ attn.proj.weight.double().T + attn.proj.bias.double()


# ---------------------------------------------------------------- the prompt machinery
def test_prompted_vit_without_prompts_is_the_vit_bit_for_bit_and_keeps_names():
    vit = tiny_vit()
    x = torch.randn(3, 3, 16, 16)
    ref, keys = vit(x), list(vit.state_dict())
    pv = PromptedViT(vit, prefix_layers=(0, 2))
    assert torch.equal(pv(x), ref)
    assert list(vit.state_dict()) == keys
    assert type(vit.blocks[0].attn).__name__ == "PrefixedAttention" and type(vit.blocks[1].attn).__name__ == "Attention"
    soft = softtf.wrap(vit)  # Soft-TF's default targets still resolve through the prefixed attention
    assert "blocks.2.attn.qkv" in soft.layer_names
    disable_prefixes(vit.blocks[0].attn)
    assert type(vit.blocks[0].attn).__name__ == "Attention"


@pytest.mark.parametrize("activation", PREFIX_ACTIVATIONS)
def test_prefixed_attention_matches_the_official_formula_in_float64(activation):
    vit = tiny_vit()
    attn = vit.blocks[1].attn
    torch.manual_seed(1)
    for p in attn.parameters():
        p.data.normal_(0, 0.3)
    enable_prefixes(attn)
    x, pk, pv = torch.randn(2, 7, 32), torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4, 8)
    alpha, tau = torch.tensor(0.7), torch.tensor(1.3)
    acts = {"none": None, "sigmoid": torch.sigmoid, "tanh": torch.tanh, "gelu": F.gelu}
    with prompting({attn: Prefix(pk, pv, alpha, tau, activation)}):
        out = attn(x)
    want = manual_attention(attn, x, pk, pv, 0.7, 1.3, acts[activation])
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-5)
    with prompting({attn: Prefix(pk[:, :0], pv[:, :0])}):  # P = 0: the plain attention
        torch.testing.assert_close(attn(x).double(), manual_attention(attn, x), rtol=1e-4, atol=1e-5)


def test_prefix_and_prompted_vit_refuse_bad_input():
    with pytest.raises(ValueError, match="activation"):
        Prefix(torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8), activation="relu")
    with pytest.raises(ValueError, match="alpha"):
        Prefix(torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8), activation="sigmoid")
    with pytest.raises(ValueError, match="one shape"):
        Prefix(torch.zeros(1, 2, 4, 8), torch.zeros(1, 3, 4, 8))
    with pytest.raises(TypeError, match="Attention"):
        enable_prefixes(torch.nn.Linear(2, 2))
    pv = PromptedViT(tiny_vit(), prefix_layers=(1,))
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match="do not take prefixes"):
        pv(x, prefixes={0: Prefix(torch.zeros(2, 1, 4, 8), torch.zeros(2, 1, 4, 8))})
    with pytest.raises(ValueError, match=r"\[2, P, 4, 8\]"):
        pv(x, prefixes={1: Prefix(torch.zeros(2, 1, 2, 16), torch.zeros(2, 1, 2, 16))})
    with pytest.raises(ValueError, match="pool"):
        pv(x, pool="prompt")
    with pytest.raises(ValueError, match="not blocks"):
        PromptedViT(tiny_vit(), prefix_layers=(9,))


def test_prompt_tokens_go_after_cls_and_pool_prompt_reads_their_mean():
    vit = tiny_vit()
    x, tokens = torch.randn(2, 3, 16, 16), torch.randn(2, 6, 32)
    got = PromptedViT(vit)(x, tokens=tokens, pool="prompt")
    h = vit.patch_embed(x)
    h = vit.norm_pre(vit._pos_embed(h))
    h = vit.norm(vit.blocks(torch.cat([h[:, :1], tokens, h[:, 1:]], 1)))
    torch.testing.assert_close(got, h[:, 1:7].mean(1))
    torch.testing.assert_close(PromptedViT(vit)(x, tokens=tokens), h[:, 0])  # global_pool "token": the [CLS]


def test_token_pool_selects_the_nearest_keys_and_pulls_them():
    torch.manual_seed(0)
    pool = TokenPromptPool(size=6, length=2, dim=8, top_k=3)
    q = torch.randn(4, 8)
    tokens, ids, reduce_sim = pool.select(q)
    cos = F.cosine_similarity(q.double()[:, None], pool.keys.double()[None], dim=-1)
    assert torch.equal(ids, cos.argsort(dim=1, descending=True)[:, :3])
    torch.testing.assert_close(reduce_sim.double(), cos.gather(1, ids).sum() / 4)
    assert torch.equal(tokens, pool.prompts[ids].reshape(4, 6, 8))
    (-reduce_sim).backward()
    assert pool.keys.grad is not None and pool.keys.grad[ids.unique()].abs().sum() > 0
    with pytest.raises(ValueError, match="top_k"):
        TokenPromptPool(size=2, length=1, dim=4, top_k=3)


def test_prefix_prompts_select_per_sample_rows():
    torch.manual_seed(0)
    pp = PrefixPrompts((1, 3), length=2, num_heads=4, head_dim=8)
    for name in ("a", "b", "c"):
        pp.add(name)
    index = torch.tensor([2, 0, 2, 1])
    mixed = pp.select(index, ["a", "b", "c"])
    one = pp.select(torch.tensor([1, 1]), ["a", "b", "c"])
    for pos, layer in enumerate((1, 3)):
        for b, t in enumerate(index.tolist()):
            assert torch.equal(mixed[layer].key[b], pp.prompts[t][pos][0])
            assert torch.equal(mixed[layer].value[b], pp.prompts[t][pos][1])
        assert torch.equal(one[layer].key[1], pp.prompts[1][pos][0])
    with pytest.raises(KeyError, match="no prompts for task 'z'"):
        pp.select(index, ["z"])


# ---------------------------------------------------------------- the methods on digits
@pytest.fixture(scope="module")
def digits():
    return load_data("digits", img_size=16, seed=0)


def make_run(method, digits, out=None, n_tasks=2, **kw):
    cfg = RunConfig(method=method, n_tasks=n_tasks, epochs=1, lr=3e-3, progress=False, **kw)
    return run_continual(tiny_vit(pool="avg"), digits, cfg, output_dir=out)


def test_run_config_masks_and_default_task_inference():
    assert RunConfig(method="l2p").task_id == "none"
    assert RunConfig(method="l2p", masks=True).task_id == "prompt"
    assert RunConfig(method="dualprompt").task_id == "prompt"
    with pytest.raises(ValueError, match="masks"):
        RunConfig(method="softtf", masks=True)
    with pytest.raises(ValueError, match="l2p with masks needs task inference"):
        RunConfig(method="l2p", masks=True, task_id="none")
    with pytest.raises(ValueError, match="prompt_activation"):
        RunConfig(method="norga", prompt_activation="relu")
    with pytest.raises(ValueError, match="supports task_id"):
        RunConfig(method="dualprompt", task_id="gradient")


@pytest.mark.parametrize("masks", [False, True])
@pytest.mark.parametrize("method", PROMPT_METHODS)
def test_each_prompt_method_runs_on_digits_and_freezes_what_it_should(method, masks, digits):
    res = make_run(method, digits, masks=masks)
    assert res.record["method"] == method and res.record["method_info"]["masks"] is masks
    for head in res.record["heads"].values():
        assert all(0 <= a <= 100 for row in head["accuracy_matrix"] for a in row if a is not None)
    parts = res.classifier.prompt_parts
    if method != "l2p":
        e = parts.e
        assert e.tasks == ["task0", "task1"] and not any(p.requires_grad for t in e.prompts for p in t)
    if masks:
        soft = res.method.soft
        assert soft.tasks == ["task0", "task1"] and soft.frozen_tasks == ["task0", "task1"]
        assert res.record["method_info"]["mask_layers"] == soft.layer_names


def staged_run(method, digits, n_tasks=5, **kw):
    cfg = RunConfig(method=method, n_tasks=n_tasks, epochs=1, lr=3e-3, progress=False, **kw)
    return ContinualRun(tiny_vit(pool="avg"), digits, cfg, scenario_for(digits, n_tasks, seed=0), None, None)


def test_old_prompts_and_masks_are_bit_identical_after_later_tasks(digits):
    """Task 0's E-prompt and mask after task 0 equal them after task 2; the shared G-prompt trains on."""
    run = staged_run("dualprompt", digits, masks=True)
    method = run.method
    layer = next(iter(method.soft.soft_layers.values()))

    def snapshot():
        return ([p.detach().clone() for p in method.parts.e.prompts[0]], layer.mask("task0").detach().clone(),
                [p.detach().clone() for p in method.parts.g.prompts[0]])

    run.train_task(0)
    before = snapshot()
    run.train_task(1)
    run.train_task(2)
    after = snapshot()
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0]))
    assert torch.equal(before[1], after[1])
    assert not all(torch.equal(a, b) for a, b in zip(before[2], after[2]))


@pytest.mark.parametrize("activation", ["sigmoid", "tanh"])
def test_norga_gate_learns_in_task_zero_then_is_frozen(activation, digits):
    run = staged_run("norga", digits, prompt_activation=activation)
    gates = run.method.gate_parameters()
    assert all(float(p.detach()) == 1.0 for p in gates)
    run.train_task(0)
    after0 = [p.detach().clone() for p in gates]
    assert all(float(p) != 1.0 for p in after0), "alpha and tau must train during the first task"
    run.train_task(1)
    run.train_task(2)
    assert all(torch.equal(a, p) for a, p in zip(after0, gates)) and not any(p.requires_grad for p in gates)
    assert run.method.info()["activation"] == activation


def test_mixed_task_batch_equals_per_sample_forwards(digits):
    """forward_tasks routes each sample to its own E-prompt and mask in one batch."""
    res = make_run("norga", digits, masks=True, n_tasks=2)
    method, x = res.method, digits.test.inputs[:6]
    index = torch.tensor([0, 1, 1, 0, 1, 0])
    with torch.no_grad():
        mixed = method.forward_tasks(x, index, ["task0", "task1"])
        single = torch.cat([method.forward_tasks(x[b:b + 1], index[b:b + 1], ["task0", "task1"]) for b in range(6)])
    torch.testing.assert_close(mixed, single, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        diff = method.forward_tasks(x, torch.zeros(6, dtype=torch.long), ["task0", "task1"])
    assert not torch.allclose(diff, mixed)


@pytest.mark.parametrize("method,masks", [("dualprompt", True), ("l2p", False), ("norga", False)])
def test_a_resumed_run_equals_an_uninterrupted_one(method, masks, digits, tmp_path):
    from test_runner import truncate_run

    full = make_run(method, digits, tmp_path / "a", n_tasks=2, masks=masks)
    make_run(method, digits, tmp_path / "b", n_tasks=2, masks=masks)
    truncate_run(tmp_path / "b", 1)
    resumed = make_run(method, digits, tmp_path / "b", n_tasks=2, masks=masks)
    for head in full.record["heads"]:
        assert resumed.record["heads"][head]["accuracy_matrix"] == full.record["heads"][head]["accuracy_matrix"]
    saved = json.loads((tmp_path / "b" / "results.json").read_text())
    assert saved["method_info"] == full.record["method_info"]


def test_prompt_methods_refuse_a_bert_backbone():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    clf = ContinualClassifier(transformers.BertModel(cfg), 4)
    with pytest.raises(ValueError, match="timm ViT"):
        method_class("dualprompt")(clf, RunConfig(method="dualprompt"))


def test_a_prompt_method_with_the_task_identity_classifier(digits):
    res = make_run("dualprompt", digits, masks=True, task_id="classifier", tii_epochs=2, tii_ca_epochs=2)
    assert res.record["task_id_mode"] == "classifier" and res.record["task_id_grouping"] == "per sample"
    assert 0.0 <= res.record["task_id_accuracy"] <= 100.0  # percent
