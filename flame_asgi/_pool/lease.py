"""``FlameRunner``: a lease on one runner slot (``pool.runner()``, ``Depends(flame_runner(name))``).

Everything made through a lease runs on one runner: the slot it leased or, when that one
is busy, another slot of the same runner. Leasing beats a pool when calls share what a
runner holds in memory: a model the first call loaded, a file several steps work on.
A lease is a ``Placement`` of its own; it runs its work through the pool's ``Dispatch``.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable
from typing import Any, TypeVar, overload

from flame_asgi._base.exceptions import CallTimeout, PoolClosed, RunnerLost
from flame_asgi._observe import telemetry
from flame_asgi._pool.child import ChildHandle
from flame_asgi._pool.config import PoolConfig
from flame_asgi._pool.dispatch import Dispatch
from flame_asgi._pool.map import MapIterator
from flame_asgi._pool.slots import Slots
from flame_asgi._pool.stream import RemoteStream

T = TypeVar("T")


class LeasedSlots:
    """A lease's placement: the leased slot of runner ``id`` or, when that one is busy,
    another slot of the same runner; a caller queues when the runner is full."""

    def __init__(self, config: PoolConfig, slots: Slots) -> None:
        self._config = config
        self._slots = slots
        self.id = ""
        self._spare = False  # the leased slot is free for the next call
        self._extra = 0  # further slots of the same runner, taken for concurrent calls
        self._queue: list[asyncio.Future[None]] = []
        self.open = False
        self.ended = False

    async def lease(self, wait: float | None) -> str:
        if self.open or self.ended:
            raise RuntimeError("a FlameRunner lease is entered once: use `async with pool.runner() as runner`")
        self.id = await self._slots.checkout([], wait)
        self.open = self._spare = True
        return self.id

    def end(self) -> None:
        """End the lease; work still running keeps its slot until it ends."""
        if not self.open:
            return
        self.open = False
        self.ended = True
        for fut in self._queue:
            if not fut.done():
                fut.set_result(None)
        if self._spare:
            self._spare = False
            self._slots.release(self.id)

    async def checkout(self, tokens: list[str], wait: float | None) -> str:
        deadline = None if wait is None else asyncio.get_running_loop().time() + wait
        while True:
            if not self.open:
                raise PoolClosed(f"the lease on runner {self.id or '?'} of pool {self._config.name!r} has ended: "
                                 "make calls inside `async with pool.runner() as runner`")
            if not self._slots.has(self.id):
                raise RunnerLost(f"leased runner {self.id} of pool {self._config.name!r} is gone", runner_id=self.id)
            if self._spare:
                self._spare = False
                return self.id
            if self._slots.take_on(self.id):
                self._extra += 1
                return self.id
            fut = asyncio.get_running_loop().create_future()
            self._queue.append(fut)
            try:
                left = None if deadline is None else max(0.0, deadline - asyncio.get_running_loop().time())
                await asyncio.wait_for(asyncio.shield(fut), left)
            except TimeoutError:
                raise CallTimeout(f"no free slot on leased runner {self.id} within {wait:g} s "
                                  f"(max_concurrency={self._config.max_concurrency})") from None
            finally:
                if fut in self._queue:
                    self._queue.remove(fut)

    def release(self, rid: str) -> None:
        if self._extra:
            self._extra -= 1
            self._slots.release(rid)
        elif self.open:
            self._spare = True
        else:
            self._slots.release(rid)  # the lease ended while its slot was busy
        for fut in self._queue:
            if not fut.done():
                fut.set_result(None)
                break


class FlameRunner:
    """A lease on one runner slot of a pool (``pool.runner()`` or ``Depends(flame_runner(name))``).

    ``call``, ``cast``, ``stream`` and ``place_child`` take the pool's signatures and all run
    on runner ``id``, concurrently when the runner has free slots (else they queue for the
    leased one). If the runner dies, they raise ``RunnerLost``. The runner's idle shutdown
    and ``single_use`` wait for the lease to end.
    """

    def __init__(self, config: PoolConfig, slots: Slots, dispatch: Dispatch, wait: float | None) -> None:
        self._config = config
        self._dispatch = dispatch
        self._wait = wait
        self._placement = LeasedSlots(config, slots)

    @property
    def id(self) -> str:
        """The leased runner's id (``""`` before the lease begins)."""
        return self._placement.id

    async def __aenter__(self) -> FlameRunner:
        await self._placement.lease(self._wait)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """End the lease; work still running keeps its slot until it ends."""
        self._placement.end()

    def __repr__(self) -> str:
        p = self._placement
        state = "open" if p.open else ("ended" if p.ended else "new")
        return f"<FlameRunner {p.id or '?'} of pool {self._config.name!r} {state}>"

    # -- the calls ----------------------------------------------------------------------
    # A lease is one runner: if it dies there is no other to retry on, so no ``retries``.
    @overload
    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any, timeout: float | None = None,
                   link: bool = True, on_progress: Callable[[Any], Any] | None = None,
                   track_resources: bool = False, **kwargs: Any) -> T: ...

    @overload
    async def call(self, fn: Callable[..., T], *args: Any, timeout: float | None = None,
                   link: bool = True, on_progress: Callable[[Any], Any] | None = None,
                   track_resources: bool = False, **kwargs: Any) -> T: ...

    async def call(self, fn: Callable[..., Any], *args: Any, timeout: float | None = None, link: bool = True,
                   on_progress: Callable[[Any], Any] | None = None, track_resources: bool = False,
                   **kwargs: Any) -> Any:
        """``pool.call`` on the leased runner."""
        opts = self._config.call_options(timeout, link, on_progress, track_resources)
        with telemetry.observe_call(self._config.name, "call", fn) as obs:
            return await self._dispatch.call(obs, fn, args, kwargs, opts, self._placement)

    def cast(self, fn: Callable[..., Any], *args: Any, link: bool = True, timeout: float | None = None,
             **kwargs: Any) -> None:
        """``pool.cast`` on the leased runner."""
        opts = self._config.call_options(timeout, link, kind="cast", run_default=False)
        self._dispatch.cast(self._placement, fn, args, kwargs, opts)

    def stream(self, fn: Callable[..., Any], *args: Any, timeout: float | None = None, link: bool = True,
               on_progress: Callable[[Any], Any] | None = None, **kwargs: Any) -> RemoteStream:
        """``pool.stream`` on the leased runner."""
        return self._dispatch.stream(self._placement, fn, args, kwargs, timeout, link, on_progress)

    async def place_child(self, fn: Callable[..., Any], *args: Any, link: bool = True,
                          on_progress: Callable[[Any], Any] | None = None, **kwargs: Any) -> ChildHandle:
        """``pool.place_child`` on the leased runner (the child holds a slot until it ends)."""
        return await self._dispatch.place_child(self._placement, fn, args, kwargs, link, on_progress)

    def map(self, fn: Callable[..., Any], iterable: Iterable[Any] | AsyncIterable[Any], *,
            timeout: float | None = None, ordered: bool = True, max_in_flight: int | None = None,
            return_exceptions: bool = False) -> MapIterator:
        """``pool.map`` on the leased runner (at most its ``max_concurrency`` at once)."""
        run = functools.partial(self.call, timeout=timeout)
        limit = self._config.max_concurrency if max_in_flight is None else max_in_flight
        return MapIterator(run, fn, iterable, ordered=ordered, max_in_flight=limit,
                           return_exceptions=return_exceptions)
