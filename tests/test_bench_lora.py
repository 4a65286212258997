"""`softtf bench` routed-LoRA cases (lora_t5 / lora_t10 / lora_t20): SAPT's mixture of T LoRA blocks
through softtf_kernels.ops.routed_lora against the official loop over T PEFT LoRA modules.

No timing asserts: the rows run, carry their ratios, and compute the same numbers.
"""
from __future__ import annotations

import json

import pytest
import torch  # noqa: F401  (loads libc10 before softtf_kernels._C)

pytest.importorskip("peft")
pytest.importorskip("matplotlib")

import softtf_kernels  # noqa: E402
from softtf import bench  # noqa: E402
from softtf.bench.config import LORA_CASES, ROUTED_CANDIDATES, case_level  # noqa: E402
from softtf.bench.routed import SAPT_ALPHA, SAPT_R, PeftLoop, peft_lora_layer, routed_shape  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_lora")
    rc = bench.main(["--quick", "--output", str(out), "--no-progress", "--cases", *LORA_CASES])
    assert rc == 0
    with open(out / "bench.json") as f:
        return out, json.load(f)


def test_config():
    assert set(LORA_CASES) <= set(bench.CASES)
    for name in LORA_CASES:
        assert case_level(name) == "lora"
        assert bench.case_candidates(name) == ROUTED_CANDIDATES
    cfg = bench.BenchConfig(cases=["lora_t20"])
    assert routed_shape("lora_t20", cfg) == (cfg.bert_batch, cfg.bert_tokens, 768, 20, SAPT_R)
    assert routed_shape("lora_t5", bench.BenchConfig(quick=True))[2:4] == (64, 5)
    assert cfg.timing("lora") == (cfg.warmup, cfg.repeats)
    with pytest.raises(ValueError, match="not a routed-LoRA case"):
        routed_shape("bert", cfg)
    args = bench.build_parser().parse_args(["--cases", "lora_t10", "--candidates", "softtf[cpp]"])
    assert bench.config_from_args(args).cases == ["lora_t10"]


def test_lora_rows(lora_run):
    out, res = lora_run
    assert [c["case"] for c in res["cases"]] == list(LORA_CASES)
    must = ["floor", "softtf[reference]", "eager"] + (["softtf[cpp]"] if res["meta"]["device"] == "cpu" else [])
    for case in res["cases"]:
        assert case["level"] == "lora"
        b, n, d, t, r = routed_shape(case["case"], bench.BenchConfig(quick=True))
        assert case["tokens"] == b * n and case["batch"] == b and f"T = {t}" in case["description"]
        rows = {row["key"]: row for row in case["rows"]}
        assert list(rows) == list(ROUTED_CANDIDATES)
        for key in must:
            for task in ("infer", "train"):
                got = rows[key]["tasks"][task]
                assert got["status"] == "ok", (case["case"], key, task, got)
                for ratio in ("ratio_floor", "ratio_eager", "peak_ratio_eager", "ratio_eager_min"):
                    assert got[ratio] is not None and got[ratio] > 0, (case["case"], key, task, ratio)
                assert got["ratio_lora"] is None
            assert rows[key]["tasks"]["gid"]["status"] == "n/a"
        for task in ("infer", "train"):
            assert rows["floor"]["tasks"][task]["ratio_floor"] == pytest.approx(1.0)
            assert rows["eager"]["tasks"][task]["ratio_eager"] == pytest.approx(1.0)
        if res["meta"]["device"] == "cpu":
            assert "no CUDA device" in rows["softtf[cuda]"]["tasks"]["infer"]["reason"]
        for key in ("softtf[reference]", "eager"):
            assert rows[key]["params"]["trainable"] == t * r * 2 * d + b * t
            assert rows[key]["params"]["bytes_per_task"] == 4 * r * 2 * d
        assert rows["eager"]["config"]["peft"]
        assert rows["floor"]["params"]["trainable"] == 0
    assert "x loop" in (out / "bench.txt").read_text()
    assert "| fwd+bwd ms | ×frozen | ×loop |" in (out / "bench.md").read_text()


def _run(case, cand):
    bench.install(case, cand)
    case.train_inputs.grad = None
    for p in cand.trainable:
        p.grad = None
    with softtf_kernels.use_backend(cand.backend or "auto"):
        y = case.model(case.train_inputs)
        y.pow(2).mean().backward()
    return y.detach(), case.train_inputs.grad.clone(), cand


