"""Every FlamePool option is checked when the pool is built, with an error naming it."""

from __future__ import annotations

from typing import Any

import pytest

from flame_asgi import FlamePool, LocalBackend, ProcessBackend


@pytest.mark.parametrize(("options", "error", "message"), [
    ({"max": 0}, ValueError, "max must be at least 1"),
    ({"max": 2.5}, TypeError, "max must be an int"),
    ({"max": True}, TypeError, "max must be an int"),
    ({"min": -1}, ValueError, "min must be between 0 and max=1"),
    ({"min": 3, "max": 2}, ValueError, "min must be between 0 and max=2"),
    ({"min": "1"}, TypeError, "min must be an int"),
    ({"max_concurrency": 0}, ValueError, "max_concurrency must be at least 1"),
    ({"idle_shutdown_after": "30"}, TypeError, "idle_shutdown_after must be a number of seconds or None"),
    ({"idle_shutdown_after": -1}, ValueError, "idle_shutdown_after must be zero or more seconds"),
    ({"idle_shutdown_after": (30, "yes")}, TypeError, r"idle_shutdown_after=\(seconds, predicate\) takes"),
    ({"idle_shutdown_after": (-1, lambda: True)}, ValueError, r"idle_shutdown_after must be zero or more"),
    ({"retries": 1.5}, TypeError, r"retries must be an int"),
    ({"retries": -1}, ValueError, r"retries must be 0 or more"),
    ({"min_idle_shutdown_after": float("nan")}, ValueError, "min_idle_shutdown_after must be zero or more"),
    ({"boot_timeout": 0}, ValueError, "boot_timeout must be more than zero seconds"),
    ({"timeout": -5}, ValueError, "timeout must be more than zero seconds"),
    ({"shutdown_timeout": "1m"}, TypeError, "shutdown_timeout must be a number of seconds"),
    ({"single_use": 1}, TypeError, "single_use must be True or False"),
    ({"on_grow_start": "hook"}, TypeError, "on_grow_start must be a function"),
    ({"on_shrink": 3}, TypeError, "on_shrink must be a function"),
    ({"backend": ProcessBackend}, TypeError, r"backend must be a flame_asgi Backend instance or None \(an instance"),
    ({"backend": "process"}, TypeError, "backend must be a flame_asgi Backend instance"),
    ({"backend": ProcessBackend(heartbeat_interval=10, heartbeat_timeout=10)}, ValueError,
     r"the backend's heartbeat_interval \(10 s\) must be more than 0 and less than its heartbeat_timeout \(10 s\)"),
])
def test_bad_options_fail_at_construction(options: dict[str, Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=f"FlamePool 'p': {message}"):
        FlamePool("p", **options)


def test_bad_names_fail_at_construction() -> None:
    with pytest.raises(TypeError, match="name must be a non-empty str"):
        FlamePool("")
    with pytest.raises(TypeError, match="name must be a non-empty str"):
        FlamePool(3)  # type: ignore[arg-type]


def test_good_options_are_kept() -> None:
    pool = FlamePool("p", backend=LocalBackend(), min=1, max=3, max_concurrency=2, idle_shutdown_after=0,
                     min_idle_shutdown_after=None, boot_timeout=1.5, timeout=None, shutdown_timeout=2,
                     single_use=False, on_shrink=print)
    assert (pool.min, pool.max, pool.max_concurrency, pool.idle_shutdown_after) == (1, 3, 2, 0)
    assert repr(pool).startswith("<FlamePool 'p' new min=1 max=3 pid=")
