"""SoftConfig: which linear layers of a pretrained transformer get soft masks, and how.

The fields mirror PEFT's ``LoraConfig`` where they can. A field left at ``None`` takes the default
of the architecture being wrapped (see :func:`resolve_config`):

===============================  =========================================  ==========================
architecture                     target_modules                             layers
===============================  =========================================  ==========================
timm ``VisionTransformer``       ``attn.qkv``, ``attn.proj``                the last 3 blocks
HF ``BertModel`` / ``Bert*``     ``attention.self.{query,key,value}``       the last 3 encoder layers
===============================  =========================================  ==========================

Matching rules (as in PEFT):

* ``target_modules`` as a **string** is a regular expression that must ``re.fullmatch`` the full
  dotted module name (e.g. ``r"blocks\\.(9|10|11)\\.attn\\.qkv"``);
* as a **list of strings**, a module matches when its full name equals an entry or ends with
  ``"." + entry`` (e.g. ``["attn.qkv", "attn.proj"]``).
* ``layers`` keeps only modules whose block/layer index (the first integer component of the
  dotted name, e.g. ``9`` in ``blocks.9.attn.qkv`` or ``encoder.layer.9.attention.self.query``)
  is listed. Negative indices count from the last block found among the matching modules.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

__all__ = ["SoftConfig", "detect_architecture", "resolve_config", "layer_index", "ARCH_DEFAULTS", "config_with"]

# Per-architecture defaults: target module suffixes, how many trailing blocks, head names.
ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "vit": {"target_modules": ["attn.qkv", "attn.proj"], "last_n_layers": 3, "heads": ["head"]},
    "bert": {
        "target_modules": ["attention.self.query", "attention.self.key", "attention.self.value"],
        "last_n_layers": 3,
        "heads": ["classifier"],
    },
}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
_MASK_DTYPES = {**_DTYPES, "int8": torch.int8}  # int8: frozen masks row-quantized (softtf_kernels.quant)
_INT_COMPONENT = re.compile(r"^\d+$")


def _dtype_from(value: Any, argname: str, names: dict[str, torch.dtype] = _DTYPES) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        if value is not None and value not in names.values():
            raise ValueError(f"SoftConfig: {argname} must be one of {sorted(names)}, got {value}")
        return value
    if isinstance(value, str):
        key = value.removeprefix("torch.")
        if key in names:
            return names[key]
    raise ValueError(f"SoftConfig: {argname} must be None, a torch dtype or one of {sorted(names)}, got {value!r}")


def _check_mask_init(init: Any) -> Any:
    if isinstance(init, str):
        if init != "ones":
            raise ValueError(f"SoftConfig: mask_init must be 'ones' or ('uniform', low, high), got {init!r}")
        return init
    if isinstance(init, (tuple, list)) and len(init) == 3 and init[0] == "uniform":
        try:
            low, high = float(init[1]), float(init[2])
        except (TypeError, ValueError):
            raise ValueError(f"SoftConfig: mask_init uniform bounds must be numbers, got {init!r}") from None
        if not low <= high:
            raise ValueError(f"SoftConfig: mask_init uniform bounds must satisfy low <= high, got ({low}, {high})")
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError(f"SoftConfig: mask_init uniform bounds must be finite, got ({low}, {high})")
        return ("uniform", low, high)
    raise ValueError(f"SoftConfig: mask_init must be 'ones' or ('uniform', low, high), got {init!r}")


def _str_list(value: Any, argname: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, Sequence) and all(isinstance(v, str) and v for v in value):
        return list(value)
    raise TypeError(f"SoftConfig: {argname} must be a string or a list of non-empty strings, got {value!r}")


@dataclass
class SoftConfig:
    """Where to put soft masks and how to initialise them.

    Args:
        target_modules: regex (``str``, full match on the dotted name) or list of name suffixes of
            the ``nn.Linear`` modules to mask. ``None``: the architecture default.
        layers: block/layer indices to keep (an ``int`` or a list; negative counts from the end).
            ``None``: the architecture default (the last 3 blocks) when ``target_modules`` is also
            ``None``, otherwise every layer the targets match.
        mask_init: ``"ones"`` (an untrained task reproduces the pretrained model exactly) or
            ``("uniform", low, high)`` (the public code's U(0.99, 1.0)).
        mask_dtype: dtype of frozen masks (``None``: the weight's dtype); a torch dtype or its name.
        modules_to_save: names (suffixes) of extra modules that stay trainable, e.g. a classifier
            head. ``None``: the architecture's head if it has parameters; ``[]``: none.
    """

    target_modules: str | list[str] | None = None
    layers: int | list[int] | None = None
    mask_init: Any = "ones"
    mask_dtype: torch.dtype | str | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        if self.target_modules is not None:
            if isinstance(self.target_modules, str):
                if not self.target_modules:
                    raise ValueError("SoftConfig: target_modules must not be an empty string")
                try:
                    re.compile(self.target_modules)
                except re.error as exc:
                    raise ValueError(f"SoftConfig: target_modules is not a valid regex ({exc}): {self.target_modules!r}") from None
            else:
                tm = _str_list(self.target_modules, "target_modules")
                if not tm:
                    raise ValueError("SoftConfig: target_modules must not be an empty list (use None for the default)")
                self.target_modules = tm
        if self.layers is not None:
            layers = [self.layers] if isinstance(self.layers, int) else self.layers
            if isinstance(layers, bool) or not isinstance(layers, Sequence) or not layers or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in layers
            ):
                raise TypeError(f"SoftConfig: layers must be an int or a non-empty list of ints, got {self.layers!r}")
            if len(set(layers)) != len(layers):
                raise ValueError(f"SoftConfig: layers has duplicates: {list(layers)}")
            self.layers = list(layers)
        self.mask_init = _check_mask_init(self.mask_init)
        self.mask_dtype = _dtype_from(self.mask_dtype, "mask_dtype", _MASK_DTYPES)
        self.modules_to_save = _str_list(self.modules_to_save, "modules_to_save")

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        """A JSON-serialisable dict (``from_dict`` inverts it)."""
        return {
            "target_modules": self.target_modules,
            "layers": self.layers,
            "mask_init": list(self.mask_init) if isinstance(self.mask_init, tuple) else self.mask_init,
            "mask_dtype": None if self.mask_dtype is None else str(self.mask_dtype).removeprefix("torch."),
            "modules_to_save": self.modules_to_save,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "SoftConfig":
        if not isinstance(data, dict):
            raise TypeError(f"SoftConfig.from_dict: expected a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"SoftConfig.from_dict: unknown fields {unknown} (known: {sorted(known)})")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "SoftConfig":
        return cls.from_dict(json.loads(text))


def config_with(config: SoftConfig | None, fields: dict[str, Any], where: str = "wrap") -> SoftConfig | None:
    """``config`` with ``fields`` (SoftConfig field -> value) overriding its fields, as a copy
    (``dataclasses.replace``: ``config`` itself never changes); a new SoftConfig from ``fields`` when
    ``config`` is None; ``config`` as given when ``fields`` is empty. An unknown field is a TypeError."""
    if not fields:
        return config
    known = [f.name for f in dataclasses.fields(SoftConfig)]
    unknown = [k for k in fields if k not in known]
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise TypeError(f"{where}() got an unexpected keyword argument {unknown[0]!r}{hint}; "
                        f"the keyword arguments are SoftConfig's fields: {', '.join(known)}")
    if config is None:
        return SoftConfig(**fields)
    if not isinstance(config, SoftConfig):
        raise TypeError(f"{where}: config must be a SoftConfig or None, got {type(config).__name__}")
    return dataclasses.replace(config, **fields)


# ---------------------------------------------------------------------- resolution against a model
def detect_architecture(model: nn.Module) -> str | None:
    """``"vit"`` for a timm VisionTransformer, ``"bert"`` for an HF BERT model, else ``None``."""
    cls_names = {c.__name__ for c in type(model).__mro__}
    if "VisionTransformer" in cls_names and hasattr(model, "blocks"):
        return "vit"
    if any(n.startswith("Bert") for n in cls_names) or getattr(getattr(model, "config", None), "model_type", None) == "bert":
        return "bert"
    return None


def layer_index(name: str) -> int | None:
    """The block/layer index of a dotted module name: its first integer component, else None."""
    for part in name.split("."):
        if _INT_COMPONENT.match(part):
            return int(part)
    return None


def _matches(name: str, target: str | list[str]) -> bool:
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return any(name == t or name.endswith("." + t) for t in target)


def resolve_config(model: nn.Module, config: SoftConfig | None = None) -> tuple[SoftConfig, list[str]]:
    """Fill ``None`` fields with the architecture defaults and list the module names to wrap.

    Returns ``(resolved_config, names)`` where ``names`` are the full dotted names of the
    ``nn.Linear`` modules to replace, in model order, and the resolved config has explicit
    ``target_modules``, ``layers`` (non-negative, or ``None`` = all) and ``modules_to_save``.
    """
    if config is None:
        config = SoftConfig()
    if not isinstance(config, SoftConfig):
        raise TypeError(f"wrap: config must be a SoftConfig or None, got {type(config).__name__}")
    arch = detect_architecture(model)
    target, layers, to_save = config.target_modules, config.layers, config.modules_to_save
    default_layers = False
    if target is None:
        if arch is None:
            raise ValueError(
                f"wrap: no default target_modules for {type(model).__name__} (supported defaults: timm "
                "VisionTransformer, HF BERT); pass SoftConfig(target_modules=...)"
            )
        target = list(ARCH_DEFAULTS[arch]["target_modules"])
        default_layers = layers is None
    if to_save is None:
        to_save = [h for h in (ARCH_DEFAULTS[arch]["heads"] if arch else []) if _has_params(model, h)]

    modules = dict(model.named_modules())
    matched = [n for n in modules if n and _matches(n, target)]
    if not matched:
        raise ValueError(
            f"wrap: target_modules={target!r} matched no module of {type(model).__name__}; "
            f"linear modules available include {_linear_names(model)[:8]}"
        )
    for n in matched:
        if type(modules[n]).__name__ == "SoftLinear":
            raise ValueError(f"wrap: module {n!r} is already a SoftLinear (the model is already wrapped)")
        if not isinstance(modules[n], nn.Linear):
            raise TypeError(
                f"wrap: target module {n!r} is a {type(modules[n]).__name__}, expected nn.Linear "
                f"(target_modules={target!r})"
            )
    present = sorted({i for n in matched if (i := layer_index(n)) is not None})
    if default_layers:
        layers = present[-ARCH_DEFAULTS[arch]["last_n_layers"]:]
    if layers is not None:
        if not present:
            raise ValueError(f"wrap: layers={layers} given but the matched modules have no layer index: {matched[:4]}")
        resolved: dict[int, int] = {}  # block -> the entry of layers that named it
        for i in layers:
            j = present[i] if i < 0 and -len(present) <= i else i
            if j not in present:
                raise ValueError(f"wrap: layers contains {i}, but the matched modules have layer indices {present}")
            if j in resolved:
                raise ValueError(f"wrap: layers={list(layers)} names block {j} twice (as {resolved[j]} and as {i})")
            resolved[j] = i
        layers = sorted(resolved)
        matched = [n for n in matched if layer_index(n) in layers]
    for h in to_save:
        if not any(n == h or n.endswith("." + h) for n in modules if n):
            raise ValueError(f"wrap: modules_to_save entry {h!r} names no module of {type(model).__name__}")
        if any(n == h or n.endswith("." + h) for n in matched):
            raise ValueError(f"wrap: modules_to_save entry {h!r} is also a masked target module")
    resolved_cfg = SoftConfig(
        target_modules=target if isinstance(target, str) else list(target),
        layers=layers,
        mask_init=config.mask_init,
        mask_dtype=config.mask_dtype,
        modules_to_save=list(to_save),
    )
    return resolved_cfg, matched


def _has_params(model: nn.Module, name: str) -> bool:
    mods = dict(model.named_modules())
    return name in mods and any(True for _ in mods[name].parameters())


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
