"""SAPT (--method sapt): the router against a hand-written float64 version of the official
cal_attention, the attentive-reflection KL against a manual computation, the routed LoRA layers
(one-hot weights = one LoRA, PEFT's included; SAPT itself always routes), frozen earlier blocks and keys, the transfer
metrics, and end-to-end runs on digits (ViT) and on generated text tasks (the real MiniLM), with a
resume that must give the uninterrupted run's numbers.

The mixture goes through ``softtf_kernels.ops.routed_lora``. While that op is not in the tree yet,
the tests install a pure-PyTorch stand-in with the same signature (``routed_lora_standin``).
"""
import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import softtf_kernels.ops as kernel_ops
from softtf.cl import RunConfig, load_digits, pretrain, run_continual
from softtf.cl import metrics
from softtf.core.files import load_tensors
from softtf.methods.sapt_layers import RoutedLoRALinear, RoutedLoRAQKV, Routing
from softtf.methods.sapt_router import SAPTRouter, pad_routing, reflection_loss

from test_runner import truncate_run  # noqa: E402
from test_text_tasks import minilm_text_tasks  # noqa: E402
from timm.models.vision_transformer import VisionTransformer


@pytest.fixture(scope="module", autouse=True)
def _one_thread(module_one_thread):
    """Every test and module fixture here runs on one torch thread (conftest)."""


def routed_lora_standin(x, lora_a, lora_b, weights, scaling):
    """Σ_t weights[b, t] · scaling · x_b A_tᵀ B_tᵀ (the op's definition, in plain PyTorch)."""
    h = torch.einsum("bni,tri->bntr", x, lora_a) * (weights * scaling)[:, None, :, None]
    return torch.einsum("bntr,tor->bno", h, lora_b)


@pytest.fixture(autouse=True, scope="module")
def _routed_lora_op():
    if hasattr(kernel_ops, "routed_lora"):
        yield
        return
    kernel_ops.routed_lora = routed_lora_standin
    yield
    del kernel_ops.routed_lora


# ---------------------------------------------------------------- router and reflection
def manual_router64(W1, W2, ln_w, ln_b, keys, emb, mask):
    """The official cal_attention in float64 by hand: masked max-pool, Linear, Linear, SiLU, LayerNorm,
    keys·q / sqrt(d), softmax over tasks."""
    emb = emb.double().clone()
    emb[~mask] = -math.inf
    x = emb.max(dim=1).values
    h = x @ W1.double().T @ W2.double().T
    h = h * torch.sigmoid(h)
    mu = h.mean(-1, keepdim=True)
    var = ((h - mu) ** 2).mean(-1, keepdim=True)
    q = (h - mu) / torch.sqrt(var + 1e-5) * ln_w.double() + ln_b.double()
    scores = q @ keys.double().T / math.sqrt(keys.shape[1])
    return torch.exp(scores - torch.logsumexp(scores, -1, keepdim=True))


def test_router_equals_a_hand_written_float64_router():
    torch.manual_seed(0)
    d, B, N = 12, 4, 6
    router = SAPTRouter(d, hidden=5)
    for _ in range(3):
        router.add_key()
    with torch.no_grad():  # a non-trivial LayerNorm affine
        router.trans_input[3].weight.uniform_(0.5, 1.5)
        router.trans_input[3].bias.uniform_(-0.5, 0.5)
    emb = torch.randn(B, N, d)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, 4:] = False
    mask[2, 1:] = False
    emb[1, 4:] = 100.0  # padding would win the max if it were not excluded
    W1, W2 = router.trans_input[0].weight, router.trans_input[1].weight
    ln = router.trans_input[3]
    want = manual_router64(W1, W2, ln.weight, ln.bias, torch.stack(list(router.keys)), emb, mask)
    got = router(emb, mask)
    assert got.shape == (B, 3)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    got64 = copy.deepcopy(router).double()(emb.double(), mask)
    torch.testing.assert_close(got64, want, rtol=1e-12, atol=1e-13)
    # routing over the first two keys only: the softmax of the first two scores
    two = router(emb, mask, n_keys=2)
    torch.testing.assert_close(two, torch.softmax(router.scores(emb, mask)[:, :2], -1))
    with pytest.raises(ValueError, match=r"n_keys must be in \[1, 3\]"):
        router(emb, mask, n_keys=4)


