"""`softtf bench --quick`: structure of the JSON, every row present, parameter accounting, PNG.

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

from softtf import bench  # noqa: E402
from softtf.methods.adapter import AdapterLinear, adapter_param_count, matched_bottleneck  # noqa: E402

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
        assert keys == list(bench.CANDIDATES), case["case"]
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


def test_parameter_counts(quick_run):
    _, res = quick_run
    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[res["meta"]["args"]["mask_dtype"]]
    for case in res["cases"]:
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
