"""Build of softtf_kernels._C: C++ CPU kernels always, CUDA kernels when possible.

Environment switches (see README):
  SOFTTF_FORCE_CUDA=1  build the CUDA kernels even if no GPU/toolkit is detected (fails loudly
                       if nvcc or a CUDA build of torch is missing)
  SOFTTF_SKIP_CUDA=1   never build the CUDA kernels (CPU-only extension, quick build)
  TORCH_CUDA_ARCH_LIST architectures to build for; default "8.0;9.0" (A100, H100)
The build imports torch, so install with --no-build-isolation after torch (README).
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def find_cuda_home() -> str | None:
    """The toolkit root: $CUDA_HOME/$CUDA_PATH, else ask nvcc itself (works through wrappers)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and os.path.exists(os.path.join(root, "bin", "nvcc")):
            return root
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        # `nvcc -v --dryrun` prints "#$ TOP=<toolkit>/bin/.." even when nvcc is a wrapper script.
        out = subprocess.run([nvcc, "-v", "--dryrun", "-x", "cu", os.devnull], capture_output=True,
                             text=True, timeout=60)
        m = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
        if m:
            return os.path.realpath(m.group(1).strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def nvidia_pip_includes() -> list[str]:
    """Headers torch's CUDA build includes (cublas_v2.h, cusparse.h) that ship in nvidia-* wheels."""
    import site

    dirs = []
    for base in site.getsitepackages() + [site.getusersitepackages()]:
        dirs += sorted(glob.glob(os.path.join(base, "nvidia", "*", "include")))
        dirs += sorted(glob.glob(os.path.join(base, "nvidia", "*", "*", "include")))
    return [d for d in dirs if os.path.isdir(d)]


SKIP_CUDA = _truthy("SOFTTF_SKIP_CUDA")
FORCE_CUDA = _truthy("SOFTTF_FORCE_CUDA")
if SKIP_CUDA and FORCE_CUDA:
    sys.exit("SOFTTF_SKIP_CUDA and SOFTTF_FORCE_CUDA are both set; choose one")

CUDA_HOME = None if SKIP_CUDA else find_cuda_home()
if CUDA_HOME:
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
    os.environ["CUDA_HOME"] = CUDA_HOME

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

torch_has_cuda = torch.version.cuda is not None
BUILD_CUDA = (not SKIP_CUDA) and CUDA_HOME is not None and torch_has_cuda
if FORCE_CUDA and not BUILD_CUDA:
    sys.exit(f"SOFTTF_FORCE_CUDA=1 but cannot build CUDA kernels: nvcc toolkit root={CUDA_HOME!r}, "
             f"torch CUDA version={torch.version.cuda!r} (need both)")
if BUILD_CUDA:
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

here = os.path.dirname(os.path.abspath(__file__))
cpp_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))

openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
cxx_flags = ["-O3", "-std=c++20"] + openmp
include_dirs = [os.path.join(here, "csrc")]
if BUILD_CUDA:
    ext = CUDAExtension(
        "softtf_kernels._C",
        cpp_sources + cuda_sources,
        include_dirs=include_dirs + nvidia_pip_includes(),
        define_macros=[("SOFTTF_WITH_CUDA", "1")],
        extra_compile_args={
            "cxx": cxx_flags,
            "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"],
        },
        extra_link_args=openmp,
        py_limited_api=False,
    )
else:
    ext = CppExtension("softtf_kernels._C", cpp_sources, include_dirs=include_dirs,
                       extra_compile_args={"cxx": cxx_flags}, extra_link_args=openmp)

print(f"softtf: building {'CPU + CUDA' if BUILD_CUDA else 'CPU-only'} kernels "
      f"(CUDA_HOME={CUDA_HOME}, torch CUDA={torch.version.cuda})", file=sys.stderr)

setup(ext_modules=[ext], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
