"""``Runners``: a pool's runners and their lives, and the one owner of its ``PoolState``.

It boots runners (with retry and backoff), opens their channels, stops the ones that are
idle, spent, recycled or lost, calls the hooks, and is the only code that asks
``PoolState`` for a decision and carries it out: slots and dispatch ask it, never the
state. A queued caller is a future that ``apply`` resolves with a runner id (``None``:
the pool closed).
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
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from flame_asgi._base.exceptions import BootError, VersionSkew
from flame_asgi._base.parent import ParentInfo, code_version, parent_address, runner_mode
from flame_asgi._base.secret import channel_secret
from flame_asgi._base.settings import MAX_PAYLOAD
from flame_asgi._base.ticks import on_grid
from flame_asgi._observe import telemetry
from flame_asgi._pool.config import Hook, PoolConfig
from flame_asgi._pool.standby import Standby
from flame_asgi._pool.state import Decision, PoolState
from flame_asgi._wire.connection import RunnerConnection
from flame_asgi._wire.pickling import dumps, loads
from flame_asgi.backends import RunnerHandle, RunnerSpec

log = logging.getLogger("flame_asgi.pool")
BOOT_RETRY_INTERVAL = 1.0
MAX_BOOT_BACKOFF = 30.0
PREDICATE_TIMEOUT = 5.0  # for an idle_shutdown_after predicate's answer
Waiter = asyncio.Future[str | None]


@dataclasses.dataclass
class Runner:
    """A booted runner: its backend handle and its channel."""

    id: str
    handle: RunnerHandle
    conn: RunnerConnection


@dataclasses.dataclass(frozen=True)
class RunnerInfo:
    """A booted runner: ``url`` is its base URL (``None`` for the local backend); ``active``
    counts its calls, open streams and placed children."""

    id: str
    url: str | None
    active: int
    stopping: bool = False  # leaving the pool (idle, spent, recycled, shutting down): takes no new work
    warm: bool = False  # a spare the pool keeps booted while it is busy (``warm=``): idle, ready for a call


@dataclasses.dataclass(frozen=True)
class PoolStats:
    """A pool's state in *this* process: ``pid`` tells server workers' pools apart."""

    runners: list[RunnerInfo]
    booting: int
    waiting: int
    pid: int = dataclasses.field(default_factory=os.getpid)
    standby: int = 0  # runners the backend holds prepared (created, not started) for the next boots

    @property
    def warm(self) -> int:
        """How many runners are warm spares (``RunnerInfo.warm``)."""
        return sum(1 for r in self.runners if r.warm)


class Runners:
    """The runners of one pool, from boot to stop."""

    def __init__(self, config: PoolConfig) -> None:
        self.config = config
        self.backend = config.backend
        self.running = False
        self.closed = False
        self._state = self._fresh_state()
        self._runners: dict[str, Runner] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._boots: set[asyncio.Task[Any]] = set()
        self._stopping: set[str] = set()
        self._ids = itertools.count(1)
        self._last_attempt = -BOOT_RETRY_INTERVAL
        self._boot_failures = 0
        self._reaper: asyncio.Task[None] | None = None
        self._backend_started = False
        self._version: str | None = None
        self._app_import: str | None = None
        self._secret = ""
        self._max_payload = 0
        self.standby = Standby(config.name, self.backend)

    def _fresh_state(self) -> PoolState[Waiter]:
        c = self.config
        # A runner's own pools start empty: no chains of warm runners.
        return PoolState(min=0 if runner_mode() else c.min, max=c.max, max_concurrency=c.max_concurrency,
                         warm=0 if runner_mode() else c.warm, warm_for=c.idle_after,
                         single_use=c.single_use)

    # -- lifecycle ----------------------------------------------------------------------
    async def open(self, app: Any) -> list[BootError]:
        """Start the backend and boot the ``min`` runners in parallel; their boot errors."""
        if self.closed:  # started again (a second app lifespan): begin from a clean slate
            self.closed = False
            self._state = self._fresh_state()
        self.loop = asyncio.get_running_loop()
        self.backend.bind(self.config.name, app)
        self._backend_started = False
        if not runner_mode():
            # A runner's own pools start nothing (no fork server, no client) until they
            # boot something: most runners never call a pool.
            await self._start_backend()
        self._app_import = self.backend.app_import()
        self._version = None  # hashed when the first runner boots, off the event loop
        self._secret = channel_secret()
        self._max_payload = MAX_PAYLOAD.read()
        self.running = True
        self._reaper = self.loop.create_task(self._reap_idle())
        self._top_up()
        counts = []
        for _ in range(self._state.min):
            self._state.boot_started()
            counts.append(self._state.booting)
        results = await asyncio.gather(*(self._boot_runner(n, "min") for n in counts))
        return [r for r in results if r is not None]

    def closing(self) -> None:
        """Take no more work: queued callers wake with no runner (they raise PoolClosed)."""
        self.closed = True
        self.running = False
        self.standby.clear()
        if self._reaper is not None:
            self._reaper.cancel()
        for fut in self._state.take_waiters():
            if not fut.done():
                fut.set_result(None)

    async def close(self) -> None:
        """Stop every runner (after ``closing``), then the backend."""
        for task in list(self._boots):
            task.cancel()
        # Stops already under way (idle, single use) finish; then every other runner stops.
        # A stop takes the backend's stop_timeout, plus a few seconds to close the channel
        # and reap the process: one that hangs past that keeps going without holding us.
        if self._tasks:
            _, late = await asyncio.wait(set(self._tasks), timeout=self.backend.stop_timeout + 5.0)
            if late:
                log.warning("pool %r: closing without waiting for %d stop(s) still under way", self.config.name,
                            len(late))
        await asyncio.gather(*(self.stop(rid, "shutdown") for rid in list(self._runners)), return_exceptions=True)
        if self._backend_started:
            await self.backend.aclose()

    async def _start_backend(self) -> None:
        if not self._backend_started:
            self._backend_started = True
            await self.backend.start()

    # -- what slots and dispatch ask ----------------------------------------------------
    def get(self, rid: str) -> Runner | None:
        return self._runners.get(rid)

    def __contains__(self, rid: object) -> bool:
        return rid in self._runners

    def __iter__(self) -> Iterator[Runner]:
        return iter(list(self._runners.values()))

    @property
    def last_boot_error(self) -> BaseException | None:
        return self._state.last_boot_error

    def acquire(self, waiter: Waiter) -> str | None:
        """A slot on the least-loaded runner, or ``None`` with ``waiter`` queued (booting if needed)."""
        rid, decision = self._state.acquire(waiter, self.loop.time())
        self.apply(decision)
        return rid

    def forget_waiter(self, waiter: Waiter) -> None:
        self._state.forget_waiter(waiter)

    def take_on(self, rid: str) -> bool:
        """One more slot on runner ``rid`` (a lease's concurrent call), if it has room."""
        return self._state.take_on(rid)

    def release(self, rid: str) -> None:
        self.apply(self._state.release(rid, self.loop.time()))

    def hold(self, rid: str) -> Callable[[], None]:
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
                if self.running:  # a closing pool stops every runner anyway
                    self.apply(decision)

        return release

    def stats(self) -> PoolStats:
        slots = self._state.runners
        # The warm spares are the idle runners reaping would keep: the most recently busy.
        idle = sorted((s for s in slots.values() if not s.retired and s.active == 0 and s.holds == 0),
                      key=lambda s: -(s.idle_since or 0.0))
        warm = {s.id for s in idle[: self._state.warm_spares_at(self.loop.time())]} if self.running else set()
        runners = [RunnerInfo(r.id, r.handle.url, slots[r.id].active, r.id in self._stopping, r.id in warm)
                   for r in self._runners.values() if r.id in slots]
        return PoolStats(runners=runners, booting=self._state.booting, waiting=self._state.waiting,
                         pid=os.getpid(), standby=len(self.standby))

    # -- decisions ----------------------------------------------------------------------
    def apply(self, decision: Decision[Waiter]) -> None:
        for n in range(decision.boot):
            self._state.boot_started()
            why = "warm" if n >= decision.boot - decision.warm else "demand"
            boot = self._spawn(self._boot_runner(len(self._runners) + self._state.booting, why))
            self._boots.add(boot)
            boot.add_done_callback(self._boots.discard)
        for fut, rid in decision.grants:
            if fut.done():  # that caller gave up meanwhile: pass the slot on
                self.release(rid)
            else:
                fut.set_result(rid)
        for rid in decision.stop:
            self._spawn(self.stop(rid, "single_use" if self.config.single_use else "recycled"))

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = self.loop.create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- boot ---------------------------------------------------------------------------
    async def _boot_runner(self, count: int, why: str) -> BootError | None:
        """Boot one runner; ``count`` is the pool's size including it, for the hooks; ``why``
        is ``min``, ``demand`` (a caller waits) or ``warm`` (a spare), for the events."""
        c = self.config
        # Failed boots are retried at most once a second, backing off to once every 30 s
        # while they keep failing (a missing image does not appear by itself).
        backoff = min(MAX_BOOT_BACKOFF, BOOT_RETRY_INTERVAL * 2 ** max(0, self._boot_failures - 1))
        delay = self._last_attempt + backoff - self.loop.time()
        if self._state.last_boot_error is not None and delay > 0:
            await asyncio.sleep(delay)
        self._last_attempt = self.loop.time()
        prepared = self.standby.take()
        rid = prepared.runner_id if prepared is not None else self._new_id()
        self._top_up()
        meta = {"name": c.name, "count": count, "runner_id": rid}
        began = telemetry.boot_started(c.name, self.backend.name, rid, count, why, prepared is not None)
        stage = ["the backend was still starting it"]  # what the boot was waiting for, for the error
        scope: asyncio.Timeout | None = None  # a hook may raise TimeoutError before it exists
        try:
            await _call_hook(c.on_grow_start, meta)
            async with asyncio.timeout(c.boot_timeout) as scope:
                runner = await self._start_runner(prepared or await self._spec(rid), stage)
        except BaseException as exc:
            error = exc
            if isinstance(exc, TimeoutError) and scope is not None and scope.expired():
                error = BootError(f"runner {rid} did not come up within boot_timeout={c.boot_timeout:g} s: "
                                  f"{stage[-1]}", reason="boot timeout")
            elif not isinstance(exc, (BootError, asyncio.CancelledError)):
                error = BootError(f"booting runner {rid} failed: {exc!r}", reason=repr(exc))
            decision = self._state.boot_failed(error)
            self._boot_failures += 1
            telemetry.boot_ended(c.name, self.backend.name, rid, began, error, self._size())
            if isinstance(exc, asyncio.CancelledError):
                raise
            log.warning("pool %r: %s", c.name, error)
            await _call_hook(c.on_grow_end, error, {**meta, "count": self._size()}, swallow=True)
            if isinstance(error, VersionSkew):
                # Retrying cannot fix different code: every waiting caller gets the reason now.
                for fut in self._state.take_waiters():
                    if not fut.done():
                        fut.set_exception(error)
            elif self.running:
                self.apply(decision)
            assert isinstance(error, BootError)  # everything but cancellation became one above
            return error
        self._runners[rid] = runner
        self._boot_failures = 0
        decision = self._state.boot_succeeded(rid, self.loop.time())
        telemetry.boot_ended(c.name, self.backend.name, rid, began, None, self._size())
        self.apply(decision)
        await _call_hook(c.on_grow_end, None, {**meta, "count": self._size()}, swallow=True)
        return None

    def _size(self) -> int:
        return len(self._runners) + self._state.booting

    def _new_id(self) -> str:
        return f"{self.config.name}-{next(self._ids)}-{secrets.token_hex(3)}"

    def _top_up(self) -> None:
        if self.running and not runner_mode():  # a runner's own pools prepare nothing
            self.standby.top_up(lambda: self._spec(self._new_id()), self._spawn)

    async def _spec(self, rid: str) -> RunnerSpec:
        """What the backend needs to boot runner ``rid``: its identity, keys and settings."""
        c = self.config
        if self._version is None:
            # Hashing the app's source reads files: never on the event loop, and only once needed.
            self._version = await asyncio.to_thread(code_version, self._app_import or "")
        info = ParentInfo(
            pool=c.name, runner_id=rid, parent_address=parent_address(), backend=self.backend.name,
            code_version=self._version, app=self._app_import or "",
            failsafe_timeout=(c.boot_timeout or 60.0) + 10.0,
            heartbeat_interval=self.backend.heartbeat_interval,
            heartbeat_timeout=self.backend.heartbeat_timeout,
            shutdown_timeout=c.shutdown_timeout, max_payload=self._max_payload,
        )
        return RunnerSpec(pool=c.name, runner_id=rid, info=info, app=self._app_import,
                          boot_timeout=c.boot_timeout, secret=self._secret)

    async def _start_runner(self, spec: RunnerSpec, stage: list[str]) -> Runner:
        c = self.config
        rid = spec.runner_id
        started = self.loop.time()
        await self._start_backend()
        handle = await self.backend.boot(spec)
        stage.append(f"it was started, but the parent could not open its channel at {handle.url} (is that "
                     "address reachable from the parent, and is the app serving there?)" if handle.url else
                     "it was started, but its channel did not open")
        try:
            # What boot() used is gone: connect gets the rest, so the backend can say why
            # it timed out before the pool's own deadline does.
            left = None if c.boot_timeout is None else max(0.1, c.boot_timeout - (self.loop.time() - started))
            channel = await handle.connect(left)
            stage.append("its channel opened, but it did not answer the handshake")
            conn = RunnerConnection(
                rid, channel, self._secret.encode(), max_payload=self._max_payload,
                heartbeat_interval=self.backend.heartbeat_interval,
                heartbeat_timeout=self.backend.heartbeat_timeout,
                describe_loss=handle.exit_reason,
                on_lost=functools.partial(self._runner_lost, rid),
                on_recycle=functools.partial(self._recycle, rid),
                on_closing=functools.partial(self._fence, rid),
                describe_timeout=self.backend.describe_loss_timeout,
            )
            await conn.handshake(spec.info.code_version)
        except BaseException:
            await asyncio.shield(handle.stop(1.0))
            raise
        return Runner(rid, handle, conn)

    # -- stop ---------------------------------------------------------------------------
    def _fence(self, rid: str) -> None:
        # Its channel is gone: place nothing more on it while the backend says how it ended.
        self._state.fence(rid)

    def _runner_lost(self, rid: str, reason: str, label: str) -> None:
        runner = self._runners.pop(rid, None)
        if runner is None:
            return
        name = self.config.name
        log.warning("pool %r: runner %s lost: %s", name, rid, reason)
        self.apply(self._state.remove(rid))
        telemetry.runner_stopped(name, self.backend.name, rid, f"lost: {reason}", len(self._runners), label)
        self._spawn(runner.handle.stop(1.0))
        self._spawn(_call_hook(self.config.on_shrink, {"name": name, "count": len(self._runners),
                                                       "runner_id": rid, "reason": f"lost: {reason}"}, swallow=True))

    def _recycle(self, rid: str, reason: str) -> None:
        log.warning("pool %r: recycling runner %s: %s", self.config.name, rid, reason)
        self.apply(self._state.retire(rid))

    async def stop(self, rid: str, reason: str) -> None:
        runner = self._runners.get(rid)
        if runner is None or rid in self._stopping:
            return
        self._stopping.add(rid)
        # Shielded: a stop that has begun completes (and reaps the process) even if the
        # task awaiting it is cancelled.
        await asyncio.shield(self._finish_stop(rid, runner, reason))

    async def _finish_stop(self, rid: str, runner: Runner, reason: str) -> None:
        try:
            await runner.conn.aclose(reason)
            await runner.handle.stop(self.backend.stop_timeout)
        finally:
            # Removed only once stopped: a runner on its way out still counts against max.
            self._runners.pop(rid, None)
            self._stopping.discard(rid)
            decision = self._state.remove(rid)
            if self.running:
                self.apply(decision)
            name = self.config.name
            telemetry.runner_stopped(name, self.backend.name, rid, reason, len(self._runners))
            await _call_hook(self.config.on_shrink, {"name": name, "count": len(self._runners),
                                                     "runner_id": rid, "reason": reason}, swallow=True)

    async def _reap_idle(self) -> None:
        c = self.config
        idle_after, min_idle_after, predicate = c.idle_after, c.min_idle_shutdown_after, c.idle_predicate
        thresholds = [t for t in (idle_after, min_idle_after) if t is not None]
        if not thresholds:
            return  # no runner ever idles away: a sweep would wake the loop for nothing
        tick = max(0.02, min(1.0, min(thresholds) / 5))
        while True:
            # On the heartbeats' grid (_base.ticks): the sweep shares their wake.
            await asyncio.sleep(max(0.0, on_grid(self.loop.time() + tick, tick, parts=1) - self.loop.time()))
            for rid in self._state.idle_runners(self.loop.time(), idle_after, min_idle_after):
                if predicate is None:
                    self._spawn(self.stop(rid, "idle"))
                else:
                    self._spawn(self._stop_if_willing(rid, predicate))

    async def _stop_if_willing(self, rid: str, predicate: Callable[[], Any]) -> None:
        """FLAME's ``{time, fn}``: an idle runner stops only if ``predicate()``, run on it, agrees.

        It takes no new work while asked. Asked again after another idle period if it
        declines; stopped if the predicate fails or does not answer (an idle runner must not
        be kept forever by a broken predicate).
        """
        runner = self._runners.get(rid)
        if runner is None:
            return
        try:
            payload = dumps((predicate, (), {}), "the idle_shutdown_after predicate")
            remote = await runner.conn.start("call", payload, link=True, progress=False, window=1,
                                             on_finish=lambda: None)
            try:
                async with asyncio.timeout(PREDICATE_TIMEOUT):
                    type_, data = await remote.next()
                if type_ != "result":
                    raise remote.failure(type_, data)
                willing = bool(loads(data))
            finally:
                remote.abandon(True)
        except Exception as exc:
            log.warning("pool %r: the idle_shutdown_after predicate failed on runner %s, so it stops: %s: %s",
                        self.config.name, rid, type(exc).__name__, exc)
            willing = True
        if willing:
            await self.stop(rid, "idle")
        else:
            self.apply(self._state.keep(rid, self.loop.time()))


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
