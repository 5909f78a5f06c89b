"""A pool's options, checked once and frozen: ``PoolConfig.build(name, **options)``.

A wrong type or value fails when the pool is built, with an error naming the option and
what it accepts (not later, inside a background task). ``CallOptions`` is what one call
asked for, resolved against the pool's defaults.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from flame_asgi._wire.protocol import WorkKind
from flame_asgi.backends import Backend, backend_from_env

Hook = Callable[..., Any]


@dataclasses.dataclass(frozen=True)
class PoolConfig:
    """What a pool was built with (see ``FlamePool`` for each option's meaning)."""

    name: str
    backend: Backend
    min: int
    max: int
    max_concurrency: int
    warm: int
    idle_shutdown_after: float | tuple[float, Callable[[], Any]] | None
    min_idle_shutdown_after: float | None
    boot_timeout: float | None
    timeout: float | None
    shutdown_timeout: float | None
    single_use: bool
    on_grow_start: Hook | None
    on_grow_end: Hook | None
    on_shrink: Hook | None
    retries: int

    @classmethod
    def build(cls, name: Any, *, backend: Backend | None, **options: Any) -> PoolConfig:
        check_options(name, {"backend": backend, **options})
        return cls(name=name, backend=backend if backend is not None else backend_from_env(), **options)

    @property
    def idle_after(self) -> float | None:
        """Seconds of idleness after which a runner beyond ``min`` stops."""
        idle = self.idle_shutdown_after
        return idle[0] if isinstance(idle, tuple) else idle

    @property
    def idle_predicate(self) -> Callable[[], Any] | None:
        """FLAME's ``{time, fn}``: idle that long *and* this, run on the runner, agrees."""
        idle = self.idle_shutdown_after
        return idle[1] if isinstance(idle, tuple) else None

    def call_options(self, timeout: float | None, link: bool, on_progress: Callable[[Any], Any] | None = None,
                     track_resources: bool = False, retries: int | None = 0, kind: WorkKind = "call",
                     run_default: bool = True) -> CallOptions:
        """One call's options: ``timeout`` bounds the wait for a slot (default ``boot_timeout``)
        and the run (default ``timeout``; a cast, ``run_default=False``, runs unbounded)."""
        if retries is None:
            retries = self.retries
        else:
            check_retries(f"call on pool {self.name!r}", retries)
        run = timeout if timeout is not None else (self.timeout if run_default else None)
        return CallOptions(self.boot_timeout if timeout is None else timeout, run, link, on_progress,
                           track_resources, retries, kind)


@dataclasses.dataclass(frozen=True)
class CallOptions:
    """What a caller asked of one call, besides the function and its arguments."""

    wait: float | None  # for a slot
    run: float | None  # on the runner; past it the work is cancelled there too
    link: bool
    on_progress: Callable[[Any], Any] | None
    track_resources: bool
    retries: int
    kind: WorkKind = "call"  # or "cast": how the runner and telemetry name it


def check_options(name: Any, options: dict[str, Any]) -> None:
    if not isinstance(name, str) or not name:
        raise TypeError(f"FlamePool name must be a non-empty str (got {name!r})")
    where = f"FlamePool {name!r}"
    for key in ("min", "max", "max_concurrency", "warm"):
        value = options[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{where}: {key} must be an int (got {type(value).__name__} {value!r})")
    if options["max"] < 1:
        raise ValueError(f"{where}: max must be at least 1 (got {options['max']})")
    if not 0 <= options["min"] <= options["max"]:
        raise ValueError(f"{where}: min must be between 0 and max={options['max']} (got {options['min']})")
    if not 0 <= options["warm"] <= options["max"]:
        raise ValueError(f"{where}: warm (spare runners kept booted while the pool is busy) must be between 0 and "
                         f"max={options['max']} (got {options['warm']})")
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
        if not isinstance(backend, Backend):
            hint = " (an instance, not the class: add ())" if isinstance(backend, type) else ""
            raise TypeError(f"{where}: backend must be a flame_asgi Backend instance or None{hint} "
                            f"(got {backend!r})")
        if not 0 < backend.heartbeat_interval < backend.heartbeat_timeout:
            # Otherwise a runner's silence limit passes between two heartbeats of a healthy
            # parent: every runner would exit, and the parent see it lost, within seconds.
            raise ValueError(f"{where}: the backend's heartbeat_interval ({backend.heartbeat_interval:g} s) must be "
                             f"more than 0 and less than its heartbeat_timeout ({backend.heartbeat_timeout:g} s)")


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
