"""tools/gpu_check.sh without a GPU: its --dry-run walks every stage, skipping what needs a GPU."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_check.sh"


def _run(args, out):
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_dry_run_walks_every_stage_within_the_file_budget(tmp_path):
    res = _run(["--dry-run"], tmp_path / "results")
    assert res.returncode == 0, res.stderr
    for stage in ("build", "tests", "gpu_bench", "bench"):
        assert f"== gpu_check: {stage} (limit " in res.stdout
    assert res.stdout.count("dry run: skipped") == 4
    # The real commands, as they would run: this GPU's arch only, all cores, every GPU test file.
    assert "SOFTTF_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=" in res.stdout and "MAX_JOBS=" in res.stdout
    for test_file in sorted((ROOT / "tests").glob("test_*_gpu.py")):
        assert f"tests/{test_file.name}" in res.stdout
    assert "bench --device cuda --output" in res.stdout
    files = sorted(p.name for p in (tmp_path / "results").iterdir())
    assert files == ["bench.log", "build.log", "env.txt", "gpu_bench.log", "tests.log"]
    # Each stage's limit adds up to well inside the 10 minutes the script promises.
    limits = [int(line.split("(limit ")[1].split("s)")[0]) for line in res.stdout.splitlines() if "(limit " in line]
    assert sum(limits) <= 600 - 30


def test_unknown_argument_is_refused(tmp_path):
    res = _run(["--fast"], tmp_path)
    assert res.returncode == 2
    assert "unknown argument '--fast'" in res.stderr
