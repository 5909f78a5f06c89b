"""How one piece of work runs: pickling it, its attempts and retries, its timeout, its
result (tracked or not), and a cast's logging.

``FlamePool`` inherits this part; its public methods (``call``, ``cast``, ``stream``,
``place_child``, ``map``) and ``FlameRunner``'s pass here with a ``Placement``, so a pool
and a lease run work the same way.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from flame_asgi import _telemetry
from flame_asgi._child import ChildHandle
from flame_asgi._exceptions import CallTimeout, FlameError, PoolClosed, RunnerLost
from flame_asgi._lease import CallOptions, Dispatch, Placement
from flame_asgi._options import check_retries
from flame_asgi._pickling import dumps, loads
from flame_asgi._stream import RemoteStream
from flame_asgi._tracking import track
from flame_asgi._transfer import forget

if TYPE_CHECKING:
    from flame_asgi._connection import RemoteCall
    from flame_asgi._pool import FlamePool
    from flame_asgi._pool_state import Decision, PoolState
    from flame_asgi._protocol import WorkKind

log = logging.getLogger("flame_asgi.pool")
RETRY_BACKOFF = 0.1  # a retry waits this long, doubling with each further attempt,
MAX_RETRY_BACKOFF = 2.0  # up to this: a replacement runner usually needs one boot
_RAISED_BY_FN = "_flame_raised_by_fn"  # marks an exception the remote function raised


class PoolCalls:
    """Running work, for ``FlamePool`` (which sets every attribute declared here)."""

    name: str
    boot_timeout: float | None
    timeout: float | None
    retries: int
    loop: asyncio.AbstractEventLoop
    _state: PoolState[asyncio.Future[str | None]]
    _running: bool
    _casts: dict[asyncio.Task[None], bool]

    if TYPE_CHECKING:  # defined by PoolSlots and PoolScaling; declared only for the type checker
        def _ensure_running(self) -> None: ...

        async def _start(self, rid: str, kind: WorkKind, payload: bytes, *, link: bool, progress: bool,
                         obs: _telemetry.CallObserver, tokens: list[str], placement: Placement,
                         track: bool = False) -> RemoteCall: ...

        def _apply(self, decision: Decision[asyncio.Future[str | None]]) -> None: ...

    async def _call(self, obs: _telemetry.CallObserver, fn: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any], opts: CallOptions, placement: Placement,
                    pickled: tuple[bytes, list[str]] | None = None) -> Any:
        attempt = 0
        while True:
            try:
                return await self._attempt(obs, fn, args, kwargs, opts, placement, pickled)
            except RunnerLost as exc:
                pickled = None  # its Upload tokens were forgotten when the attempt ended
                # Only this call's own runner being lost is retried: a RunnerLost that the
                # function raised (from a call of its own) is the function's error.
                if attempt >= opts.retries or not self._running or getattr(exc, _RAISED_BY_FN, False):
                    raise
                attempt += 1
                delay = min(RETRY_BACKOFF * 2 ** (attempt - 1), MAX_RETRY_BACKOFF)
                log.warning("pool %r: %s lost its runner (%s); retry %d of %d in %.2f s", self.name, _name(fn),
                            exc.reason or exc, attempt, opts.retries, delay)
                await asyncio.sleep(delay)

    async def _attempt(self, obs: _telemetry.CallObserver, fn: Callable[..., Any], args: tuple[Any, ...],
                       kwargs: dict[str, Any], opts: CallOptions, placement: Placement,
                       pickled: tuple[bytes, list[str]] | None) -> Any:
        # Pickled per attempt: a retry's Uploads are registered anew (the lost attempt's
        # tokens were forgotten when it ended).
        if pickled is None:
            tokens: list[str] = []
            payload = dumps((fn, args, kwargs), f"the call to {_name(fn)}", tokens)
        else:
            payload, tokens = pickled
        rid = await placement.checkout(tokens, opts.wait)
        holding = self._hold(rid) if opts.track_resources else None  # until the result's resources are known
        try:
            remote = await self._start(rid, opts.kind, payload, link=opts.link, progress=opts.on_progress is not None,
                                       obs=obs, tokens=tokens, placement=placement, track=opts.track_resources)
            return await self._await_result(remote, fn, opts, rid)
        finally:
            if holding is not None:
                holding()

    async def _await_result(self, remote: RemoteCall, fn: Any, opts: CallOptions, rid: str) -> Any:
        hub = remote.hub
        ended = False
        try:
            async with asyncio.timeout(opts.run) as scope:
                while True:
                    type_, data = await remote.next()
                    if type_ == "event":
                        assert opts.on_progress is not None
                        result = opts.on_progress(loads(data, hub))
                        if inspect.isawaitable(result):
                            await result
                    elif type_ == "result":
                        if opts.track_resources:
                            return track(loads, data, hub, functools.partial(self._hold, rid))
                        return loads(data, hub)
                    else:
                        failure = remote.failure(type_, data)
                        if type_ == "error":
                            setattr(failure, _RAISED_BY_FN, True)
                        raise failure
        except TimeoutError:
            if scope.expired():
                # FLAME: a call's timeout ends the work on the runner too, linked or not.
                ended = True
                remote.abandon(True)
                raise CallTimeout(_overran(fn, opts.run)) from None
            raise
        finally:
            if not ended:
                remote.abandon(opts.link)

    def _cast_on(self, placement: Placement, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                 opts: CallOptions) -> None:
        tokens: list[str] = []
        payload = dumps((fn, args, kwargs), f"the cast of {_name(fn)}", tokens)  # fails here, in the caller
        try:
            self._ensure_running()
        except PoolClosed:
            forget(tokens)
            raise
        loop = asyncio.get_running_loop()
        task = loop.create_task(self._cast(fn, args, kwargs, opts, placement, (payload, tokens)))
        self._casts[task] = opts.link
        task.add_done_callback(self._casts.pop)

    async def _cast(self, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any], opts: CallOptions,
                    placement: Placement, pickled: tuple[bytes, list[str]]) -> None:
        obs = self._observe("cast", fn)
        try:
            await self._call(obs, fn, args, kwargs, opts, placement, pickled)
        except asyncio.CancelledError as exc:
            obs.end(exc)
            raise
        except Exception as exc:
            obs.end(exc)
            log.error("pool %r: cast of %s failed: %s: %s", self.name, _name(fn), type(exc).__name__,
                      str(exc) or "(no message)", exc_info=exc if not isinstance(exc, FlameError) else None)
        else:
            obs.end()

    def _stream_on(self, placement: Placement, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                   timeout: float | None, link: bool, on_progress: Callable[[Any], Any] | None) -> RemoteStream:
        tokens: list[str] = []
        payload = dumps((fn, args, kwargs), f"the stream of {_name(fn)}", tokens)
        dispatch = Dispatch(placement, self._start, self._observe)
        return RemoteStream(dispatch, fn, payload, tokens, wait=self.boot_timeout if timeout is None else timeout,
                            per_item=self.timeout if timeout is None else timeout, link=link, on_progress=on_progress)

    async def _place_child_on(self, placement: Placement, fn: Callable[..., Any], args: tuple[Any, ...],
                              kwargs: dict[str, Any], link: bool,
                              on_progress: Callable[[Any], Any] | None) -> ChildHandle:
        tokens: list[str] = []
        payload = dumps((fn, args, kwargs), f"the child {_name(fn)}", tokens)
        obs = self._observe("child", fn)
        try:
            rid = await placement.checkout(tokens, self.boot_timeout)
            remote = await self._start(rid, "child", payload, link=link, progress=True, obs=obs, tokens=tokens,
                                       placement=placement)
        except BaseException as exc:
            obs.end(exc)
            raise
        return ChildHandle(rid, remote, link, on_progress, obs)

    def _observe(self, kind: WorkKind, fn: Any) -> _telemetry.CallObserver:
        return _telemetry.observe_call(cast("FlamePool", self), kind, fn)

    def _retries(self, retries: int | None) -> int:
        if retries is None:
            return self.retries
        check_retries(f"call on pool {self.name!r}", retries)
        return retries

    def _hold(self, rid: str) -> Callable[[], None]:
        """Keep runner ``rid`` up (past idle shutdown and single use) until the returned
        function is called, once."""
        if not self._state.hold(rid):
            return lambda: None
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                decision = self._state.unhold(rid, self.loop.time())
                if self._running:  # a closing pool stops every runner anyway
                    self._apply(decision)

        return release



def _name(fn: Any) -> str:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return f"{getattr(fn, '__qualname__', type(fn).__qualname__)}()"


def _overran(fn: Any, run: float | None) -> str:
    return f"{_name(fn)} did not finish within {run:g} s; it was cancelled on the runner"
