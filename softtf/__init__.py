"""softtf: Soft-TransFormers for continual learning on fused masked-linear kernels."""
from softtf_kernels import get_backend, set_backend, use_backend

from .layer import SoftLinear

__version__ = "0.1.0"
__all__ = ["SoftLinear", "get_backend", "set_backend", "use_backend", "__version__"]
