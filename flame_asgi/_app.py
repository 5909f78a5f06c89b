"""``flame_asgi.FastAPI``: a drop-in FastAPI with FLAME pools, and the ``flame_pool`` dependency.

Pools registered with ``add_flame_pool`` start inside the app's lifespan, around the
user's own ``lifespan=`` (pools first, so the user's startup can already use them), and
close after it. With ``FLAME_PARENT`` set the same app object is a runner: it serves only
the internal ``/_flame`` endpoints, still runs the user's lifespan (database pools and
all), and its own pools start empty.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import fastapi
from starlette.requests import HTTPConnection
from starlette.types import Receive, Scope, Send

from flame_asgi._parent import runner_mode
from flame_asgi._pool import FlamePool
from flame_asgi._runner_host import runner_host
from flame_asgi._runner_logs import forward_runner_logs

Lifespan = Callable[[Any], contextlib.AbstractAsyncContextManager[Mapping[str, Any] | None]]


class FastAPI(fastapi.FastAPI):
    """``fastapi.FastAPI`` plus ``add_flame_pool`` / ``flame_pools`` and runner mode."""

    def __init__(self, *args: Any, lifespan: Any = None, **kwargs: Any) -> None:
        self.flame_pools: dict[str, FlamePool] = {}
        self._user_lifespan = _as_context_factory(lifespan)
        self._flame_started = False
        super().__init__(*args, lifespan=self._flame_lifespan, **kwargs)  # type: ignore[arg-type]

    def add_flame_pool(self, name: str, **pool_options: Any) -> FlamePool:
        """Register a pool that starts and stops with this app; see ``FlamePool`` for options."""
        if self._flame_started:
            raise RuntimeError(f"add_flame_pool({name!r}) after the app started: register pools at import time")
        if name in self.flame_pools:
            raise ValueError(f"a flame pool named {name!r} is already registered on this app")
        pool = FlamePool(name, **pool_options)
        pool.app = self
        self.flame_pools[name] = pool
        return pool

    @contextlib.asynccontextmanager
    async def _flame_lifespan(self, app: Any) -> AsyncIterator[Mapping[str, Any] | None]:
        self._flame_started = True
        if runner_mode():
            runner_host().arm_failsafe()
            forward_runner_logs(runner_host().info)
        async with contextlib.AsyncExitStack() as stack:
            for pool in self.flame_pools.values():
                await pool.start()
                stack.push_async_callback(pool.aclose)
            state = None
            if self._user_lifespan is not None:
                state = await stack.enter_async_context(self._user_lifespan(app))
            try:
                yield state
            finally:
                self._flame_started = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan" and runner_mode():
            await runner_host()(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def _as_context_factory(lifespan: Any) -> Lifespan | None:
    if lifespan is None:
        return None
    if inspect.isasyncgenfunction(lifespan):
        return contextlib.asynccontextmanager(lifespan)
    return lifespan  # type: ignore[no-any-return]


@dataclasses.dataclass(frozen=True)
class _PoolDependency:
    name: str

    def __call__(self, conn: HTTPConnection) -> FlamePool:
        pools: Mapping[str, FlamePool] = getattr(conn.app, "flame_pools", {})
        pool = pools.get(self.name)
        if pool is None:
            known = ", ".join(sorted(pools)) or "none"
            raise RuntimeError(f"no flame pool named {self.name!r} on this app (registered: {known}); "
                               f"call app.add_flame_pool({self.name!r}, ...) on a flame_asgi.FastAPI app")
        return pool


def flame_pool(name: str) -> Callable[[HTTPConnection], FlamePool]:
    """A FastAPI dependency giving the app's pool ``name``:

    ``pool: FlamePool = Depends(flame_pool("thumbs"))``
    """
    return _PoolDependency(name)
