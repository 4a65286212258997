"""`softtf bench --quick`: structure of the JSON, every row present, parameter accounting, PNG; the
attention cases (softtf.prefix_attention against the eager composite and SDPA without prefix); the
routed-LoRA cases have their own file (tests/test_bench_lora.py).

No timing asserts: only that numbers exist where a row ran, and that failures carry a reason.
"""
from __future__ import annotations

import json
import math
import os

import pytest
import torch  # noqa: F401  (loads libc10 before softtf_kernels._C)

pytest.importorskip("timm")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("matplotlib")

import softtf_kernels  # noqa: E402
from softtf import bench  # noqa: E402
from softtf.bench.attention import eager_prefix_attention  # noqa: E402
from softtf.methods.adapter import AdapterLinear, adapter_param_count, matched_bottleneck  # noqa: E402
from softtf_kernels import reference as R  # noqa: E402

STATUSES = {"ok", "failed", "skipped", "n/a"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rc = bench.main(["--quick", "--output", str(out), "--no-progress"])
    assert rc == 0
    with open(out / "bench.json") as f:
        return out, json.load(f)


def test_outputs_written(quick_run):
    out, _ = quick_run
    png = out / "bench.png"
    assert png.exists() and png.stat().st_size > 1000
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert (out / "bench.txt").read_text().strip()
    md = (out / "bench.md").read_text()
    assert "| candidate |" in md and "Targets" in md


def test_meta(quick_run):
    _, res = quick_run
    meta = res["meta"]
    for key in ("device", "device_name", "threads", "versions", "loadavg_start", "loadavg_end", "timing", "memory"):
        assert key in meta, key
    for lib in ("torch", "softtf", "timm", "transformers", "peft"):
        assert meta["versions"].get(lib), lib
    assert meta["device"] in ("cpu", "cuda") or meta["device"].startswith("cuda")


def test_every_row_present(quick_run):
    _, res = quick_run
    assert [c["case"] for c in res["cases"]] == list(bench.CASES)
    for case in res["cases"]:
        keys = [r["key"] for r in case["rows"]]
        assert keys == list(bench.case_candidates(case["case"])), case["case"]
        for row in case["rows"]:
            assert set(row["tasks"]) == set(bench.TASKS)
            for task, r in row["tasks"].items():
                where = f"{case['case']}/{row['key']}/{task}"
                assert r["status"] in STATUSES, where
                if r["status"] == "ok":
                    assert r["median_ms"] > 0 and r["tokens_per_s"] > 0, where
                    assert len(r["times_ms"]) >= 1, where
                    assert r["peak_bytes"] is not None and r["peak_bytes"] >= 0, where
                    assert "ratio_floor" in r and "ratio_lora" in r, where
                else:
                    assert r.get("reason"), f"{where}: {r['status']} without a reason"


def test_rows_that_must_run(quick_run):
    """The floor, the C++ kernel (on CPU), the reference, eager, LoRA and Adapters run here."""
    _, res = quick_run
    must = ["floor", "softtf[reference]", "eager", "lora[matched]", "lora[small]", "adapter[matched]", "adapter[small]"]
    if res["meta"]["device"] == "cpu":
        must.append("softtf[cpp]")
    for case in res["cases"]:
        if case["level"] in ("attention", "lora", "serve"):
            continue  # test_attention_rows, tests/test_bench_lora.py, test_serving_rows
        rows = {r["key"]: r for r in case["rows"]}
        for key in must:
            for task in ("infer", "train"):
                assert rows[key]["tasks"][task]["status"] == "ok", (case["case"], key, task, rows[key]["tasks"][task])
        for key in ("softtf[reference]", "eager") + (("softtf[cpp]",) if res["meta"]["device"] == "cpu" else ()):
            assert rows[key]["tasks"]["gid"]["status"] == "ok", (case["case"], key)
        for key in ("floor", "lora[matched]", "adapter[matched]"):
            assert rows[key]["tasks"]["gid"]["status"] == "n/a"
        assert rows["floor"]["tasks"]["infer"]["ratio_floor"] == pytest.approx(1.0)
        assert rows["lora[matched]"]["tasks"]["train"]["ratio_lora"] == pytest.approx(1.0)
        # the quick run leaves torch.compile off and says so
        assert rows["compiled"]["tasks"]["train"]["status"] == "skipped"
        if res["meta"]["device"] == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            assert "TRITON_INTERPRET" in rows["softtf[triton]"]["tasks"]["infer"]["reason"]


def test_serving_rows(quick_run):
    """serve_t10: every row answers the mixed batch (the rows are checked to agree before timing), infer only."""
    _, res = quick_run
    (case,) = [c for c in res["cases"] if c["case"] == "serve_t10"]
    assert case["level"] == "serve" and "T = 10 frozen tasks" in case["description"]
    rows = {r["key"]: r for r in case["rows"]}
    assert list(rows) == ["floor", "task_names", "eager", "per_sample"]
    for key, row in rows.items():
        assert row["tasks"]["infer"]["status"] == "ok", (key, row["tasks"]["infer"])
        assert row["tasks"]["train"]["status"] == row["tasks"]["gid"]["status"] == "n/a"
    assert rows["eager"]["label"].startswith("grouped")
    assert rows["eager"]["tasks"]["infer"]["ratio_eager"] == pytest.approx(1.0)
    assert rows["floor"]["tasks"]["infer"]["ratio_floor"] == pytest.approx(1.0)


def test_prompt_rows_of_the_vit_case(quick_run):
    """DualPrompt and NoRGa, alone and with Soft-TF masks, run on the ViT model case; their
    parameters are the official prompts (+ the masks) and Gradient ID does not apply."""
    _, res = quick_run
    case = next(c for c in res["cases"] if c["case"] == "vit")
    rows = {r["key"]: r for r in case["rows"]}
    mask_values = sum(layer["out"] * layer["in"] for layer in rows["softtf[reference]"]["params"]["per_layer"])
    for key in bench.PROMPT_CANDIDATES:
        row = rows[key]
        for task in ("infer", "train"):
            assert row["tasks"][task]["status"] == "ok", (key, task, row["tasks"][task])
            assert row["tasks"][task]["ratio_floor"] > 0
        assert row["tasks"]["gid"]["status"] == "n/a"
        layers, masks = row["config"]["prefix_layers"], row["config"]["masks"]
        assert layers == [0, 1, 2, 3]  # the tiny ViT's 4 blocks: DualPrompt G 0-1 + E 2-3, NoRGa E 0-3
        heads_dim = 64  # H * D of the tiny ViT
        prompts = len(layers) * 2 * 5 * heads_dim
        assert row["params"]["stored_per_task"] == prompts + (mask_values if masks else 0), key
    for case in res["cases"]:
        if case["case"] != "vit":
            assert not set(bench.PROMPT_CANDIDATES) & {r["key"] for r in case["rows"]}


def test_parameter_counts(quick_run):
    _, res = quick_run
    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[res["meta"]["args"]["mask_dtype"]]
    for case in res["cases"]:
        if case["level"] in ("attention", "lora", "serve"):
            continue  # test_attention_rows, tests/test_bench_lora.py, test_serving_rows
        rows = {r["key"]: r for r in case["rows"]}
        soft = rows["softtf[cpp]"]["params"] if "softtf[cpp]" in rows else rows["softtf[reference]"]["params"]
        assert len(soft["per_layer"]) == len(case["targets"]) >= 1
        for layer in soft["per_layer"]:
            assert layer["trainable"] == layer["out"] * layer["in"]
            assert layer["bytes_per_task"] == layer["out"] * layer["in"] * itemsize
        assert soft["trainable"] == sum(l["out"] * l["in"] for l in soft["per_layer"])
        for key in ("eager", "compiled", "softtf[reference]"):
            assert rows[key]["params"]["trainable"] == soft["trainable"]
        lora = rows["lora[matched]"]["params"]
        for ll, sl in zip(lora["per_layer"], soft["per_layer"]):
            assert abs(ll["trainable"] - sl["trainable"]) <= 0.01 * sl["trainable"], (ll, sl)
        assert abs(lora["trainable"] - soft["trainable"]) <= 0.01 * soft["trainable"]
        small = rows["lora[small]"]
        r = res["meta"]["args"]["lora_r"]
        assert small["params"]["trainable"] == sum(r * (l["in"] + l["out"]) for l in small["params"]["per_layer"])
        ad = rows["adapter[matched]"]["params"]
        for al, sl in zip(ad["per_layer"], soft["per_layer"]):
            # an adapter grows in steps of 2*out+1 parameters: matched to within half a step
            assert abs(al["trainable"] - sl["trainable"]) <= (2 * sl["out"] + 1) / 2, (al, sl)
        assert rows["floor"]["params"]["trainable"] == 0


def test_model_targets(quick_run):
    _, res = quick_run
    cases = {c["case"]: c for c in res["cases"]}
    vit = cases["vit"]["targets"]
    assert len(vit) == 6 and all(n.endswith(("attn.qkv", "attn.proj")) for n in vit)
    bert = cases["bert"]["targets"]
    assert len(bert) == 9 and all(n.rsplit(".", 1)[1] in ("query", "key", "value") for n in bert)
    assert len(res["targets"]) == 6  # 3 targets x 2 models, reported (never asserted on)


def test_attention_rows(quick_run):
    """The attention cases: SDPA (floor), prefix_attention under the CPU / reference backends and
    the eager composite run forward and forward+backward, with time ratios to SDPA and to eager and
    peak memory to eager; Gradient ID is n/a; the prompt (+ alpha, tau for NoRGa) is what trains."""
    out, res = quick_run
    cases = {c["case"]: c for c in res["cases"] if c["level"] == "attention"}
    assert list(cases) == list(bench.ATTENTION_CASES)
    b, n, p = res["meta"]["args"]["layer_batch"], res["meta"]["args"]["layer_tokens"], res["meta"]["args"]["prefix_len"]
    must = ["floor", "softtf[reference]", "eager"] + (["softtf[cpp]"] if res["meta"]["device"] == "cpu" else [])
    for name, case in cases.items():
        assert case["tokens"] == b * n and case["batch"] == b and f"P = {p}" in case["description"], case
        rows = {r["key"]: r for r in case["rows"]}
        for key in must:
            for task in ("infer", "train"):
                r = rows[key]["tasks"][task]
                assert r["status"] == "ok", (name, key, task, r)
                for ratio in ("ratio_floor", "ratio_eager", "peak_ratio_eager", "ratio_eager_min"):
                    assert r[ratio] is not None and r[ratio] > 0, (name, key, task, ratio)
                assert r["ratio_lora"] is None  # no LoRA row here
            assert rows[key]["tasks"]["gid"]["status"] == "n/a"
        for task in ("infer", "train"):
            assert rows["floor"]["tasks"][task]["ratio_floor"] == pytest.approx(1.0)
            assert rows["eager"]["tasks"][task]["ratio_eager"] == pytest.approx(1.0)
            assert rows["eager"]["tasks"][task]["peak_ratio_eager"] == pytest.approx(1.0)
        assert rows["compiled"]["tasks"]["train"]["status"] == "skipped"
        if res["meta"]["device"] == "cpu":
            assert "no CUDA device" in rows["softtf[cuda]"]["tasks"]["infer"]["reason"]
        h, d = 2, 32  # --quick heads
        gate = 2 if name == "attn_norga" else 0
        for key in ("softtf[reference]", "eager", "compiled"):
            assert rows[key]["params"]["trainable"] == 2 * p * h * d + gate
            assert rows[key]["params"]["bytes_per_task"] == 4 * 2 * p * h * d
        assert rows["floor"]["params"]["trainable"] == 0
    assert "fwd+bwd ms" in (out / "bench.txt").read_text()
    assert "| fwd+bwd ms | ×SDPA | ×eager |" in (out / "bench.md").read_text()


@pytest.mark.parametrize("activation", ["none", "sigmoid", "tanh", "gelu"])
def test_eager_composite_is_the_definition(activation):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=g, dtype=torch.float64) for _ in range(3))
    pk, pv = (torch.randn(2, 3, 4, 8, generator=g, dtype=torch.float64) for _ in range(2))
    alpha, tau = torch.tensor(0.7, dtype=torch.float64), torch.tensor(1.3, dtype=torch.float64)
    want, _ = R.prefix_attention_forward(q, k, v, pk, pv, alpha, tau, activation)
    torch.testing.assert_close(eager_prefix_attention(q, k, v, pk, pv, alpha, tau, activation), want)


