"""A batch of model inputs: a tensor, or a mapping (dict, Hugging Face ``BatchEncoding``) / tuple /
list of tensors sharing dim 0."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import Tensor

__all__ = ["batch_size", "call_batch_size", "call_model", "take_rows", "device_of", "to_device"]


def call_model(model: Callable[..., Any], inputs: Any) -> Any:
    """``model(**inputs)`` for a mapping (keyword arguments, as Hugging Face models and PEFT take
    ``input_ids=``, ``attention_mask=``), else ``model(inputs)``."""
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


def _first(inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return next(iter(inputs.values()))
    if isinstance(inputs, (tuple, list)):
        return inputs[0]
    return inputs


def batch_size(inputs: Any) -> int:
    if isinstance(inputs, Tensor):
        return inputs.shape[0]
    if isinstance(inputs, (Mapping, tuple, list)):
        if not inputs:
            raise ValueError("inputs is empty: no tensor to read the batch size from")
        return batch_size(_first(inputs))
    raise TypeError(f"inputs must be a tensor, a mapping or a tuple of tensors, got {type(inputs).__name__}")


def device_of(inputs: Any) -> torch.device:
    if isinstance(inputs, Tensor):
        return inputs.device
    return device_of(_first(inputs))


def take_rows(inputs: Any, index: Tensor) -> Any:
    """Rows ``index`` of a batch (non-tensor leaves are passed through)."""
    if isinstance(inputs, Tensor):
        return inputs[index]
    if isinstance(inputs, Mapping):
        return {k: take_rows(v, index) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(take_rows(v, index) for v in inputs)
    return inputs


def to_device(inputs: Any, device) -> Any:
    if isinstance(inputs, Mapping):
        return {k: v.to(device) for k, v in inputs.items()}
    return inputs.to(device)


def call_batch_size(args: tuple, kwargs: dict) -> int | None:
    """The batch size of a model call: dim 0 of its first tensor argument (or of a tensor in a
    mapping: Hugging Face inputs); None if there is none."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor) and value.dim() > 0:
            return int(value.shape[0])
        if isinstance(value, Mapping):
            for v in value.values():
                if isinstance(v, Tensor) and v.dim() > 0:
                    return int(v.shape[0])
    return None
