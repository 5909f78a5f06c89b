"""``pool.map(fn, items)``: ``fn(item)`` for every item, spread over the pool's runners.

At most ``max_in_flight`` calls run at once, counting results finished but not yet
consumed, so a slow consumer holds back the input instead of piling results up in memory,
and the input is read only as fast as room appears (it may be endless). The first
failure cancels every call still running, unless ``return_exceptions=True``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from typing import Any


class MapIterator:
    """``async for result in pool.map(...)``. Use ``async with pool.map(...) as results:``
    (or ``aclose()``) to cancel the calls still running when you stop early."""

    def __init__(self, call: Callable[..., Awaitable[Any]], fn: Callable[..., Any],
                 iterable: Iterable[Any] | AsyncIterable[Any], *, ordered: bool, max_in_flight: int,
                 return_exceptions: bool) -> None:
        if isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int) or max_in_flight < 1:
            raise ValueError(f"map: max_in_flight must be an int of at least 1 (got {max_in_flight!r})")
        if not isinstance(iterable, (Iterable, AsyncIterable)):
            raise TypeError(f"map: expected an iterable or async iterable of items (got {type(iterable).__name__})")
        self._results = _run(call, fn, iterable, ordered, max_in_flight, return_exceptions)

    def __aiter__(self) -> MapIterator:
        return self

    async def __anext__(self) -> Any:
        return await self._results.__anext__()

    async def aclose(self) -> None:
        """Stop: cancel the calls still running."""
        await self._results.aclose()

    async def __aenter__(self) -> MapIterator:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def _run(call: Callable[..., Awaitable[Any]], fn: Callable[..., Any],
               iterable: Iterable[Any] | AsyncIterable[Any], ordered: bool, limit: int,
               return_exceptions: bool) -> AsyncGenerator[Any, None]:
    items = _items(iterable)
    pending: dict[int, asyncio.Task[Any]] = {}  # input position -> its call, until consumed
    taken = head = 0  # items read so far; the next position to yield when ordered
    exhausted = False
    try:
        while True:
            while not exhausted and len(pending) < limit:
                try:
                    item = await anext(items)
                except StopAsyncIteration:
                    exhausted = True
                    break
                pending[taken] = asyncio.ensure_future(call(fn, item))
                taken += 1
            if not pending:
                return
            if ordered and pending[head].done():
                yield _outcome(pending.pop(head), return_exceptions)
                head += 1
                continue
            done, _ = await asyncio.wait(pending.values(), return_when=asyncio.FIRST_COMPLETED)
            if not return_exceptions:
                for task in done:
                    if not task.cancelled() and task.exception() is not None:
                        raise task.exception()  # type: ignore[misc]  # the finally cancels the rest
            if not ordered:
                for index in sorted(i for i, t in pending.items() if t in done):
                    yield _outcome(pending.pop(index), return_exceptions)
    finally:
        for task in pending.values():
            task.cancel()
        if pending:
            await asyncio.gather(*pending.values(), return_exceptions=True)
        closer = getattr(items, "aclose", None)
        if closer is not None:
            await closer()


def _outcome(task: asyncio.Task[Any], return_exceptions: bool) -> Any:
    if return_exceptions:
        if task.cancelled():
            return asyncio.CancelledError()
        exc = task.exception()
        if exc is not None:
            return exc
    return task.result()


async def _items(iterable: Iterable[Any] | AsyncIterable[Any]) -> AsyncIterator[Any]:
    if isinstance(iterable, AsyncIterable):
        async for item in iterable:
            yield item
    else:
        for item in iterable:
            yield item