@pytest.mark.parametrize("name", ["lora_t5", "lora_t20"])
def test_rows_compute_the_same_mixture(name):
    """Every row starts from the same A, B, weights: the op (C++, reference) and the PEFT loop give
    the same output and the same gradients to x, A, B and the weights, equal to a float64 einsum."""
    config = bench.BenchConfig(quick=True, no_progress=True)
    case = bench.build_case(name, config, CPU)
    cands = {c.key: c for c in bench.build_candidates(case, config, CPU)}
    assert list(cands) == list(ROUTED_CANDIDATES)
    y_loop, dx_loop, loop = _run(case, cands["eager"])
    mod = loop.modules["lin"]
    assert isinstance(mod, PeftLoop)
    blocks = mod.blocks()
    da_loop = torch.stack([p.grad for p in blocks[0::2]])
    db_loop = torch.stack([p.grad for p in blocks[1::2]])
    dw_loop = mod.weights.grad
    # the float64 definition
    x = case.inputs.double()
    lin = case.originals["lin"]
    a = torch.stack([p.detach() for p in blocks[0::2]]).double()
    b = torch.stack([p.detach() for p in blocks[1::2]]).double()
    w = mod.weights.detach().double()
    want = (x @ lin.weight.double().T + lin.bias.double()
            + torch.einsum("bt,bni,tri,tor->bno", w, x, a, b) * (SAPT_ALPHA / SAPT_R))
    torch.testing.assert_close(y_loop.double(), want, atol=1e-5, rtol=1e-4)
    for key in ("softtf[cpp]", "softtf[reference]"):
        y, dx, c = _run(case, cands[key])
        m = c.modules["lin"]
        torch.testing.assert_close(y, y_loop, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(dx, dx_loop, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(m.lora_a.grad, da_loop, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(m.lora_b.grad, db_loop, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(m.weights.grad, dw_loop, atol=1e-6, rtol=1e-4)
    y_floor, _, _ = _run(case, cands["floor"])
    assert not torch.allclose(y_floor, y_loop, atol=1e-4)


def test_one_block_is_pefts_own_lora():
    """T = 1 with weight 1: the loop is PEFT's LoRA forward on the same layer."""
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 12).requires_grad_(False)
    lora_a, lora_b = torch.randn(1, 4, 16), torch.randn(1, 12, 4)
    layer = peft_lora_layer(base, lora_a, lora_b)
    assert layer.scaling["t0"] == SAPT_ALPHA / 4
    x = torch.randn(3, 5, 16)
    loop = PeftLoop(layer, torch.ones(3, 1))
    layer.set_adapter("t0")
    torch.testing.assert_close(loop(x), layer(x))


def test_candidates_selection(tmp_path):
    """--candidates keeps the floor and the loop (the ratios' references)."""
    bench.main(["--quick", "--output", str(tmp_path), "--no-progress", "--no-plot", "--cases", "lora_t5",
                "--candidates", "softtf[cpp]"])
    with open(tmp_path / "bench.json") as f:
        rows = {r["key"]: r for r in json.load(f)["cases"][0]["rows"]}
    for key in ("floor", "softtf[cpp]", "eager"):
        assert rows[key]["tasks"]["train"]["status"] == "ok", key
    assert rows["softtf[reference]"]["tasks"]["train"]["reason"] == "not selected (--candidates)"


def test_sapt_row_of_the_bert_case():
    """The BERT model case's SAPT row: routed LoRA on q and v of every layer (T = 5, block 4 and key
    4 train, blocks and keys 0-3 frozen), routed by SAPT's router; inert for the other rows."""
    pytest.importorskip("transformers")
    from softtf.bench.sapt_rows import SAPT_TASKS
    from softtf.methods.sapt_layers import RoutedLoRALinear

    config = bench.BenchConfig(quick=True, compile=False, no_progress=True)
    case = bench.build_case("bert", config, CPU)
    assert bench.case_candidates("bert")[-1] == "sapt" and "sapt" not in bench.case_candidates("vit")
    with torch.no_grad():
        case.model.eval()
        plain = case.logits_fn(case.model, case.inputs)
    cands = {c.key: c for c in bench.build_candidates(case, config, CPU)}
    assert list(cands) == list(bench.case_candidates("bert"))
    sapt, floor = cands["sapt"], cands["floor"]
    n_layers = len(case.model.bert.encoder.layer)
    routed = [m for m in sapt.modules.values() if isinstance(m, RoutedLoRALinear)]
    assert len(routed) == 2 * n_layers and all(len(m.lora) == SAPT_TASKS for m in routed)
    # the other rows see the plain model: the routed layers outside the targets are inert
    bench.install(case, floor)
    with torch.no_grad():
        torch.testing.assert_close(floor.fns["infer"](), plain)
    bench.install(case, sapt)
    with torch.no_grad():
        assert not torch.allclose(sapt.fns["infer"](), plain, atol=1e-4)
    sapt.fns["train"]()
    router = sapt.modules["sapt_router"]
    assert router.keys[SAPT_TASKS - 1].grad is not None and router.keys[0].grad is None
    assert all(m.lora.A[SAPT_TASKS - 1].grad is not None and m.lora.A[0].grad is None for m in routed)
    assert routed[0].lora.B[SAPT_TASKS - 1].grad.abs().sum() > 0  # the gradient reaches layer 0
    r = 4
    lora_values = sum(r * (m.base.in_features + m.base.out_features) for m in routed)
    assert sapt.params["stored_per_task"] == lora_values + router.dim
    assert sapt.results["gid"]["status"] == "n/a"
    bench.install(case, floor)
    with torch.no_grad():
        torch.testing.assert_close(floor.fns["infer"](), plain)
