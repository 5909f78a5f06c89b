"""``pool.place_child(...)``: a long-running task on a runner, and its handle.

The child holds a slot from placement until the runner reports it ended. Progress
events are buffered from placement on, so iterating the handle later still yields them
all, in order. With ``link=True`` the child is cancelled when the task that placed it
ends.
"""

from __future__ import annotations

import asyncio
import inspect
from collections import deque
from collections.abc import AsyncIterator, Callable, Generator
from typing import Any

from flame_asgi._base.exceptions import FlameError
from flame_asgi._observe import telemetry
from flame_asgi._wire.connection import RemoteCall
from flame_asgi._wire.pickling import dumps, loads

EVENT_BUFFER = 1024  # events held for a handle nobody iterates yet, before back-pressure applies


class ChildHandle:
    """Await it for the result; ``async for`` over it for progress events; ``await
    send(message)`` to steer it; ``cancel()`` it."""

    def __init__(self, rid: str, remote: RemoteCall, link: bool, on_progress: Callable[[Any], Any] | None,
                 obs: telemetry.CallObserver = telemetry.OFF) -> None:
        self.runner_id = rid
        self._obs = obs
        self._remote = remote
        self._on_progress = on_progress
        self._events: deque[Any] = deque()
        self._changed = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._ended = False
        self._cancel_requested = False
        loop = asyncio.get_running_loop()
        self._result: asyncio.Future[Any] = loop.create_future()
        self._result.add_done_callback(_mark_retrieved)
        self._pump = loop.create_task(self._run())
        caller = asyncio.current_task()
        if link and caller is not None:
            caller.add_done_callback(self._caller_done)

    async def _run(self) -> None:
        try:
            while True:
                await self._room.wait()
                type_, data = await self._remote.next()
                if type_ == "event":
                    event = loads(data, self._remote.hub)
                    self._events.append(event)
                    if len(self._events) >= EVENT_BUFFER:
                        self._room.clear()
                    self._changed.set()
                    if self._on_progress is not None:
                        result = self._on_progress(event)
                        if inspect.isawaitable(result):
                            await result
                elif type_ == "result":
                    self._result.set_result(loads(data, self._remote.hub))
                    return
                elif type_ == "cancelled":
                    self._result.cancel()
                    return
                else:
                    self._result.set_exception(self._remote.failure(type_, data))
                    return
        except asyncio.CancelledError:
            if not self._result.done():
                self._result.cancel()
            raise
        except BaseException as exc:
            if not self._result.done():
                self._result.set_exception(exc)
        finally:
            self._ended = True
            self._changed.set()
            self._obs.settle(self._result)

    def __await__(self) -> Generator[Any, None, Any]:
        return asyncio.shield(self._result).__await__()

    async def __aiter__(self) -> AsyncIterator[Any]:
        while True:
            if self._events:
                yield self._events.popleft()
                self._room.set()
                continue
            if self._ended:
                return
            self._changed.clear()
            await self._changed.wait()

    async def send(self, message: Any) -> None:
        """Send ``message`` (any picklable value) to the child, where ``flame_asgi.receive()``
        returns it; messages arrive in order. Waits while the child has not taken the last
        ``MESSAGE_WINDOW`` (16) messages yet (back-pressure). Raises ``FlameError`` once the
        child has ended."""
        if self._ended:
            raise FlameError(f"the child on runner {self.runner_id} has ended: it takes no more messages")
        tokens: list[str] = []
        data = dumps(message, "a message to the child", tokens)
        self._remote.tokens.extend(tokens)  # its Uploads are forgotten when the child ends
        await self._remote.send_message(data)

    def cancel(self) -> None:
        """Ask the runner to stop the child; its slot is freed once the runner has stopped it."""
        if not self._ended and not self._cancel_requested:
            # Once: a second request would cancel the child's own cleanup on the runner.
            self._cancel_requested = True
            self._remote.request_cancel()
            self._room.set()

    def done(self) -> bool:
        return self._ended

    def _caller_done(self, task: asyncio.Task[Any]) -> None:
        self.cancel()

    def __repr__(self) -> str:
        state = "ended" if self._ended else "running"
        return f"<ChildHandle runner={self.runner_id} {state} buffered={len(self._events)}>"


def _mark_retrieved(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()  # a child nobody awaits must not warn "exception never retrieved"