def test_reflection_kl_matches_a_manual_computation():
    torch.manual_seed(1)
    scores = torch.randn(5, 3, dtype=torch.float64)
    saved = torch.tensor([0.25, 0.75], dtype=torch.float64)  # task 1's mean routing over keys 0, 1
    target = pad_routing(saved, 3)
    assert target.tolist() == [0.25, 0.75, 0.0]
    log_p = scores - torch.logsumexp(scores, -1, keepdim=True)
    manual = sum(float(target[t] * (math.log(target[t]) - log_p[b, t])) for b in range(5) for t in range(3) if target[t] > 0) / 5
    assert float(reflection_loss(scores, target)) == pytest.approx(manual, rel=1e-12)
    assert float(reflection_loss(scores, target)) == pytest.approx(
        float(torch.nn.KLDivLoss(reduction="batchmean")(F.log_softmax(scores, 1), target.repeat(5, 1))), rel=1e-12)
    with pytest.raises(ValueError, match="cannot be padded"):
        pad_routing(torch.ones(4), 3)


# ---------------------------------------------------------------- routed layers
def test_one_hot_weights_equal_a_single_lora():
    torch.manual_seed(2)
    base = torch.nn.Linear(10, 7)
    layer = RoutedLoRALinear(base, Routing(), r=4, scaling=32 / 4)
    for _ in range(3):
        layer.lora.add()
    with torch.no_grad():
        for b in layer.lora.B:
            b.normal_()
    x = torch.randn(2, 5, 10)
    w = F.one_hot(torch.tensor([1, 2]), 3).float()
    with layer.routing.use(w):
        y = layer(x)
    for i, t in enumerate((1, 2)):
        A, Bm = layer.lora.A[t], layer.lora.B[t]
        torch.testing.assert_close(y[i], base(x[i]) + 8.0 * x[i] @ A.T @ Bm.T)
    with layer.routing.disabled():  # the pretrained layer
        torch.testing.assert_close(layer(x), base(x))
    with pytest.raises(RuntimeError, match="without routing weights"):
        layer(x)

    peft = pytest.importorskip("peft")  # T = 1: PEFT's LoRA (r 4, alpha 32, no dropout) gives the same output
    model = peft.get_peft_model(torch.nn.Sequential(copy.deepcopy(base)), peft.LoraConfig(r=4, lora_alpha=32, target_modules=["0"]))
    lora_mod = model.base_model.model[0]
    with torch.no_grad():
        lora_mod.lora_A["default"].weight.copy_(layer.lora.A[0])
        lora_mod.lora_B["default"].weight.copy_(layer.lora.B[0])
    with layer.routing.use(torch.ones(2, 1)):
        torch.testing.assert_close(layer(x), model(x))


def test_vit_qkv_lora_acts_on_the_q_and_v_slices():
    torch.manual_seed(3)
    base = torch.nn.Linear(8, 24)
    layer = RoutedLoRAQKV(base, Routing(), r=2, scaling=2.0)
    for _ in range(2):
        layer.lora_q.add()
        layer.lora_v.add()
    with torch.no_grad():
        for p in list(layer.lora_q.B) + list(layer.lora_v.B):
            p.normal_()
    x = torch.randn(3, 4, 8)
    with layer.routing.use(F.one_hot(torch.tensor([0, 1, 1]), 2).float()):
        y = layer(x)
    for b, t in enumerate((0, 1, 1)):
        q, k, v = base(x[b]).split(8, -1)
        dq = 2.0 * x[b] @ layer.lora_q.A[t].T @ layer.lora_q.B[t].T
        dv = 2.0 * x[b] @ layer.lora_v.A[t].T @ layer.lora_v.B[t].T
        torch.testing.assert_close(y[b], torch.cat([q + dq, k, v + dv], -1))


