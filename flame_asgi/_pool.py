"""FlamePool: elastic runners between ``min`` and ``max``, and the calls placed on them.

Scaling decisions come from ``PoolState`` (plain synchronous code); this module does the
I/O they ask for: boots in the background, wakes queued callers, stops idle runners,
and runs each call over its runner's signed channel.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import inspect
import itertools
import logging
import os
import secrets
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, TypeVarTuple, overload

from flame_asgi import _telemetry
from flame_asgi._child import ChildHandle
from flame_asgi._connection import RemoteCall, RunnerConnection
from flame_asgi._exceptions import BootError, CallTimeout, FlameError, PoolClosed, RunnerLost, VersionSkew
from flame_asgi._lease import Dispatch, FlameRunner, Placement
from flame_asgi._options import check_options
from flame_asgi._parent import ParentInfo, code_version, parent_address, runner_mode
from flame_asgi._pickling import dumps, loads
from flame_asgi._pool_state import Decision, PoolState
from flame_asgi._protocol import WorkKind
from flame_asgi._secret import channel_secret
from flame_asgi._settings import MAX_PAYLOAD
from flame_asgi._stream import RemoteStream
from flame_asgi._transfer import forget
from flame_asgi.backends import Backend, RunnerHandle, RunnerSpec, backend_from_env

log = logging.getLogger("flame_asgi.pool")
Ts = TypeVarTuple("Ts")
T = TypeVar("T")
Hook = Callable[..., Any]
WINDOW = 32  # progress events / stream items in flight per call (back-pressure)
BOOT_RETRY_INTERVAL = 1.0
MAX_BOOT_BACKOFF = 30.0


@dataclasses.dataclass(frozen=True)
class RunnerInfo:
    """A booted runner: ``url`` is its base URL (``None`` for the local backend)."""

    id: str
    url: str | None
    active: int


@dataclasses.dataclass(frozen=True)
class PoolStats:
    """A pool's state in *this* process: ``pid`` tells server workers' pools apart."""

    runners: list[RunnerInfo]
    booting: int
    waiting: int
    pid: int = dataclasses.field(default_factory=os.getpid)


@dataclasses.dataclass
class _Runner:
    id: str
    handle: RunnerHandle
    conn: RunnerConnection


class FlamePool:
    """A pool of runners: copies of this app, booted on demand through a backend.

    Use it as ``async with FlamePool("name", ...) as pool`` or register it on an app with
    ``app.add_flame_pool("name", ...)``. Times are seconds; ``None`` means never.

    - ``backend``: where runners boot; ``None`` picks ``FLAME_BACKEND`` (default local).
    - ``min`` / ``max``: runners kept warm / never exceeded (booting ones count).
    - ``max_concurrency``: calls, streams and children one runner takes at once.
    - ``idle_shutdown_after``: a runner with no work this long stops; the ``min``
      runners use ``min_idle_shutdown_after`` (default: never).
    - ``boot_timeout``: how long a boot may take, and a queued caller's default wait.
    - ``timeout``: default run time of a call. ``shutdown_timeout``: how long closing
      waits for ``link=False`` work.
    - ``single_use``: each runner serves one call, then stops.
    - ``on_grow_start(meta)``, ``on_grow_end(error_or_None, meta)``, ``on_shrink(meta)``:
      hooks (sync or async) with ``meta`` = ``{"name", "count", "runner_id"[, "reason"]}``.
    """

    def __init__(
        self,
        name: str,
        *,
        backend: Backend | None = None,
        min: int = 0,
        max: int = 1,
        max_concurrency: int = 100,
        idle_shutdown_after: float | None = 30.0,
        min_idle_shutdown_after: float | None = None,
        boot_timeout: float | None = 30.0,
        timeout: float | None = 30.0,
        shutdown_timeout: float | None = 30.0,
        single_use: bool = False,
        on_grow_start: Hook | None = None,
        on_grow_end: Hook | None = None,
        on_shrink: Hook | None = None,
    ) -> None:
        check_options(name, dict(
            backend=backend, min=min, max=max, max_concurrency=max_concurrency,
            idle_shutdown_after=idle_shutdown_after, min_idle_shutdown_after=min_idle_shutdown_after,
            boot_timeout=boot_timeout, timeout=timeout, shutdown_timeout=shutdown_timeout, single_use=single_use,
            on_grow_start=on_grow_start, on_grow_end=on_grow_end, on_shrink=on_shrink))
        self.name = name
        self.backend = backend if backend is not None else backend_from_env()
        self.min = min
        self.max = max
        self.max_concurrency = max_concurrency
        self.idle_shutdown_after = idle_shutdown_after
        self.min_idle_shutdown_after = min_idle_shutdown_after
        self.boot_timeout = boot_timeout
        self.timeout = timeout
        self.shutdown_timeout = shutdown_timeout
        self.single_use = single_use
        self.on_grow_start = on_grow_start
        self.on_grow_end = on_grow_end
        self.on_shrink = on_shrink
        self.app: Any | None = None
        self._state: PoolState[asyncio.Future[str | None]] = PoolState(
            min=min, max=max, max_concurrency=max_concurrency, single_use=single_use)
        self._runners: dict[str, _Runner] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._boots: set[asyncio.Task[Any]] = set()
        self._casts: dict[asyncio.Task[None], bool] = {}  # task -> link
        self._unlinked = 0  # link=False calls still running remotely (closing waits for them)
        self._stopping: set[str] = set()
        self._ids = itertools.count(1)
        self._last_attempt = -BOOT_RETRY_INTERVAL
        self._boot_failures = 0
        self._running = False
        self._closed = False
        self._reaper: asyncio.Task[None] | None = None
        self._backend_started = False
        self._refused: str | None = None
        self._starting: asyncio.Task[None] | None = None  # a start on first use, under way
        self._placement = Placement(self._checkout_for, self._release)

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        """Boot the ``min`` runners (in parallel); fail if any of them cannot boot."""
        if self._running:
            return
        if self._closed:  # started again (a second app lifespan): begin from a clean slate
            self._closed = False
            self._state = PoolState(min=self.min, max=self.max, max_concurrency=self.max_concurrency,
                                    single_use=self.single_use)
        self.loop = asyncio.get_running_loop()
        self.backend.bind(self.name, self.app)
        self._backend_started = False
        if not runner_mode():
            # A runner's own pools start nothing (no fork server, no client) until they
            # boot something: most runners never call a pool.
            await self._start_backend()
        self._app_import = self.backend.app_import()
        self._version: str | None = None  # hashed when the first runner boots, off the event loop
        self._secret = channel_secret()
        self._max_payload = MAX_PAYLOAD.read()
        if runner_mode():
            self._state.min = 0  # a runner's own pools start empty: no chains of warm runners
        self._running = True
        _telemetry.pool_started(self)
        self._reaper = self.loop.create_task(self._reap_idle())
        count = self._state.min
        counts = []
        for _ in range(count):
            self._state.boot_started()
            counts.append(self._state.booting)
        results = await asyncio.gather(*(self._boot_runner(n) for n in counts))
        failures = [r for r in results if r is not None]
        if failures:
            await self.aclose()
            first = failures[0]
            raise BootError(f"pool {self.name!r} could not boot its {count} min runner(s): {first}",
                            reason=getattr(first, "reason", str(first))) from first

    async def __aenter__(self) -> FlamePool:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop taking work, let ``link=False`` work finish (``shutdown_timeout``), stop runners."""
        if self._closed:
            return
        self._closed = True
        self._running = False
        _telemetry.pool_stopped(self)
        if self._reaper is not None:
            self._reaper.cancel()
        for fut in list(self._state.waiters):
            if not fut.done():
                fut.set_result(None)  # woken with no runner: the caller raises PoolClosed
        self._state.waiters.clear()
        for task, link in list(self._casts.items()):
            if link:
                task.cancel()
        await self._drain_unlinked()
        for task in list(self._boots):
            task.cancel()
        # Stops already under way (idle, single use) finish; then every other runner stops.
        # A stop takes the backend's stop_timeout, plus a few seconds to close the channel
        # and reap the process: one that hangs past that keeps going without holding us.
        if self._tasks:
            _, late = await asyncio.wait(set(self._tasks), timeout=self.backend.stop_timeout + 5.0)
            if late:
                log.warning("pool %r: closing without waiting for %d stop(s) still under way", self.name,
                            len(late))
        await asyncio.gather(*(self._stop_runner(rid, "shutdown") for rid in list(self._runners)),
                             return_exceptions=True)
        if self._backend_started:
            await self.backend.aclose()

    async def _start_backend(self) -> None:
        if not self._backend_started:
            self._backend_started = True
            await self.backend.start()

    async def _drain_unlinked(self) -> None:
        deadline = None if self.shutdown_timeout is None else self.loop.time() + self.shutdown_timeout
        while (self._unlinked or any(not t.done() for t in self._casts)) and (
                deadline is None or self.loop.time() < deadline):
            await asyncio.sleep(0.05)

    def stats(self) -> PoolStats:
        runners = [RunnerInfo(r.id, r.handle.url, self._state.runners[r.id].active)
                   for r in self._runners.values() if r.id in self._state.runners]
        return PoolStats(runners=runners, booting=self._state.booting, waiting=len(self._state.waiters),
                         pid=os.getpid())

    def __repr__(self) -> str:
        s = self.stats() if self._running else None
        live = f" runners={len(s.runners)} booting={s.booting} waiting={s.waiting}" if s else ""
        state = "running" if self._running else ("closed" if self._closed else "new")
        return f"<FlamePool {self.name!r} {state} min={self.min} max={self.max} pid={os.getpid()}{live}>"

    def runner(self, *, timeout: float | None = None) -> FlameRunner:
        """Lease one runner slot: ``async with pool.runner() as runner:``; every call made
        through ``runner`` runs on that one runner. ``timeout`` bounds the wait for the slot
        (default ``boot_timeout``)."""
        return FlameRunner(self, self.boot_timeout if timeout is None else timeout)

    # -- the public calls ---------------------------------------------------------------
    # Two overloads, async first: with one union parameter mypy cannot tell whether T is
    # the coroutine or its result, and rejects every async function.
    @overload
    async def call(self, fn: Callable[[*Ts], Awaitable[T]], *args: *Ts, timeout: float | None = None,
                   link: bool = True, on_progress: Callable[[Any], Any] | None = None) -> T: ...

    @overload
    async def call(self, fn: Callable[[*Ts], T], *args: *Ts, timeout: float | None = None,
                   link: bool = True, on_progress: Callable[[Any], Any] | None = None) -> T: ...

    async def call(self, fn: Callable[[*Ts], Any], *args: *Ts,
                   timeout: float | None = None, link: bool = True,
                   on_progress: Callable[[Any], Any] | None = None) -> Any:
        """Run ``fn(*args)`` on a runner and return its result (see the module docs)."""
        with _telemetry.observe_call(self, "call", fn) as obs:
            return await self._call(obs, fn, args, timeout, link, on_progress, self._placement)

    async def _call(self, obs: _telemetry.CallObserver, fn: Callable[..., Any], args: tuple[Any, ...],
                    timeout: float | None, link: bool, on_progress: Callable[[Any], Any] | None,
                    placement: Placement) -> Any:
        tokens: list[str] = []
        payload = dumps((fn, args), f"the call to {_name(fn)}", tokens)
        rid = await placement.checkout(tokens, self.boot_timeout if timeout is None else timeout)
        run = self.timeout if timeout is None else timeout
        remote = await self._start(rid, "call", payload, link=link, progress=on_progress is not None, obs=obs,
                                   tokens=tokens, placement=placement)
        hub = remote.hub
        try:
            async with asyncio.timeout(run) as scope:
                while True:
                    type_, data = await remote.next()
                    if type_ == "event":
                        assert on_progress is not None
                        result = on_progress(loads(data, hub))
                        if inspect.isawaitable(result):
                            await result
                    elif type_ == "result":
                        return loads(data, hub)
                    else:
                        raise remote.failure(type_, data)
        except TimeoutError:
            if scope.expired():
                raise CallTimeout(_overran(fn, run, link)) from None
            raise
        finally:
            remote.abandon(link)

    def cast(self, fn: Callable[[*Ts], Any], *args: *Ts, link: bool = True) -> None:
        """Schedule ``fn(*args)`` on a runner and return at once; failures are logged."""
        self._cast_on(self._placement, fn, args, link)

    def _cast_on(self, placement: Placement, fn: Callable[..., Any], args: tuple[Any, ...], link: bool) -> None:
        tokens: list[str] = []
        payload = dumps((fn, args), f"the cast of {_name(fn)}", tokens)
        try:
            self._ensure_running()
        except PoolClosed:
            forget(tokens)
            raise
        loop = asyncio.get_running_loop()
        task = loop.create_task(self._cast(fn, payload, tokens, link, placement))
        self._casts[task] = link
        task.add_done_callback(self._casts.pop)

    async def _cast(self, fn: Any, payload: bytes, tokens: list[str], link: bool, placement: Placement) -> None:
        obs = _telemetry.observe_call(self, "cast", fn)
        try:
            rid = await placement.checkout(tokens, self.boot_timeout)
            remote = await self._start(rid, "cast", payload, link=link, progress=False, obs=obs, tokens=tokens,
                                       placement=placement)
            try:
                async with asyncio.timeout(self.timeout):
                    type_, data = await remote.next()
                    if type_ != "result":
                        raise remote.failure(type_, data)
            finally:
                remote.abandon(link)
        except asyncio.CancelledError as exc:
            obs.end(exc)
            raise
        except Exception as exc:
            obs.end(exc)
            log.error("pool %r: cast of %s failed: %s", self.name, _name(fn), exc,
                      exc_info=exc if not isinstance(exc, FlameError) else None)
        else:
            obs.end()

    def stream(self, fn: Callable[[*Ts], Any], *args: *Ts, timeout: float | None = None,
               link: bool = True, on_progress: Callable[[Any], Any] | None = None) -> RemoteStream:
        """Iterate (``async for``) over what generator ``fn(*args)`` yields on a runner;
        ``report(event)`` calls in it reach ``on_progress``, in order with the items."""
        return self._stream_on(self._placement, fn, args, timeout, link, on_progress)

    def _stream_on(self, placement: Placement, fn: Callable[..., Any], args: tuple[Any, ...],
                   timeout: float | None, link: bool, on_progress: Callable[[Any], Any] | None) -> RemoteStream:
        tokens: list[str] = []
        payload = dumps((fn, args), f"the stream of {_name(fn)}", tokens)
        dispatch = Dispatch(placement, self._start, functools.partial(_telemetry.observe_call, self))
        return RemoteStream(dispatch, fn, payload, tokens, wait=self.boot_timeout if timeout is None else timeout,
                            per_item=self.timeout if timeout is None else timeout, link=link, on_progress=on_progress)

    async def place_child(self, fn: Callable[[*Ts], Any], *args: *Ts, link: bool = True,
                          on_progress: Callable[[Any], Any] | None = None) -> ChildHandle:
        """Start long-running ``fn(*args)`` on a runner; it holds a slot until it ends."""
        return await self._place_child_on(self._placement, fn, args, link, on_progress)

    async def _place_child_on(self, placement: Placement, fn: Callable[..., Any], args: tuple[Any, ...],
                              link: bool, on_progress: Callable[[Any], Any] | None) -> ChildHandle:
        tokens: list[str] = []
        payload = dumps((fn, args), f"the child {_name(fn)}", tokens)
        obs = _telemetry.observe_call(self, "child", fn)
        try:
            rid = await placement.checkout(tokens, self.boot_timeout)
            remote = await self._start(rid, "child", payload, link=link, progress=True, obs=obs, tokens=tokens,
                                       placement=placement)
        except BaseException as exc:
            obs.end(exc)
            raise
        return ChildHandle(rid, remote, link, on_progress, obs)

    # -- slots --------------------------------------------------------------------------
    def refuse(self, reason: str) -> None:
        """Never start: every call raises PoolClosed with ``reason`` (an app on trio, say)."""
        self._refused = reason

    def _ensure_running(self) -> None:
        if self._refused is not None:
            raise PoolClosed(f"pool {self.name!r} cannot run: {self._refused}")
        if not self._running and not self._startable_on_use():
            state = "closed" if self._closed else "not started"
            raise PoolClosed(f"pool {self.name!r} is {state}: use `async with pool`, or register it "
                             "with add_flame_pool(app, ...) and run the app's lifespan")

    def _startable_on_use(self) -> bool:
        # A pool registered on an app whose lifespan never ran it: a mounted sub-app (Starlette
        # does not run their lifespans) or an app whose lifespan_context was replaced later.
        # Closed pools stay closed: their app has shut down.
        return self.app is not None and not self._closed and not self._running and self._refused is None

    async def _start_on_use(self) -> None:
        if self._starting is None:
            log.warning(
                "pool %r started on first use: the lifespan of its app did not start it (a mounted sub-app's "
                "lifespan does not run, or app.router.lifespan_context was replaced after add_flame_pool). "
                "Its runners stop when this process exits; to start and stop it with your server, register "
                "the pool on the top-level app, or run `async with pool:` in your own lifespan.", self.name)
            self._starting = asyncio.get_running_loop().create_task(self.start())
        try:
            await asyncio.shield(self._starting)
        finally:
            if self._starting is not None and self._starting.done():
                self._starting = None

    async def _checkout(self, wait: float | None) -> str:
        if self._startable_on_use():
            await self._start_on_use()
        self._ensure_running()
        if asyncio.get_running_loop() is not self.loop:
            # Its runners' channels live on the loop it started in: nothing on this one
            # would ever read their replies.
            gone = ", which has closed" if self.loop.is_closed() else ""
            raise PoolClosed(
                f"pool {self.name!r} was started in another event loop{gone}; a pool serves the loop it started "
                "in. With Starlette's TestClient, use `with TestClient(app) as client:` so the app's lifespan "
                "starts its pools in the loop that serves the requests.")
        fut: asyncio.Future[str | None] = self.loop.create_future()
        rid, decision = self._state.acquire(fut, self.loop.time())
        self._apply(decision)
        if rid is not None:
            return rid
        try:
            await asyncio.wait({fut}, timeout=wait)
        except asyncio.CancelledError:
            self._state.forget_waiter(fut)
            if fut.done() and fut.exception() is None and fut.result() is not None:
                self._release(fut.result())  # type: ignore[arg-type]
            fut.cancel()
            raise
        if fut.done():
            granted = fut.result()
            if granted is None:
                raise PoolClosed(f"pool {self.name!r} closed while the call was waiting for a runner")
            return granted
        self._state.forget_waiter(fut)
        fut.cancel()
        error = self._state.last_boot_error
        if error is not None:
            raise BootError(f"pool {self.name!r}: no runner within {wait:g} s because booting failed: "
                            f"{error}", reason=getattr(error, "reason", str(error))) from error
        s = self.stats()
        raise CallTimeout(
            f"pool {self.name!r}: no free runner slot within {wait:g} s ({len(s.runners)} runners "
            f"busy, {s.booting} booting, max={self.max}, max_concurrency={self.max_concurrency}); "
            "raise the timeout, max or max_concurrency")

    async def _checkout_for(self, tokens: list[str], wait: float | None) -> str:
        """``_checkout``; if no slot comes, the call's Uploads will never be pulled: forget them."""
        try:
            return await self._checkout(wait)
        except BaseException:
            forget(tokens)
            raise

    async def _start(self, rid: str, kind: WorkKind, payload: bytes, *, link: bool, progress: bool,
                     obs: _telemetry.CallObserver, tokens: list[str], placement: Placement) -> RemoteCall:
        """Send the work to its runner; the RemoteCall then owns the slot and the Upload tokens."""
        obs.acquired(rid)
        runner = self._runners.get(rid)
        if runner is None:
            placement.release(rid)
            forget(tokens)
            raise RunnerLost(f"runner {rid} went away before the call started", runner_id=rid)
        if not link:
            self._unlinked += 1  # every path out of conn.start calls on_finish exactly once
        return await runner.conn.start(kind, payload, link=link, progress=progress, window=WINDOW,
                                       on_finish=functools.partial(self._finished, rid, link, placement),
                                       trace=obs.trace, tokens=tokens)

    def _finished(self, rid: str, link: bool, placement: Placement) -> None:
        if not link:
            self._unlinked -= 1
        placement.release(rid)

    def _release(self, rid: str) -> None:
        self._apply(self._state.release(rid, self.loop.time()))

    # -- scaling ------------------------------------------------------------------------
    def _apply(self, decision: Decision[asyncio.Future[str | None]]) -> None:
        for _ in range(decision.boot):
            self._state.boot_started()
            boot = self._spawn(self._boot_runner(len(self._runners) + self._state.booting))
            self._boots.add(boot)
            boot.add_done_callback(self._boots.discard)
        for fut, rid in decision.grants:
            if fut.done():  # that caller gave up meanwhile: pass the slot on
                self._release(rid)
            else:
                fut.set_result(rid)
        for rid in decision.stop:
            self._spawn(self._stop_runner(rid, "single_use" if self.single_use else "recycled"))

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = self.loop.create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _boot_runner(self, count: int) -> BootError | None:
        """Boot one runner; ``count`` is the pool's size including it, for the hooks."""
        # Failed boots are retried at most once a second, backing off to once every 30 s
        # while they keep failing (a missing image does not appear by itself).
        backoff = min(MAX_BOOT_BACKOFF, BOOT_RETRY_INTERVAL * 2 ** max(0, self._boot_failures - 1))
        delay = self._last_attempt + backoff - self.loop.time()
        if self._state.last_boot_error is not None and delay > 0:
            await asyncio.sleep(delay)
        self._last_attempt = self.loop.time()
        rid = f"{self.name}-{next(self._ids)}-{secrets.token_hex(3)}"
        meta = {"name": self.name, "count": count, "runner_id": rid}
        began = _telemetry.boot_started(self, rid, count)
        stage = ["the backend was still starting it"]  # what the boot was waiting for, for the error
        scope: asyncio.Timeout | None = None  # a hook may raise TimeoutError before it exists
        try:
            await _call_hook(self.on_grow_start, meta)
            async with asyncio.timeout(self.boot_timeout) as scope:
                runner = await self._start_runner(rid, stage)
        except BaseException as exc:
            error = exc
            if isinstance(exc, TimeoutError) and scope is not None and scope.expired():
                error = BootError(f"runner {rid} did not come up within boot_timeout={self.boot_timeout:g} s: "
                                  f"{stage[-1]}", reason="boot timeout")
            elif not isinstance(exc, (BootError, asyncio.CancelledError)):
                error = BootError(f"booting runner {rid} failed: {exc!r}", reason=repr(exc))
            decision = self._state.boot_failed(error)
            self._boot_failures += 1
            _telemetry.boot_ended(self, rid, began, error, len(self._runners) + self._state.booting)
            if isinstance(exc, asyncio.CancelledError):
                raise
            log.warning("pool %r: %s", self.name, error)
            meta = {**meta, "count": len(self._runners) + self._state.booting}
            await _call_hook(self.on_grow_end, error, meta, swallow=True)
            if isinstance(error, VersionSkew):
                # Retrying cannot fix different code: every waiting caller gets the reason now.
                self._fail_waiters(error)
            elif self._running:
                self._apply(decision)
            assert isinstance(error, BootError)  # everything but cancellation became one above
            return error
        self._runners[rid] = runner
        self._boot_failures = 0
        decision = self._state.boot_succeeded(rid, self.loop.time())
        _telemetry.boot_ended(self, rid, began, None, len(self._runners) + self._state.booting)
        self._apply(decision)
        await _call_hook(self.on_grow_end, None, {**meta, "count": len(self._runners) + self._state.booting},
                         swallow=True)
        return None

    def _fail_waiters(self, error: BaseException) -> None:
        waiters = list(self._state.waiters)
        self._state.waiters.clear()
        for fut in waiters:
            if not fut.done():
                fut.set_exception(error)

    async def _start_runner(self, rid: str, stage: list[str]) -> _Runner:
        if self._version is None:
            # Hashing the app's source reads files: never on the event loop, never before a boot.
            self._version = await asyncio.to_thread(code_version, self._app_import or "")
        info = ParentInfo(
            pool=self.name, runner_id=rid, parent_address=parent_address(), backend=self.backend.name,
            code_version=self._version, app=self._app_import or "",
            failsafe_timeout=(self.boot_timeout or 60.0) + 10.0,
            heartbeat_interval=self.backend.heartbeat_interval,
            heartbeat_timeout=self.backend.heartbeat_timeout,
            shutdown_timeout=self.shutdown_timeout, max_payload=self._max_payload,
        )
        spec = RunnerSpec(pool=self.name, runner_id=rid, info=info, app=self._app_import,
                          boot_timeout=self.boot_timeout, secret=self._secret)
        started = self.loop.time()
        await self._start_backend()
        handle = await self.backend.boot(spec)
        stage.append(f"it was started, but the parent could not open its channel at {handle.url} (is that "
                     "address reachable from the parent, and is the app serving there?)" if handle.url else
                     "it was started, but its channel did not open")
        try:
            # What boot() used is gone: connect gets the rest, so the backend can say why
            # it timed out before the pool's own deadline does.
            left = None if self.boot_timeout is None else max(0.1, self.boot_timeout - (self.loop.time() - started))
            channel = await handle.connect(left)
            stage.append("its channel opened, but it did not answer the handshake")
            conn = RunnerConnection(
                rid, channel, self._secret.encode(), max_payload=self._max_payload,
                heartbeat_interval=self.backend.heartbeat_interval,
                heartbeat_timeout=self.backend.heartbeat_timeout,
                describe_loss=handle.exit_reason,
                on_lost=functools.partial(self._runner_lost, rid),
                on_recycle=functools.partial(self._recycle, rid),
                on_closing=functools.partial(self._runner_closing, rid),
            )
            await conn.handshake(self._version)
        except BaseException:
            await asyncio.shield(handle.stop(1.0))
            raise
        return _Runner(rid, handle, conn)

    def _runner_closing(self, rid: str) -> None:
        # Its channel is gone: place nothing more on it while the backend says how it ended.
        self._state.fence(rid)

    def _runner_lost(self, rid: str, reason: str, label: str) -> None:
        runner = self._runners.pop(rid, None)
        if runner is None:
            return
        log.warning("pool %r: runner %s lost: %s", self.name, rid, reason)
        self._apply(self._state.remove(rid))
        _telemetry.runner_stopped(self, rid, f"lost: {reason}", len(self._runners), label)
        self._spawn(runner.handle.stop(1.0))
        self._spawn(_call_hook(self.on_shrink, {"name": self.name, "count": len(self._runners),
                                                "runner_id": rid, "reason": f"lost: {reason}"}, swallow=True))

    def _recycle(self, rid: str, reason: str) -> None:
        log.warning("pool %r: recycling runner %s: %s", self.name, rid, reason)
        self._apply(self._state.retire(rid))

    async def _stop_runner(self, rid: str, reason: str) -> None:
        runner = self._runners.get(rid)
        if runner is None or rid in self._stopping:
            return
        self._stopping.add(rid)
        # Shielded: a stop that has begun completes (and reaps the process) even if the
        # task awaiting it is cancelled.
        await asyncio.shield(self._finish_stop(rid, runner, reason))

    async def _finish_stop(self, rid: str, runner: _Runner, reason: str) -> None:
        try:
            await runner.conn.aclose(reason)
            await runner.handle.stop(self.backend.stop_timeout)
        finally:
            # Removed only once stopped: a runner on its way out still counts against max.
            self._runners.pop(rid, None)
            self._stopping.discard(rid)
            decision = self._state.remove(rid)
            if self._running:
                self._apply(decision)
            _telemetry.runner_stopped(self, rid, reason, len(self._runners))
            await _call_hook(self.on_shrink, {"name": self.name, "count": len(self._runners),
                                              "runner_id": rid, "reason": reason}, swallow=True)

    async def _reap_idle(self) -> None:
        thresholds = [t for t in (self.idle_shutdown_after, self.min_idle_shutdown_after) if t is not None]
        tick = max(0.02, min(1.0, min(thresholds) / 5)) if thresholds else 1.0
        while True:
            await asyncio.sleep(tick)
            for rid in self._state.idle_runners(self.loop.time(), self.idle_shutdown_after,
                                                self.min_idle_shutdown_after):
                self._spawn(self._stop_runner(rid, "idle"))


async def _call_hook(hook: Hook | None, *args: Any, swallow: bool = False) -> None:
    if hook is None:
        return
    try:
        result = hook(*args)
        if inspect.isawaitable(result):
            await result
    except Exception:
        if not swallow:
            raise
        log.exception("flame_asgi hook %r raised", hook)


def _name(fn: Any) -> str:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return f"{getattr(fn, '__qualname__', type(fn).__qualname__)}()"


def _overran(fn: Any, run: float | None, link: bool) -> str:
    fate = "the remote work was cancelled" if link else "it keeps running on the runner (link=False)"
    return f"{_name(fn)} did not finish within {run:g} s; {fate}"

