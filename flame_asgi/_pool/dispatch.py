"""``Dispatch``: how one piece of work runs on a slot a placement gave.

Pickling it, its attempts and retries, its timeout, its result (tracked or not), a cast's
logging, and the start of streams and children. The pool and a lease both run work
through one ``Dispatch``, each with its own placement, so they run it the same way.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable
from typing import Any

from flame_asgi._base.exceptions import CallTimeout, FlameError, PoolClosed, RunnerLost
from flame_asgi._base.names import function_name
from flame_asgi._observe import telemetry
from flame_asgi._pool.child import ChildHandle
from flame_asgi._pool.config import CallOptions, PoolConfig
from flame_asgi._pool.placement import Placement
from flame_asgi._pool.runners import Runners
from flame_asgi._pool.slots import Slots
from flame_asgi._pool.stream import RemoteStream
from flame_asgi._wire.connection import RemoteCall
from flame_asgi._wire.payload import Payload
from flame_asgi._wire.pickling import dumps, loads
from flame_asgi._wire.protocol import CALL_WINDOW, WorkKind
from flame_asgi._wire.tracking import track
from flame_asgi._wire.transfer import forget

log = logging.getLogger("flame_asgi.pool")
RETRY_BACKOFF = 0.1  # a retry waits this long, doubling with each further attempt,
MAX_RETRY_BACKOFF = 2.0  # up to this: a replacement runner usually needs one boot
_RAISED_BY_FN = "_flame_raised_by_fn"  # marks an exception the remote function raised


class Dispatch:
    """Runs work on the slots of a placement, over the pool's runners."""

    def __init__(self, config: PoolConfig, runners: Runners, slots: Slots) -> None:
        self._config = config
        self._runners = runners
        self._slots = slots
        self._casts: dict[asyncio.Task[None], bool] = {}  # task -> link
        self._unlinked = 0  # link=False work still running remotely (closing waits for it)

    # -- calls --------------------------------------------------------------------------
    async def call(self, obs: telemetry.CallObserver, fn: Callable[..., Any], args: tuple[Any, ...],
                   kwargs: dict[str, Any], opts: CallOptions, placement: Placement,
                   pickled: tuple[Payload, list[str]] | None = None) -> Any:
        attempt = 0
        while True:
            try:
                return await self._attempt(obs, fn, args, kwargs, opts, placement, pickled)
            except RunnerLost as exc:
                pickled = None  # its Upload tokens were forgotten when the attempt ended
                # Only this call's own runner being lost is retried: a RunnerLost that the
                # function raised (from a call of its own) is the function's error.
                if attempt >= opts.retries or not self._runners.running or getattr(exc, _RAISED_BY_FN, False):
                    raise
                attempt += 1
                delay = min(RETRY_BACKOFF * 2 ** (attempt - 1), MAX_RETRY_BACKOFF)
                log.warning("pool %r: %s() lost its runner (%s); retry %d of %d in %.2f s", self._config.name,
                            function_name(fn), exc.reason or exc, attempt, opts.retries, delay)
                await asyncio.sleep(delay)

    async def _attempt(self, obs: telemetry.CallObserver, fn: Callable[..., Any], args: tuple[Any, ...],
                       kwargs: dict[str, Any], opts: CallOptions, placement: Placement,
                       pickled: tuple[Payload, list[str]] | None) -> Any:
        # Pickled per attempt: a retry's Uploads are registered anew (the lost attempt's
        # tokens were forgotten when it ended).
        if pickled is None:
            tokens: list[str] = []
            payload = dumps((fn, args, kwargs), f"the call to {function_name(fn)}()", tokens)
        else:
            payload, tokens = pickled
        rid = await placement.checkout(tokens, opts.wait)
        # Held until the result's resources are known.
        holding = self._runners.hold(rid) if opts.track_resources else None
        try:
            remote = await self.start(rid, opts.kind, payload, link=opts.link, progress=opts.on_progress is not None,
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
                            return track(loads, data, hub, lambda: self._runners.hold(rid))
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
                raise CallTimeout(f"{function_name(fn)}() did not finish within {opts.run:g} s; it was "
                                  "cancelled on the runner") from None
            raise
        finally:
            if not ended:
                remote.abandon(opts.link)

    # -- casts --------------------------------------------------------------------------
    def cast(self, placement: Placement, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
             opts: CallOptions) -> None:
        tokens: list[str] = []
        payload = dumps((fn, args, kwargs), f"the cast of {function_name(fn)}()", tokens)  # fails in the caller
        try:
            self._slots.ensure_running()
        except PoolClosed:
            forget(tokens)
            raise
        task = asyncio.get_running_loop().create_task(self._cast(fn, args, kwargs, opts, placement, (payload, tokens)))
        self._casts[task] = opts.link
        task.add_done_callback(self._casts.pop)

    async def _cast(self, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any], opts: CallOptions,
                    placement: Placement, pickled: tuple[Payload, list[str]]) -> None:
        obs = self.observe("cast", fn)
        try:
            await self.call(obs, fn, args, kwargs, opts, placement, pickled)
        except asyncio.CancelledError as exc:
            obs.end(exc)
            raise
        except Exception as exc:
            obs.end(exc)
            log.error("pool %r: cast of %s() failed: %s: %s", self._config.name, function_name(fn),
                      type(exc).__name__, str(exc) or "(no message)",
                      exc_info=exc if not isinstance(exc, FlameError) else None)
        else:
            obs.end()

    def cancel_linked_casts(self) -> None:
        for task, link in list(self._casts.items()):
            if link:
                task.cancel()

    @property
    def casts_running(self) -> int:
        return len(self._casts)

    async def drain_unlinked(self, timeout: float | None) -> None:
        """Wait up to ``timeout`` for ``link=False`` work and casts still running."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while (self._unlinked or any(not t.done() for t in self._casts)) and (
                deadline is None or loop.time() < deadline):
            await asyncio.sleep(0.05)

    # -- streams and children -----------------------------------------------------------
    def stream(self, placement: Placement, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
               timeout: float | None, link: bool, on_progress: Callable[[Any], Any] | None) -> RemoteStream:
        tokens: list[str] = []
        payload = dumps((fn, args, kwargs), f"the stream of {function_name(fn)}()", tokens)
        c = self._config
        return RemoteStream(self, placement, fn, payload, tokens, wait=c.boot_timeout if timeout is None else timeout,
                            per_item=c.timeout if timeout is None else timeout, link=link, on_progress=on_progress)

    async def place_child(self, placement: Placement, fn: Callable[..., Any], args: tuple[Any, ...],
                          kwargs: dict[str, Any], link: bool, on_progress: Callable[[Any], Any] | None) -> ChildHandle:
        tokens: list[str] = []
        payload = dumps((fn, args, kwargs), f"the child {function_name(fn)}()", tokens)
        obs = self.observe("child", fn)
        try:
            rid = await placement.checkout(tokens, self._config.boot_timeout)
            remote = await self.start(rid, "child", payload, link=link, progress=True, obs=obs, tokens=tokens,
                                      placement=placement)
        except BaseException as exc:
            obs.end(exc)
            raise
        return ChildHandle(rid, remote, link, on_progress, obs)

    # -- the start of any work ----------------------------------------------------------
    async def start(self, rid: str, kind: WorkKind, payload: Payload, *, link: bool, progress: bool,
                    obs: telemetry.CallObserver, tokens: list[str], placement: Placement,
                    track: bool = False) -> RemoteCall:
        """Send the work to slot ``rid`` of ``placement``; the RemoteCall then owns the slot
        and the Upload tokens."""
        obs.acquired(rid)
        runner = self._runners.get(rid)
        if runner is None:
            placement.release(rid)
            forget(tokens)
            raise RunnerLost(f"runner {rid} went away before the call started", runner_id=rid)
        if not link:
            self._unlinked += 1  # every path out of conn.start calls on_finish exactly once

        def finished() -> None:
            if not link:
                self._unlinked -= 1
            placement.release(rid)

        return await runner.conn.start(kind, payload, link=link, progress=progress, window=CALL_WINDOW,
                                       on_finish=finished, trace=obs.trace, tokens=tokens, track=track)

    def observe(self, kind: WorkKind, fn: Any) -> telemetry.CallObserver:
        return telemetry.observe_call(self._config.name, kind, fn)