# ---------------------------------------------------------------- metrics
def test_sapt_transfer_metrics():
    A = [[80.0, np.nan, np.nan], [70.0, 90.0, np.nan], [60.0, 85.0, 70.0]]
    ref = [82.0, 88.0, 75.0]
    paper = metrics.transfer_summary(A, ref)
    assert paper["AP"] == pytest.approx((60 + 85 + 70) / 3)
    assert paper["F.Ra"] == pytest.approx(((80 - 60) + (90 - 85)) / 2)
    assert paper["FWT"] == pytest.approx(((80 - 82) + (90 - 88) + (70 - 75)) / 3)
    assert paper["BWT"] == pytest.approx(((60 - 80) + (85 - 90)) / 2)
    assert metrics.transfer_summary(A)["FWT"] is None  # no single-task reference
    official = metrics.transfer_summary(A, variant="official")
    assert official["FWT"] == pytest.approx((80 + 90 + 70) / 3 - 50.94)
    assert official["BWT"] == pytest.approx(((60 - 80) + (85 - 90) + 0) / 3)
    with pytest.raises(ValueError, match="reference must hold 3 finite"):
        metrics.forward_transfer(A, [1.0, 2.0])
    for k in ("sapt.AP", "sapt.F.Ra", "sapt.FWT", "sapt.BWT", "sapt.FWT (official)", "sapt.BWT (official)"):
        assert k in metrics.DEFINITIONS


@pytest.mark.parametrize("kwargs, match", [
    ({"method": "sapt", "task_id": "oracle"}, r"method 'sapt' supports task_id in \('none',\)"),
    ({"method": "sapt", "sapt_kl_ratio": -1}, "sapt_kl_ratio must be a finite number >= 0"),
    ({"method": "sapt", "sapt_alpha": 0}, "sapt_alpha must be a finite number > 0"),
    ({"method": "sapt", "sapt_r": 0}, "sapt_r must be an int >= 1"),
    ({"method": "sapt", "reference_acc": [1.0]}, "reference_acc must be None or 5 finite numbers"),
    ({"transfer_metrics": "score"}, r"transfer_metrics must be one of \('paper', 'official'\)"),
])
def test_run_config_sapt_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RunConfig(**kwargs)


# ---------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def digits():
    return load_digits(img_size=16, seed=0)


@pytest.fixture(scope="module")
def backbone(digits):
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=4, num_classes=0, embed_dim=32, depth=2, num_heads=4, global_pool="avg")
    return pretrain(vit, digits.train, 10, epochs=4, lr=2e-3, batch_size=32, seed=0)


def run(backbone, digits, out=None, **kw):
    cfg = RunConfig(**{"method": "sapt", "epochs": 2, "lr": 0.01, "n_tasks": 5, "progress": False, **kw})
    return run_continual(copy.deepcopy(backbone), digits, cfg, output_dir=out)


