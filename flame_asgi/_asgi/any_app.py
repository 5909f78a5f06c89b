"""``FlameApp(app)``: FLAME on any ASGI application (Litestar, Quart, Django, a bare callable).

``add_flame_pool`` on a Starlette or FastAPI app reaches into its router and its middleware
builder (``extension``). Other frameworks have neither, so this layer sits outside the app,
at the one interface every ASGI app shares, and does the same two things there:

- **Lifespan.** On ``lifespan.startup`` the pools start, then the app gets its own
  startup and the server hears "complete" only once the app has answered; on
  ``lifespan.shutdown`` the app stops first, then the pools close. An app that does not
  speak lifespan (Django's ``ASGIHandler`` raises on any scope but ``http``) is noticed as
  uvicorn's ``--lifespan auto`` notices it, by raising before it answers startup: its
  pools still start and stop with the server.
- **Runner mode.** With ``FLAME_PARENT`` set, every HTTP and WebSocket request goes to the
  runner host (``/_flame``, 404 elsewhere) and the app never sees one; lifespan still
  reaches it, so its own startup has run on the runner before the first call arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from flame_asgi._asgi.extension import SCOPE_KEY, FlameExtension, adopt, async_library
from flame_asgi._base.parent import runner_mode
from flame_asgi._pool.pool import FlamePool
from flame_asgi._runner.host import runner_host

log = logging.getLogger("flame_asgi.app")


class FlameApp:
    """Wrap any ASGI ``app`` so pools start and stop with its lifespan and runners serve it.

        application = FlameApp(get_asgi_application())  # Django; or a Litestar or Quart app
        pool = application.add_flame_pool("work", backend=ProcessBackend(), max=4)

    Serve ``application`` (``uvicorn mysite.asgi:application``): it is what runners boot too,
    found by its import string as any pool's app is.
    """

    def __init__(self, app: ASGIApp) -> None:
        if not callable(app):
            raise TypeError(f"FlameApp wraps an ASGI application (a callable of scope, receive, send); got {app!r}")
        self.app = app
        self.extension: FlameExtension = adopt(self)
        self.flame_pools: dict[str, FlamePool] = self.extension.pools

    def add_flame_pool(self, name: str, **pool_options: Any) -> FlamePool:
        """Register a pool that starts and stops with this app; see ``FlamePool`` for options."""
        return self.extension.add(name, pool_options)

    def __repr__(self) -> str:
        return f"FlameApp({self.app!r})"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
        elif runner_mode():
            await runner_host()(scope, receive, send)
        else:
            scope.setdefault(SCOPE_KEY, self.flame_pools)  # for a FastAPI app mounted inside
            await self.app(scope, receive, send)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        if async_library() != "asyncio":
            # No pools to run (they refuse calls, saying why): the app's lifespan is its own.
            async with self.extension.running():
                await self.app(scope, receive, send)
            return
        message = await receive()
        if message["type"] != "lifespan.startup":
            raise RuntimeError(f"an ASGI lifespan begins with lifespan.startup, not {message['type']!r}")
        inner = _AppLifespan(self.app, scope, message)
        stack = contextlib.AsyncExitStack()
        try:
            await stack.enter_async_context(self.extension.running())
            await inner.startup()
        except BaseException as exc:
            with contextlib.suppress(Exception):
                await stack.aclose()
            await inner.abandon()
            if isinstance(exc, Exception):
                await send({"type": "lifespan.startup.failed", "message": str(exc)})
            raise  # as Starlette's router does: the server has been told, and the test client hears it
        await send({"type": "lifespan.startup.complete"})
        message = await receive()
        failure: BaseException | None = None
        try:
            try:
                await inner.shutdown(message)
            except Exception as exc:
                failure = exc
        finally:  # the pools close however the app's shutdown went, cancelled included
            try:
                await stack.aclose()
            except Exception as exc:
                failure = failure or exc
        if failure is not None:
            await send({"type": "lifespan.shutdown.failed", "message": str(failure)})
            raise failure
        await send({"type": "lifespan.shutdown.complete"})


class _AppFailed(RuntimeError):
    """The wrapped app answered ``lifespan.*.failed``: its message says why."""


class _AppLifespan:
    """The wrapped app's side of one lifespan, fed one message at a time from the server's."""

    def __init__(self, app: ASGIApp, scope: Scope, startup: Message) -> None:
        self._app = app
        self._scope = scope
        self._inbox: asyncio.Queue[Message] = asyncio.Queue()
        self._inbox.put_nowait(startup)
        self._answers: asyncio.Queue[Message] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def _send(self, message: Message) -> None:
        if not str(message.get("type", "")).startswith("lifespan."):
            raise RuntimeError(f"an ASGI app sent {message.get('type')!r} during its lifespan")
        await self._answers.put(message)

    async def _run(self) -> None:
        await self._app(self._scope, self._inbox.get, self._send)

    async def startup(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="flame_asgi: the app's lifespan")
        answer = await self._next()
        if answer is None:
            exc = self._task.exception()
            # What uvicorn's --lifespan auto concludes too: the app has no lifespan to run.
            log.info("flame_asgi: the app does not run an ASGI lifespan (%s); its pools start and stop with the "
                     "server all the same", f"it raised {exc!r}" if exc else "it returned without answering")
        elif answer["type"] != "lifespan.startup.complete":
            raise _AppFailed(answer.get("message") or "the app's startup failed")

    async def shutdown(self, message: Message) -> None:
        if self._task is None or self._task.done():
            return  # no lifespan, or one that has ended already
        await self._inbox.put(message)
        answer = await self._next()
        if answer is None:
            exc = self._task.exception()
            if exc is not None:
                raise _AppFailed(f"the app's shutdown raised {exc!r}")
        elif answer["type"] != "lifespan.shutdown.complete":
            await self.abandon()
            raise _AppFailed(answer.get("message") or "the app's shutdown failed")
        else:
            # Done: the app may return now, or wait on a receive() that will never answer.
            await asyncio.wait({self._task}, timeout=1.0)
            await self.abandon()

    async def _next(self) -> Message | None:
        """The app's next answer; ``None`` when its lifespan ended without one."""
        assert self._task is not None
        getting = asyncio.ensure_future(self._answers.get())
        try:
            await asyncio.wait({getting, self._task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not getting.done():
                getting.cancel()
        return getting.result() if getting.done() and not getting.cancelled() else None

    async def abandon(self) -> None:
        """Stop the app's lifespan coroutine, if it still runs, and collect its outcome."""
        task, self._task = self._task, None
        if task is None:
            return
        if not task.done():
            task.cancel()
        with contextlib.suppress(BaseException):
            await task
