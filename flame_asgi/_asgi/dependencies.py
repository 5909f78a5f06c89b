"""FastAPI dependencies: ``flame_pool(name)`` (the app's pool) and ``flame_runner(name)`` (a lease).

No ``from __future__ import annotations`` in this module, on purpose: FastAPI before
0.125 reads a dependency object's ``__call__`` annotations without resolving strings
(an instance has no ``__globals__``), and would take ``conn: "HTTPConnection"`` for a
required query parameter (HTTP 422). Real annotation objects work on every release.
"""

import dataclasses
from collections.abc import AsyncIterator, Mapping
from typing import Any

from starlette.requests import HTTPConnection

from flame_asgi._asgi.extension import SCOPE_KEY
from flame_asgi._pool.lease import FlameRunner
from flame_asgi._pool.pool import FlamePool


def _find_pool(conn: HTTPConnection, name: str) -> FlamePool:
    # The app serving this route first, then the outermost flame app (a mounted sub-app's
    # routes use the pools of the app it is mounted in).
    own: Mapping[str, FlamePool] = getattr(conn.scope.get("app"), "flame_pools", None) or {}
    outer: Mapping[str, FlamePool] = conn.scope.get(SCOPE_KEY) or {}
    pool = own.get(name) or outer.get(name)
    if pool is None:
        known = ", ".join(sorted({*own, *outer})) or "none"
        raise RuntimeError(f"no flame pool named {name!r} on this app (registered: {known}); "
                           f"call flame_asgi.add_flame_pool(app, {name!r}, ...) at import time")
    return pool


@dataclasses.dataclass(frozen=True)
class _PoolDependency:
    name: str

    def __call__(self, conn: HTTPConnection) -> FlamePool:
        return _find_pool(conn, self.name)


@dataclasses.dataclass(frozen=True)
class _RunnerDependency:
    name: str
    timeout: Any = None

    async def __call__(self, conn: HTTPConnection) -> AsyncIterator[FlameRunner]:
        async with _find_pool(conn, self.name).runner(timeout=self.timeout) as runner:
            yield runner


def flame_pool(name: str) -> _PoolDependency:
    """A FastAPI dependency giving the app's pool ``name``:

    ``pool: Annotated[FlamePool, Depends(flame_pool("thumbs"))]``

    In a plain Starlette endpoint: ``pool = flame_pool("thumbs")(request)``.
    """
    return _PoolDependency(name)


def flame_runner(name: str, *, timeout: Any = None) -> _RunnerDependency:
    """A FastAPI dependency leasing one runner slot of pool ``name`` for the request or WebSocket:

    ``runner: Annotated[FlameRunner, Depends(flame_runner("models"))]``

    Every ``runner.call``/``cast``/``stream``/``place_child`` runs on that one runner.
    ``timeout`` bounds the wait for the slot (default: the pool's ``boot_timeout``).
    """
    return _RunnerDependency(name, timeout)
