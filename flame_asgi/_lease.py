"""Placement of work on slots, and ``FlameRunner``: a lease on one runner slot.

Every call kind (call, cast, stream, child) asks a ``Placement`` for a slot and gives it
back when the work ends. The pool's placement takes any free slot in the pool; a
``FlameRunner``'s takes the slot it leased or, when that one is busy, another slot of the
same runner, so everything made through a lease runs on one runner. Leasing beats a pool
when calls share what a runner holds in memory: a model the first call loaded, a file
several steps work on.

A ``Dispatch`` adds to a placement the pool's way to start work on the slot it gives, so
that code outside the pool (``RemoteStream``) needs nothing else of the pool.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, overload

from flame_asgi._exceptions import CallTimeout, PoolClosed, RunnerLost
from flame_asgi._protocol import WorkKind

if TYPE_CHECKING:
    from flame_asgi._child import ChildHandle
    from flame_asgi._connection import RemoteCall
    from flame_asgi._map import MapIterator
    from flame_asgi._pool import FlamePool
    from flame_asgi._stream import RemoteStream
    from flame_asgi._telemetry import CallObserver

T = TypeVar("T")


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


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where work goes: ``checkout(tokens, wait)`` takes a slot, ``release(rid)`` returns it."""

    checkout: Callable[[list[str], float | None], Awaitable[str]]
    release: Callable[[str], None]


class StartWork(Protocol):
    """Sends work to slot ``rid`` of ``placement``; the RemoteCall then owns the slot."""

    async def __call__(self, rid: str, kind: WorkKind, payload: bytes, *, link: bool, progress: bool,
                       obs: CallObserver, tokens: list[str], placement: Placement,
                       track: bool = False) -> RemoteCall: ...


@dataclasses.dataclass(frozen=True)
class Dispatch:
    """Where work goes and how it starts there: ``checkout`` a slot, ``start`` the work on
    it, ``observe`` it for telemetry. The pool builds one for each stream it hands out."""

    placement: Placement
    send: StartWork
    observe: Callable[[WorkKind, Any], CallObserver]

    async def checkout(self, tokens: list[str], wait: float | None) -> str:
        return await self.placement.checkout(tokens, wait)

    async def start(self, rid: str, kind: WorkKind, payload: bytes, *, link: bool, progress: bool,
                    obs: CallObserver, tokens: list[str]) -> RemoteCall:
        return await self.send(rid, kind, payload, link=link, progress=progress, obs=obs, tokens=tokens,
                               placement=self.placement)


