"""Python side of the ``softtf`` ops, derived from the op table (table.py): for every op a CPU/CUDA
kernel that validates and runs the backend chosen for the call, a fake kernel for torch.compile /
meta tensors, and the autograd formula where the op is differentiable. The schemas of the C++-listed
ops are defined by the compiled extension (csrc/ops.cpp), which must be loaded first; those of the
Python-defined ops (``OpSpec.schema``) and of the composites are defined here."""
from __future__ import annotations

import torch
from torch import Tensor

from . import backend
from .table import COMPOSITES, OPS, Composite, OpSpec

_lib = torch.library.Library("softtf", "FRAGMENT")


def _dtype_of(arg) -> torch.dtype:
    # A tensor argument's dtype, or a dtype argument itself (masked_linear_grad_mask's mask_dtype).
    return arg.dtype if isinstance(arg, Tensor) else arg


def _dispatching(spec: OpSpec):
    def kernel(*args):
        spec.validate(*args)
        dtypes = tuple(_dtype_of(args[i]) for i in spec.dtype_args if i < len(args) and args[i] is not None)
        _, impl = backend.resolve(spec.name, args[0].device, dtypes)
        return impl(*args)

    kernel.__name__ = f"{spec.name}_dispatch"
    return kernel


def _faking(spec: OpSpec):
    def fake(*args, **kwargs):
        # Same checks as the real kernel, except those reading values a fake tensor does not hold.
        spec.validate(*args, **kwargs, check_values=False)
        return spec.fake(*args, **kwargs)

    fake.__name__ = f"{spec.name}_fake"
    return fake


def _output_of(comp: Composite):
    def composite(*args):
        return getattr(torch.ops.softtf, comp.of)(*args)[comp.output]

    composite.__name__ = comp.name
    return composite


for _spec in OPS:
    _qualname = f"softtf::{_spec.name}"
    if _spec.schema is not None:
        _lib.define(f"{_spec.name}{_spec.schema}")
    torch.library.register_kernel(_qualname, ("cpu", "cuda"), _dispatching(_spec), lib=_lib)
    torch.library.register_fake(_qualname, _faking(_spec), lib=_lib)
    if _spec.autograd is not None:
        torch.library.register_autograd(_qualname, _spec.autograd.backward,
                                        setup_context=_spec.autograd.setup_context, lib=_lib)

# Under torch.autocast these ops run in the autocast dtype, as torch's own linear and attention do:
# their fp32/fp16/bf16 inputs on the autocast device (x, W, masks, bias, LoRA blocks, prompts) are
# cast to torch.get_autocast_dtype(device) first, read per call (torch.library.register_autocast
# would fix one dtype at registration). The casts are differentiable: a trainable fp32 mask still
# receives an fp32 gradient; kernels accumulate in fp32 either way. float64 is left alone (as
# autocast does). Backward ops are not listed: autograd runs them outside the autocast region.
AUTOCAST_OPS = ("masked_linear", "mixed_task_linear", "routed_lora", "prefix_attention_forward")
_CASTABLE = (torch.float32, torch.float16, torch.bfloat16)


def _autocasting(name: str, device_type: str):
    def kernel(*args, **kwargs):
        dtype = torch.get_autocast_dtype(device_type)

        def cast(a):
            ok = isinstance(a, Tensor) and a.dtype in _CASTABLE and a.device.type == device_type
            return a.to(dtype) if ok else a

        with torch.autocast(device_type, enabled=False):
            return getattr(torch.ops.softtf, name)(*map(cast, args), **{k: cast(v) for k, v in kwargs.items()})

    kernel.__name__ = f"{name}_autocast_{device_type}"
    return kernel


for _name in AUTOCAST_OPS:
    _lib.impl(_name, _autocasting(_name, "cpu"), "AutocastCPU")
    _lib.impl(_name, _autocasting(_name, "cuda"), "AutocastCUDA")

for _comp in COMPOSITES:
    _lib.define(f"{_comp.name}{_comp.schema}")
    _lib.impl(_comp.name, _output_of(_comp), "CompositeImplicitAutograd")
