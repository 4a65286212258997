"""CI gate for the CUDA sources: every kernel compiles for sm_80 and sm_90 with plain nvcc and
`-Xptxas -v`, with no warning and no register spill (tools/check_cuda.sh). Needs nvcc, not a GPU."""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "check_cuda.sh")


def _nvcc() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and os.path.exists(os.path.join(root, "bin", "nvcc")):
            return os.path.join(root, "bin", "nvcc")
    return shutil.which("nvcc")


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found: the CUDA compile gate needs a CUDA toolkit")
def test_cuda_sources_compile_without_spills():
    proc = subprocess.run(["bash", SCRIPT], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"tools/check_cuda.sh failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert "check_cuda: OK" in proc.stdout and "_sm80" in proc.stdout and "_sm90" in proc.stdout, proc.stdout[-2000:]
