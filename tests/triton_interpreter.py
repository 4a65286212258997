"""Load softtf's Triton kernels under the interpreter (TRITON_INTERPRET=1) for CPU tests.

Whether triton interprets is fixed when a function is decorated: triton's own library functions
at ``import triton``, ours at import of the kernel module. Test modules call
:func:`load_interpreted_kernels` before importing anything that may load triton; it returns the
kernel module when it could be imported in interpreter mode (None otherwise: triton missing, or
already loaded for a GPU, in which case the caller skips and reruns itself in a subprocess).
"""
import importlib
import importlib.util
import os
import sys


def triton_lib_interpreted() -> bool:
    import triton.language.standard as std

    return type(std.cdiv).__name__ == "InterpretedFunction"


def load_interpreted_kernels():
    """``(kernel module or None, whether the interpreted kernels can run in this process)``."""
    if importlib.util.find_spec("triton") is None:  # found, not imported (that fixes its mode)
        return None, False
    kmod = sys.modules.get("softtf_kernels.triton.kernels")
    if kmod is None and ("triton" not in sys.modules or triton_lib_interpreted()):
        kmod = _import_interpreted("softtf_kernels.triton.kernels")  # decorates the kernels now
    return kmod, kmod is not None and bool(kmod.INTERPRET) and triton_lib_interpreted()


def load_interpreted_module(name: str):
    """``(module or None, whether it runs interpreted here)`` for another kernel module ``name``
    (e.g. ``softtf_kernels.triton.prefix_attention``), after :func:`load_interpreted_kernels`."""
    _, run_here = load_interpreted_kernels()
    if not run_here:
        return None, False
    mod = _import_interpreted(name)
    return mod, bool(mod.INTERPRET)


def _import_interpreted(name: str):
    """Import ``name`` with TRITON_INTERPRET=1 (its kernels are decorated for the interpreter if
    this is their first import), the variable restored after."""
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        return importlib.import_module(name)
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before


def rerun_under_interpreter(test_file: str) -> None:
    """Run ``test_file`` in a fresh pytest process with TRITON_INTERPRET=1 and require it to pass
    (for when triton was already loaded for a GPU in this process)."""
    import subprocess

    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test_file],
                          env=env, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(test_file)))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout, proc.stdout[-2000:]


def gpu_compiled_marks(module: str) -> list:
    """``pytestmark`` of a GPU Triton suite: skip without CUDA, or when the kernel ``module`` was
    built for the CPU interpreter in this process (or triton is missing). Importing it here, at
    the suite's import, builds it for the GPU before an interpreter suite can set TRITON_INTERPRET."""
    import pytest
    import torch

    cuda = torch.cuda.is_available()
    compiled = False
    if cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
        try:
            compiled = not importlib.import_module(module).INTERPRET
        except ImportError:  # triton missing
            compiled = False
    return [
        pytest.mark.skipif(not cuda, reason="needs a CUDA GPU"),
        pytest.mark.skipif(cuda and not compiled, reason="Triton kernels were built for the CPU interpreter "
                           "in this process (or triton is missing); run this file on its own"),
    ]