@pytest.fixture(scope="module")
def digits_run(backbone, digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("sapt") / "run"
    return out, run(backbone, digits, out=out, reference_acc=[90.0] * 5)


def test_digits_run_routes_without_task_inference(digits_run, digits):
    out, res = digits_run
    assert res["task_id_mode"] == "none" and res["task_id_accuracy"] is None and set(res["heads"]) == {"full"}
    assert res["acc"] > 40.0, res["accuracy_matrix"]  # chance over 10 classes: 10
    sapt = res["sapt"]
    A = np.array([[np.nan if v is None else v for v in row] for row in res["accuracy_matrix"]])
    assert sapt["AP"] == res["acc"] and sapt["F.Ra"] == res["forgetting"] and sapt["BWT"] == res["bwt"]
    assert sapt["FWT"] == pytest.approx(np.mean(np.diag(A)) - 90.0)
    info = res["method_info"]
    assert info["lora_r"] == 4 and info["scaling"] == 8.0 and info["replay"] == "buffer"
    assert info["lora_layers"] == ["blocks.0.attn.qkv.q", "blocks.0.attn.qkv.v", "blocks.1.attn.qkv.q", "blocks.1.attn.qkv.v"]
    m = res.method
    assert m.router.n_keys == 5 and [len(b) for b in m.blocks.values()] == [5] * 4
    assert m.routing_means[0].tolist() == [1.0] and m.routing_means[2].shape == (3,)
    x = torch.stack([digits.test[i][0] for i in range(6)])
    w = m.routing_weights(x)
    assert w.shape == (6, 5) and torch.allclose(w.sum(1), torch.ones(6))
    saved = json.loads((out / "results.json").read_text())
    assert saved["sapt"]["FWT"] == sapt["FWT"] and "sapt.FWT" in saved["metric_definitions"]


def test_earlier_blocks_and_keys_stay_bit_identical(digits_run):
    out, res = digits_run
    m = res.method
    for t in range(2):
        ck = load_tensors(out / "checkpoints" / f"task_{t:03d}.safetensors")
        for name, blocks in m.blocks.items():
            for s in range(t + 1):
                assert torch.equal(ck[f"sapt::lora::{name}::A.{s}"], blocks.A[s].detach())
                assert torch.equal(ck[f"sapt::lora::{name}::B.{s}"], blocks.B[s].detach())
                assert not blocks.A[s].requires_grad and not blocks.B[s].requires_grad
        for s in range(t + 1):
            assert torch.equal(ck[f"sapt::router::keys.{s}"], m.router.keys[s].detach())
        # the shared router kept learning after task 0 (task 1 and 2 train it, the KL term included)
    ck0 = load_tensors(out / "checkpoints" / "task_000.safetensors")
    assert not torch.equal(ck0["sapt::router::trans_input.0.weight"], m.router.trans_input[0].weight.detach())


def test_reflection_term_of_the_method(digits_run):
    _, res = digits_run
    m = res.method
    trained = list(m.trained)
    m.current, m.trained = 2, trained[:2]
    try:
        m.rng = torch.Generator().manual_seed(5)
        got = m.reflection(8)
        rng = torch.Generator().manual_seed(5)
        want = 0.0
        for s in range(2):
            idx = torch.randperm(32, generator=rng)[:8]
            scores = m.scores(m.buffers[s][idx], 3).double()
            log_p = scores - torch.logsumexp(scores, -1, keepdim=True)
            target = torch.cat([m.routing_means[s], torch.zeros(2 - s)]).double()
            terms = torch.where(target > 0, target * (torch.log(target.clamp_min(1e-300)) - log_p), torch.zeros_like(log_p))
            want += float(terms.sum().detach() / 8)
        assert float(got.detach()) == pytest.approx(0.5 * want, rel=1e-5)
    finally:
        m.current, m.trained = None, trained


def test_resume_equals_the_uninterrupted_run(digits_run, backbone, digits, tmp_path):
    import shutil

    out, res = digits_run
    part = tmp_path / "part"
    shutil.copytree(out, part)
    truncate_run(part, 2)
    (part / "results.json").unlink()
    resumed = run(backbone, digits, out=part, reference_acc=[80.0] * 5)  # the reference may change on resume
    assert resumed["accuracy_matrix"] == res["accuracy_matrix"]
    assert resumed["sapt"]["FWT"] == pytest.approx(res["sapt"]["FWT"] + 10.0)
    a, b = resumed.method.router.state_dict(), res.method.router.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_official_transfer_metrics_variant(backbone, digits):
    res = run(backbone, digits, n_tasks=2, epochs=1, transfer_metrics="official")
    A = res["accuracy_matrix"]
    assert res["sapt"]["variant"] == "official"
    assert res["sapt"]["FWT"] == pytest.approx((A[0][0] + A[1][1]) / 2 - 50.94)
    assert res["sapt"]["BWT"] == pytest.approx((A[1][0] - A[0][0]) / 2)
    with pytest.raises(ValueError, match="takes no task per sample"):
        res.method.forward_tasks(torch.zeros(1, 1, 16, 16), torch.zeros(1, dtype=torch.long), ["task0", "task1"])


def test_generated_text_tasks_on_minilm(tmp_path):
    bert, data = minilm_text_tasks(tmp_path / "t")
    cfg = RunConfig(method="sapt", n_tasks=3, epochs=2, batch_size=8, lr=0.01, progress=False)
    res = run_continual(bert, data, cfg, output_dir=tmp_path / "run")
    assert res.method.trained == ["topics", "news", "reviews"]
    assert res["method_info"]["lora_layers"][:2] == ["encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.value"]
    assert len(res["method_info"]["lora_layers"]) == 12  # 6 layers x (query, value)
    assert res["acc"] > 34.0, res["accuracy_matrix"]  # chance over the 7 classes: 14


def test_cli_flags_reach_therun_config(tmp_path):
    from softtf.cli import build_parser, run_config

    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps({f"task{t}": 80.0 + t for t in range(5)}))
    args = build_parser().parse_args(["train", "--model", "vit", "--data", "digits", "--method", "sapt", "--output", "o",
                                      "--sapt-r", "8", "--sapt-alpha", "16", "--sapt-kl-ratio", "0.1",
                                      "--sapt-replay-size", "0", "--reference-acc", str(ref), "--transfer-metrics", "official"])
    args.tasks = 5
    cfg = run_config(args, 0)
    assert (cfg.task_id, cfg.sapt_r, cfg.sapt_alpha, cfg.sapt_kl_ratio, cfg.sapt_replay_size) == ("none", 8, 16.0, 0.1, 0)
    assert cfg.reference_acc == [80.0, 81.0, 82.0, 83.0, 84.0] and cfg.transfer_metrics == "official"
    assert RunConfig().sapt_r == 4 and RunConfig().sapt_alpha == 32.0 and RunConfig().sapt_kl_ratio == 0.5
    assert "reference_acc" in RunConfig.RESUME_FREE  # a finished run re-run with a reference gains FWT


