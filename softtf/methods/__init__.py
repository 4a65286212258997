"""Continual-learning methods behind one protocol (:class:`ContinualMethod`), selectable by name.

Each module registers its method; importing this package imports them all, in the order of
``softtf train --method``'s choices. A new method is one new module plus its line below.
"""
from . import softtf, finetune, lora, adapter, l2p, dualprompt, norga, sapt, sapt_softtf  # noqa: F401  (each registers its method)
from .base import ContinualMethod, MethodOptions, grouped_forward
from .registry import method_class, method_names, register

__all__ = ["ContinualMethod", "MethodOptions", "grouped_forward", "method_class", "method_names", "register"]
