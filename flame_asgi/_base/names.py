"""How events, spans and errors name a function: ``function_name(fn)``."""

from __future__ import annotations

import functools
from typing import Any


def unwrap(fn: Any) -> Any:
    """The function under any ``functools.partial`` layers."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return fn


def function_name(fn: Any) -> str:
    """``fn``'s qualified name, through ``functools.partial`` layers (``Video.encode``).

    Events and spans use it as is; error messages add ``()``."""
    target = unwrap(fn)
    name: str = getattr(target, "__qualname__", type(target).__qualname__)
    return name
