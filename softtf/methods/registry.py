"""The names ``softtf train --method`` accepts, mapped to the classes that implement them."""
from __future__ import annotations

from typing import Callable, TypeVar

__all__ = ["register", "unregister", "method_class", "method_names"]

T = TypeVar("T", bound=type)
_METHODS: dict[str, type] = {}  # name -> ContinualMethod subclass, in registration order


def register(cls: T) -> T:
    """Class decorator: make ``cls`` selectable by its ``name``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"register: {cls.__name__} needs a non-empty class attribute 'name'")
    if name in _METHODS and _METHODS[name] is not cls:
        raise ValueError(f"register: method name {name!r} is already taken by {_METHODS[name].__name__}")
    _METHODS[name] = cls
    return cls


def unregister(name: str) -> None:
    """Remove a method (e.g. one a test or a notebook registered for a while)."""
    if name not in _METHODS:
        raise KeyError(f"unregister: no method named {name!r} (methods: {method_names()})")
    del _METHODS[name]


def method_names() -> tuple[str, ...]:
    return tuple(_METHODS)


def method_class(name: str) -> Callable:
    if name not in _METHODS:
        raise ValueError(f"method must be one of {method_names()}, got {name!r}")
    return _METHODS[name]