class FlameRunner:
    """A lease on one runner slot of a pool (``pool.runner()`` or ``Depends(flame_runner(name))``).

    ``call``, ``cast``, ``stream`` and ``place_child`` take the pool's signatures and all run
    on runner ``id``, concurrently when the runner has free slots (else they queue for the
    leased one). If the runner dies, they raise ``RunnerLost``. The runner's idle shutdown
    and ``single_use`` wait for the lease to end.
    """

    def __init__(self, pool: FlamePool, wait: float | None) -> None:
        self._pool = pool
        self._wait = wait
        self.id = ""
        self._spare = False  # the leased slot is free for the next call
        self._extra = 0  # further slots of the same runner, taken for concurrent calls
        self._queue: list[asyncio.Future[None]] = []
        self._open = False
        self._ended = False
        self._placement = Placement(self._checkout, self._release)

    async def __aenter__(self) -> FlameRunner:
        if self._open or self._ended:
            raise RuntimeError("a FlameRunner lease is entered once: use `async with pool.runner() as runner`")
        self.id = await self._pool._placement.checkout([], self._wait)
        self._open = self._spare = True
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """End the lease; work still running keeps its slot until it ends."""
        if not self._open:
            return
        self._open = False
        self._ended = True
        for fut in self._queue:
            if not fut.done():
                fut.set_result(None)
        if self._spare:
            self._spare = False
            self._pool._release(self.id)

    def __repr__(self) -> str:
        state = "open" if self._open else ("ended" if self._ended else "new")
        return f"<FlameRunner {self.id or '?'} of pool {self._pool.name!r} {state}>"

    # -- placement ----------------------------------------------------------------------
    async def _checkout(self, tokens: list[str], wait: float | None) -> str:
        deadline = None if wait is None else asyncio.get_running_loop().time() + wait
        while True:
            if not self._open:
                raise PoolClosed(f"the lease on runner {self.id or '?'} of pool {self._pool.name!r} has ended: "
                                 "make calls inside `async with pool.runner() as runner`")
            if self.id not in self._pool._runners:
                raise RunnerLost(f"leased runner {self.id} of pool {self._pool.name!r} is gone", runner_id=self.id)
            if self._spare:
                self._spare = False
                return self.id
            if self._pool._state.take_on(self.id):
                self._extra += 1
                return self.id
            fut = asyncio.get_running_loop().create_future()
            self._queue.append(fut)
            try:
                left = None if deadline is None else max(0.0, deadline - asyncio.get_running_loop().time())
                await asyncio.wait_for(asyncio.shield(fut), left)
            except TimeoutError:
                raise CallTimeout(f"no free slot on leased runner {self.id} within {wait:g} s "
                                  f"(max_concurrency={self._pool.max_concurrency})") from None
            finally:
                if fut in self._queue:
                    self._queue.remove(fut)

    def _release(self, rid: str) -> None:
        if self._extra:
            self._extra -= 1
            self._pool._release(rid)
        elif self._open:
            self._spare = True
        else:
            self._pool._release(rid)  # the lease ended while its slot was busy
        for fut in self._queue:
            if not fut.done():
                fut.set_result(None)
                break

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
        from flame_asgi import _telemetry

        pool = self._pool
        opts = CallOptions(pool.boot_timeout if timeout is None else timeout,
                           pool.timeout if timeout is None else timeout, link, on_progress, track_resources, 0)
        with _telemetry.observe_call(pool, "call", fn) as obs:
            return await pool._call(obs, fn, args, kwargs, opts, self._placement)

    def cast(self, fn: Callable[..., Any], *args: Any, link: bool = True, timeout: float | None = None,
             **kwargs: Any) -> None:
        """``pool.cast`` on the leased runner."""
        pool = self._pool
        opts = CallOptions(pool.boot_timeout if timeout is None else timeout, timeout, link, None, False, 0, "cast")
        pool._cast_on(self._placement, fn, args, kwargs, opts)

    def stream(self, fn: Callable[..., Any], *args: Any, timeout: float | None = None, link: bool = True,
               on_progress: Callable[[Any], Any] | None = None, **kwargs: Any) -> RemoteStream:
        """``pool.stream`` on the leased runner."""
        return self._pool._stream_on(self._placement, fn, args, kwargs, timeout, link, on_progress)

    async def place_child(self, fn: Callable[..., Any], *args: Any, link: bool = True,
                          on_progress: Callable[[Any], Any] | None = None, **kwargs: Any) -> ChildHandle:
        """``pool.place_child`` on the leased runner (the child holds a slot until it ends)."""
        return await self._pool._place_child_on(self._placement, fn, args, kwargs, link, on_progress)

    def map(self, fn: Callable[..., Any], iterable: Iterable[Any] | AsyncIterable[Any], *,
            timeout: float | None = None, ordered: bool = True, max_in_flight: int | None = None,
            return_exceptions: bool = False) -> MapIterator:
        """``pool.map`` on the leased runner (at most its ``max_concurrency`` at once)."""
        from flame_asgi._map import MapIterator

        run = functools.partial(self.call, timeout=timeout)
        limit = self._pool.max_concurrency if max_in_flight is None else max_in_flight
        return MapIterator(run, fn, iterable, ordered=ordered, max_in_flight=limit,
                           return_exceptions=return_exceptions)