def test_a_replay_generator_replaces_the_buffer():
    """The hook for generated replay inputs: called per earlier task with (task, name, n, rng)."""
    from softtf.cl import ContinualClassifier
    from softtf.methods.sapt import SAPTMethod

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=4, num_classes=0, embed_dim=32, depth=1, num_heads=4, global_pool="avg")
    calls = []

    def generate(s, name, n, rng):
        calls.append((s, name, n))
        return torch.randn(n, 3, 16, 16, generator=rng)

    m = SAPTMethod(ContinualClassifier(vit, 4), RunConfig(method="sapt", batch_size=6, sapt_replay_size=0), replay_generator=generate)
    x = torch.randn(6, 3, 16, 16)
    for t in range(2):
        m.begin_task(t, f"task{t}")
        logits = m.forward(x)
        loss = m.loss(logits, torch.zeros(6, dtype=torch.long))
        loss.backward()
        if t == 1:  # task 0's saved routing is [1] -> [1, 0]: the KL is -mean log p_0 > 0
            assert float(m.reflection(6).detach()) > 0.0
        m.end_task(t, f"task{t}")
    assert calls == [(0, "task0", 6)] * 2 and m.buffers == [None, None] and m.info()["replay"] == "generator"


def test_cli_single_task_reference_runs_each_task_alone(tmp_path, capsys):
    from softtf.cli import main

    out = tmp_path / "run"
    argv = ["train", "--model", "vit", "--data", "digits", "--tasks", "2", "--method", "sapt", "--img-size", "16",
            "--patch-size", "4", "--depth", "1", "--embed-dim", "32", "--heads", "4", "--pretrain-epochs", "1",
            "--epochs", "1", "--lr", "0.01", "--no-progress", "--output", str(out)]
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--single-task-reference", "--reference-acc", "x.json"])
    assert exc.value.code == 2 and "do not also pass --reference-acc" in capsys.readouterr().err
    assert main([*argv, "--single-task-reference"]) == 0
    res = json.loads((out / "results.json").read_text())
    singles = [json.loads((out / "single-task" / f"task{t}" / "results.json").read_text()) for t in range(2)]
    assert [s["n_tasks"] for s in singles] == [1, 1] and singles[1]["data"]["single_task_of"] == "task1"
    ref = [s["acc"] for s in singles]
    assert res["run_config"]["reference_acc"] == ref
    A = res["accuracy_matrix"]
    assert res["sapt"]["FWT"] == pytest.approx(((A[0][0] - ref[0]) + (A[1][1] - ref[1])) / 2)
    assert (out / "pretrained_backbone.safetensors").is_file()  # warmed up once, shared by the single-task runs and the run