@pytest.mark.parametrize("case_name", bench.ATTENTION_CASES)
@pytest.mark.parametrize("prefix_len", [5, 0])
def test_attention_candidates_compute_the_same_attention(case_name, prefix_len):
    """Every prefixed row computes the same output and prompt gradient from the same prompt; with
    P = 0 they equal the floor (SDPA without prefix)."""
    config = bench.BenchConfig(quick=True, compile=False, prefix_len=prefix_len, no_progress=True)
    case = bench.build_case(case_name, config, torch.device("cpu"))
    cands = {c.key: c for c in bench.build_candidates(case, config, torch.device("cpu"))}
    assert list(cands) == list(bench.ATTENTION_CANDIDATES)
    outs, grads = {}, {}
    for key in ("floor", "softtf[cpp]", "softtf[reference]", "eager"):
        cand = cands[key]
        bench.install(case, cand)
        with softtf_kernels.use_backend(cand.backend or "auto"):
            y = case.model(case.train_inputs)
            y.pow(2).mean().backward()
        outs[key] = y.detach()
        grads[key] = [p.grad.clone() for p in cand.trainable]
        case.train_inputs.grad = None
    torch.testing.assert_close(outs["softtf[cpp]"], outs["eager"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(outs["softtf[reference]"], outs["eager"], atol=1e-5, rtol=1e-4)
    assert len(grads["eager"]) == (1 if case_name == "attn_dualprompt" else 3)  # prompt (+ alpha, tau)
    for key in ("softtf[cpp]", "softtf[reference]"):
        for got, want in zip(grads[key], grads["eager"]):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
    if prefix_len == 0:
        torch.testing.assert_close(outs["softtf[cpp]"], outs["floor"], atol=1e-5, rtol=1e-4)
    else:
        assert not torch.allclose(outs["softtf[cpp]"], outs["floor"], atol=1e-3)


def test_attention_config():
    with pytest.raises(ValueError, match="--prefix-len must be >= 0"):
        bench.BenchConfig(prefix_len=-1)
    config = bench.config_from_args(bench.build_parser().parse_args(["--prefix-len", "20", "--cases", "attn_norga"]))
    assert config.prefix_len == 20 and config.cases == ["attn_norga"]
    assert config.timing("attention") == (config.warmup, config.repeats)


def test_matched_sizes_at_paper_shapes():
    # ViT-B qkv 768->2304, proj 768->768 (BERT q/k/v the same as proj)
    for fin, fout in ((768, 2304), (768, 768)):
        r = bench.matched_lora_rank(fin, fout)
        assert abs(r * (fin + fout) - fin * fout) <= 0.01 * fin * fout
        m = matched_bottleneck(fin, fout)
        assert abs(adapter_param_count(fout, m) - fin * fout) <= 0.01 * fin * fout
    assert bench.matched_lora_rank(768, 2304) == 576
    assert bench.matched_lora_rank(768, 768) == 384


def test_adapter_starts_as_identity():
    lin = torch.nn.Linear(8, 12)
    ad = AdapterLinear(lin, 3)
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(ad(x), lin(x))
    assert not any(p.requires_grad for p in lin.parameters())
    assert sum(p.numel() for p in ad.adapter.parameters()) == adapter_param_count(12, 3)


def test_bad_arguments(tmp_path):
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--output", str(tmp_path), "--cases", "nope"])
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--output", str(tmp_path), "--repeats", "0"])


def test_threads_restored(tmp_path):
    before = torch.get_num_threads()
    bench.main(["--quick", "--output", str(tmp_path), "--cases", "vit_proj", "--no-progress", "--no-plot",
                    "--threads", "1"])
    assert torch.get_num_threads() == before
    assert not math.isnan(before)


def test_prompt_rows_are_selectable():
    cfg = bench.BenchConfig(quick=True, cases=["vit"], candidates=list(bench.PROMPT_CANDIDATES))
    assert cfg.candidates == list(bench.PROMPT_CANDIDATES)
    with pytest.raises(ValueError, match="unknown"):
        bench.BenchConfig(quick=True, candidates=["l2p"])
