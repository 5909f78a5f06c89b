"""``add_flame_pool(app, ...)``: FLAME on any Starlette-based app, without changing its class.

(Any other ASGI app is wrapped by ``FlameApp``, in ``any_app``, which shares ``FlameExtension``.)

Installing the extension on an app does two things, once, and leaves everything else the
app has untouched:

- **Lifespan.** ``app.router.lifespan_context`` is wrapped: the app's pools start first
  (so the app's own startup can already use them), then whatever the router had runs as
  before (a ``lifespan=`` of any accepted form, ``on_startup``/``on_shutdown``,
  ``@app.on_event``, merged router lifespans), and the pools close after it. Wrapping the
  router's context rather than passing a ``lifespan=`` of our own is what keeps every
  form the framework accepts working: the framework still interprets it.
- **Runner mode.** The app's middleware stack is wrapped *outside* everything it builds
  (including middleware added later), so with ``FLAME_PARENT`` set the runner host
  answers every HTTP and WebSocket request (``/_flame``, 404 elsewhere) before any user
  middleware (auth, trusted hosts, HTTPS redirects) sees it; lifespan messages still
  reach the app.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from starlette.middleware.errors import ServerErrorMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from flame_asgi._base.parent import runner_mode
from flame_asgi._observe.runner_logs import forward_runner_logs
from flame_asgi._pool.pool import FlamePool
from flame_asgi._runner.host import runner_host

log = logging.getLogger("flame_asgi.app")
SCOPE_KEY = "flame_asgi.pools"  # the outermost flame app's pools, for routes of mounted sub-apps
_ATTR = "_flame_extension"


class FlameExtension:
    """What ``add_flame_pool`` installed on one app: its pools and whether they run."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.pools: dict[str, FlamePool] = {}
        self.started = False

    def add(self, name: str, options: Mapping[str, Any]) -> FlamePool:
        if not isinstance(name, str) or not name:
            raise TypeError(f"add_flame_pool: name must be a non-empty str (got {name!r})")
        if self.started:
            raise RuntimeError(f"add_flame_pool({name!r}) after the app started: register pools at import time")
        if name in self.pools:
            raise ValueError(f"a flame pool named {name!r} is already registered on this app")
        pool = FlamePool(name, **options)
        pool.app = self.app
        self.pools[name] = pool
        return pool

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """The pools' part of the app's lifespan: started before the app's own, closed after."""
        self.started = True
        library = async_library()
        if library != "asyncio":
            # Pools run on asyncio; under trio the app serves as it would without them.
            for pool in self.pools.values():
                pool.refuse(f"flame_asgi pools need asyncio, and this app runs on {library}")
            log.warning("flame_asgi: pools %s not started: they need asyncio, and this app runs on %s",
                        ", ".join(map(repr, self.pools)) or "(none)", library)
            try:
                yield
            finally:
                self.started = False
            return
        if runner_mode():
            runner_host().arm_failsafe()
            forward_runner_logs(runner_host().info)
        try:
            async with contextlib.AsyncExitStack() as stack:
                for pool in self.pools.values():
                    await pool.start()
                    stack.push_async_callback(pool.aclose)
                yield
        finally:
            self.started = False


def async_library() -> str:
    """``asyncio``, or the other event loop this lifespan runs on (``trio``).

    Asked of asyncio itself: anyio no longer brings sniffio, so it may not be installed."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return "trio" if "trio" in sys.modules else "an event loop other than asyncio"
    return "asyncio"


class _Lifespan:
    """The router's lifespan context with the pools around it; what it wrapped stays reachable."""

    def __init__(self, extension: FlameExtension, inner: Callable[[Any], Any]) -> None:
        self.extension = extension
        self.inner = inner

    @contextlib.asynccontextmanager
    async def __call__(self, app: Any) -> AsyncIterator[Any]:
        async with self.extension.running(), self.inner(app) as state:
            yield state


class _RunnerMode:
    """Outermost ASGI layer: in runner mode the runner host serves all but lifespan."""

    def __init__(self, app: ASGIApp, pools: Mapping[str, FlamePool]) -> None:
        self.app = app
        self.pools = pools

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            if runner_mode():
                await runner_host()(scope, receive, send)
                return
            scope.setdefault(SCOPE_KEY, self.pools)
        await self.app(scope, receive, send)


def adopt(app: Any) -> FlameExtension:
    """A new extension for a wrapper that runs lifespan and runner mode itself (``FlameApp``)."""
    extension = FlameExtension(app)
    app.__dict__[_ATTR] = extension
    return extension


def install(app: Any) -> FlameExtension:
    """The app's extension, installing it on first use (see the module docs)."""
    existing: FlameExtension | None = app.__dict__.get(_ATTR)
    if existing is not None:
        return existing
    router = getattr(app, "router", None)
    if router is None or not hasattr(router, "lifespan_context") or not hasattr(app, "build_middleware_stack"):
        raise TypeError(
            f"add_flame_pool needs a Starlette-based app (starlette.applications.Starlette, fastapi.FastAPI or "
            f"flame_asgi.FastAPI); got {type(app).__module__}.{type(app).__qualname__}. For any other ASGI app "
            "(Litestar, Quart, Django, a bare callable), wrap it first: `app = flame_asgi.FlameApp(app)`."
        )
    if getattr(app, "middleware_stack", None) is not None:
        raise RuntimeError("add_flame_pool after the app started serving: register pools at import time")
    extension = FlameExtension(app)
    router.lifespan_context = _Lifespan(extension, router.lifespan_context)
    build = app.build_middleware_stack

    def build_middleware_stack() -> ASGIApp:
        stack = build()
        if isinstance(stack, ServerErrorMiddleware):
            # Just inside the framework's outermost layer, where instrumentation that wraps
            # build_middleware_stack (OpenTelemetry's FastAPIInstrumentor, logfire) expects
            # to find ServerErrorMiddleware; still outside every user middleware.
            stack.app = _RunnerMode(stack.app, extension.pools)
            return stack
        return _RunnerMode(stack, extension.pools)

    # An instance attribute: Starlette builds the stack lazily through this method, so the
    # runner-mode layer wraps whatever the app (and any middleware added later) builds.
    app.build_middleware_stack = build_middleware_stack
    app.__dict__[_ATTR] = extension
    app.flame_pools = extension.pools
    return extension


def add_flame_pool(app: Any, name: str, **pool_options: Any) -> FlamePool:
    """Register pool ``name`` on ``app``; it starts and stops with the app.

    Works on a plain ``starlette.applications.Starlette``, a plain ``fastapi.FastAPI`` and
    ``flame_asgi.FastAPI``, composing with the app's own lifespan and startup/shutdown
    hooks; it also installs runner mode on the app. Any other ASGI app is wrapped first,
    ``app = FlameApp(app)``, and then takes pools the same way. See ``FlamePool`` for the
    options.
    """
    return install(app).add(name, pool_options)
