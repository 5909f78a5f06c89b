"""Remote code talking with its caller: ``report(event)`` sends progress back, and
``receive()`` takes the next message a placed child was sent (``handle.send``).

The runner sets the current work in the context of each piece of work; worker threads get
a copy of that context, so both find it from async code, sync code and generators.
"""

from __future__ import annotations

import contextvars
from collections.abc import Generator
from typing import Any, Protocol


class Reporter(Protocol):
    def report(self, event: Any) -> Sent: ...

    def receive(self, timeout: float | None) -> Any: ...


class Sent:
    """What ``report`` returns: awaiting it waits until the event has left for the caller.

    Ignoring it is fine (no "never awaited" warning): the event is sent in order anyway.
    Awaiting it is how async code applies back-pressure to itself.
    """

    __slots__ = ("_waiter",)

    def __init__(self, waiter: Any = None) -> None:
        self._waiter = waiter

    def __await__(self) -> Generator[Any, None, None]:
        if self._waiter is not None:
            yield from self._waiter.__await__()


_DONE = Sent()
current_reporter: contextvars.ContextVar[Reporter | None] = contextvars.ContextVar(
    "flame_reporter", default=None
)


def report(event: Any) -> Sent:
    """Send a progress event to whoever placed the current remote work.

    A no-op where there is no caller (outside a runner, or when nobody listens). In a
    sync function or generator running in a worker thread it blocks while the caller is
    behind (back-pressure); in async code it queues the event and returns an awaitable
    that completes once the event has been sent.
    """
    reporter = current_reporter.get()
    if reporter is None:
        return _DONE
    return reporter.report(event)


def receive(timeout: float | None = None) -> Any:
    """Take the next message sent to this child (``await handle.send(message)``), in order.

    In async code, ``await receive()``; in a sync function running in a worker thread,
    ``receive()`` blocks and returns the message. ``timeout`` (seconds) bounds the wait:
    past it ``TimeoutError`` is raised (``timeout=0`` polls). Messages go only to children
    placed with ``place_child``: elsewhere this raises ``RuntimeError``.
    """
    reporter = current_reporter.get()
    if reporter is None:
        raise RuntimeError("flame_asgi.receive() works only inside a child placed with pool.place_child(); "
                           "there is no caller here to receive from")
    return reporter.receive(timeout)
