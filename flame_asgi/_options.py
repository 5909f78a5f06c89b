"""Validation of ``FlamePool`` options: a wrong type or value fails when the pool is built,
with an error naming the option and what it accepts (not later, inside a background task).
"""

from __future__ import annotations

import math
from typing import Any


def check_options(name: Any, options: dict[str, Any]) -> None:
    if not isinstance(name, str) or not name:
        raise TypeError(f"FlamePool name must be a non-empty str (got {name!r})")
    where = f"FlamePool {name!r}"
    for key in ("min", "max", "max_concurrency"):
        value = options[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{where}: {key} must be an int (got {type(value).__name__} {value!r})")
    if options["max"] < 1:
        raise ValueError(f"{where}: max must be at least 1 (got {options['max']})")
    if not 0 <= options["min"] <= options["max"]:
        raise ValueError(f"{where}: min must be between 0 and max={options['max']} (got {options['min']})")
    if options["max_concurrency"] < 1:
        raise ValueError(f"{where}: max_concurrency must be at least 1 (got {options['max_concurrency']})")
    idle = options["idle_shutdown_after"]
    if isinstance(idle, tuple):
        if len(idle) != 2 or not callable(idle[1]) or idle[0] is None:
            raise TypeError(f"{where}: idle_shutdown_after=(seconds, predicate) takes a number of seconds and a "
                            f"function of no arguments that runs on the runner (got {idle!r})")
        idle = idle[0]
    _seconds(where, "idle_shutdown_after", idle, zero_ok=True)
    _seconds(where, "min_idle_shutdown_after", options["min_idle_shutdown_after"], zero_ok=True)
    for key in ("boot_timeout", "timeout", "shutdown_timeout"):
        _seconds(where, key, options[key], zero_ok=False)
    if not isinstance(options["single_use"], bool):
        raise TypeError(f"{where}: single_use must be True or False (got {options['single_use']!r})")
    for key in ("on_grow_start", "on_grow_end", "on_shrink"):
        if options[key] is not None and not callable(options[key]):
            raise TypeError(f"{where}: {key} must be a function (sync or async) or None (got {options[key]!r})")
    check_retries(where, options["retries"])
    backend = options["backend"]
    if backend is not None:
        from flame_asgi.backends import Backend

        if not isinstance(backend, Backend):
            hint = " (an instance, not the class: add ())" if isinstance(backend, type) else ""
            raise TypeError(f"{where}: backend must be a flame_asgi Backend instance or None{hint} "
                            f"(got {backend!r})")


def _seconds(where: str, key: str, value: Any, *, zero_ok: bool) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{where}: {key} must be a number of seconds or None for never "
                        f"(got {type(value).__name__} {value!r})")
    if math.isnan(value) or value < 0 or (value == 0 and not zero_ok):
        accepts = "zero or more" if zero_ok else "more than zero"
        raise ValueError(f"{where}: {key} must be {accepts} seconds, or None for never (got {value!r})")


def check_retries(where: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{where}: retries must be an int (got {type(value).__name__} {value!r})")
    if value < 0:
        raise ValueError(f"{where}: retries must be 0 or more (got {value})")
