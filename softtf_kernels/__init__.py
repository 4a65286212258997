"""softtf_kernels: the fused masked-linear ops and the (NoRGa-gated) prefix attention of softtf,
registered as ``torch.ops.softtf.*``.

Importing this package loads the compiled extension (schemas + C++ kernels) and registers the
Python dispatch, fake kernels and autograd of every op of the op table (table.py), defining the
schemas of the ops the table declares in Python (prefix attention). Callers use the typed
functions of :mod:`softtf_kernels.ops` (``superposed_linear`` and ``prefix_attention``
included). The package knows nothing about tasks, models or training.
"""
from __future__ import annotations

import torch  # noqa: F401  (loads libtorch/libc10, which _C links against)

try:
    from . import _C  # noqa: F401  (registers the op schemas and the C++ kernels)
except ImportError as exc:  # pragma: no cover - only on a broken install
    raise ImportError(
        "softtf_kernels._C is not built. Install the package with "
        "`pip install --no-build-isolation -e .` after installing torch (see README)."
    ) from exc

from . import ops, reference, registry  # noqa: E402,F401  (registry: registers the Python side)
from .backend import (  # noqa: E402
    BACKENDS,
    available_backends,
    cpp_available,
    cuda_available,
    get_backend,
    set_backend,
    triton_available,
    use_backend,
)

__all__ = [
    "BACKENDS",
    "available_backends",
    "cpp_available",
    "cuda_available",
    "get_backend",
    "ops",
    "reference",
    "set_backend",
    "triton_available",
    "use_backend",
]
