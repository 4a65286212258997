"""softtf bench's run metadata: the busy-machine warning and the layer cases' target text."""
from softtf.bench.meta import busy_warning
from softtf.bench.report import format_markdown, format_table


def test_busy_warning_from_the_start_load():
    assert busy_warning("0.40 0.30 0.20", cores=2) is None
    assert busy_warning("0.50 2.00 2.00", cores=2) is None  # only the 1-minute figure counts
    text = busy_warning("1.75 1.20 0.90", cores=2)
    assert "busy" in text and "1.75" in text and "2 cores" in text and "unreliable" in text
    assert busy_warning("?", cores=2) is None  # no load average on this platform


def test_reports_carry_the_warning():
    meta = {"device_name": "CPU x", "versions": {"torch": "t", "timm": "1", "transformers": "2", "peft": "3"},
            "threads": 2, "loadavg_start": "1.75 1.2 0.9", "loadavg_end": "2.0 1.5 1.0", "date": "d",
            "busy_warning": busy_warning("1.75 1.2 0.9", cores=2), "args": {}}
    result = {"meta": meta, "cases": []}
    assert meta["busy_warning"] in format_table(result)
    assert meta["busy_warning"] in format_markdown(result)


def test_cpu_memory_profile_keeps_kineto_logs_off_stderr():
    """torch.profiler's C++ backend logs profiler_start/stop (and, on a CUDA build without a GPU,
    gpuGetDeviceCount errors) to fd 2; the bench's memory probe silences exactly those calls."""
    import subprocess
    import sys

    code = ("import sys, torch\nfrom softtf.bench.memory import cpu_allocation_profile\n"
            "peak, largest = cpu_allocation_profile(lambda: torch.ones(1000, 1000).sum())\n"
            "print('still here', file=sys.stderr)\nassert peak >= 4_000_000, peak\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "USDT" not in res.stderr and "gpuGetDeviceCount" not in res.stderr, res.stderr
    assert "still here" in res.stderr  # stderr itself is restored afterwards


def _case(name, level, ratios, skipped=False):
    ok = {t: {"status": "ok", "ratio_floor": r, "peak_bytes": 2**20} for t, r in ratios.items()}
    rows = [{"label": "frozen (floor)", "tasks": {t: {"status": "ok", "ratio_floor": 1.0} for t in ratios}},
            {"label": "candidate", "tasks": ok}]
    if skipped:
        rows.append({"label": "SoftLinear [cuda]", "tasks": {t: {"status": "skip", "reason": "no CUDA device"}
                                                             for t in ratios}})
    return {"case": name, "level": level, "description": name, "rows": rows}


def test_chart_shares_one_scale_per_level_and_shows_skipped_rows(tmp_path):
    import pytest

    pytest.importorskip("matplotlib")
    from softtf.bench.chart import _level_limits, _status, plot

    cases = [_case("a", "layer", {"infer": 2.0, "train": 1.5}, skipped=True),
             _case("b", "layer", {"infer": 30.0}), _case("m", "model", {"infer": 1.2, "train": 1.1})]
    limits = _level_limits(cases)
    assert limits["layer"] == (30.0, True) and limits["model"] == (1.2, False)
    assert _status(cases[0]["rows"][2]) == "skipped: no CUDA device"
    assert _status(cases[0]["rows"][1]) is None
    meta = {"device_name": "CPU x", "versions": {"torch": "t"}}
    plot({"meta": meta, "cases": cases}, str(tmp_path / "bench.png"))
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
