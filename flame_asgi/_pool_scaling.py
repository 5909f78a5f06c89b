"""How a pool grows and shrinks: boot runners (with retry and backoff), open their channels,
apply ``PoolState``'s decisions, and stop runners that are idle, spent, recycled or lost.

``FlamePool`` inherits this half; the other half (``_pool``) places calls on the runners.
Splitting them keeps each readable in one sitting: this one owns the runners' lives.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import inspect
import itertools
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from flame_asgi import _telemetry
from flame_asgi._connection import RunnerConnection
from flame_asgi._exceptions import BootError, VersionSkew
from flame_asgi._parent import ParentInfo, code_version, parent_address
from flame_asgi._pickling import dumps, loads
from flame_asgi._pool_state import Decision, PoolState
from flame_asgi.backends import Backend, RunnerHandle, RunnerSpec

if TYPE_CHECKING:
    from flame_asgi._pool import Hook

log = logging.getLogger("flame_asgi.pool")
BOOT_RETRY_INTERVAL = 1.0
MAX_BOOT_BACKOFF = 30.0
PREDICATE_TIMEOUT = 5.0  # for an idle_shutdown_after predicate's answer


@dataclasses.dataclass
class _Runner:
    id: str
    handle: RunnerHandle
    conn: RunnerConnection


class PoolScaling:
    """The runners' lives, for ``FlamePool`` (which sets every attribute declared here)."""

    name: str
    backend: Backend
    boot_timeout: float | None
    shutdown_timeout: float | None
    _idle_after: float | None
    _idle_predicate: Callable[[], Any] | None
    min_idle_shutdown_after: float | None
    single_use: bool
    on_grow_start: Hook | None
    on_grow_end: Hook | None
    on_shrink: Hook | None
    loop: asyncio.AbstractEventLoop
    _state: PoolState[asyncio.Future[str | None]]
    _runners: dict[str, _Runner]
    _tasks: set[asyncio.Task[Any]]
    _boots: set[asyncio.Task[Any]]
    _stopping: set[str]
    _ids: itertools.count[int]
    _last_attempt: float
    _boot_failures: int
    _running: bool
    _version: str | None
    _app_import: str | None
    _secret: str
    _max_payload: int

    if TYPE_CHECKING:  # defined by FlamePool and PoolSlots; declared only for the type checker
        async def _start_backend(self) -> None: ...

        def _release(self, rid: str) -> None: ...

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
        thresholds = [t for t in (self._idle_after, self.min_idle_shutdown_after) if t is not None]
        tick = max(0.02, min(1.0, min(thresholds) / 5)) if thresholds else 1.0
        while True:
            await asyncio.sleep(tick)
            for rid in self._state.idle_runners(self.loop.time(), self._idle_after, self.min_idle_shutdown_after):
                if self._idle_predicate is None:
                    self._spawn(self._stop_runner(rid, "idle"))
                else:
                    self._spawn(self._stop_if_willing(rid, self._idle_predicate))

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
                        self.name, rid, type(exc).__name__, exc)
            willing = True
        if willing:
            await self._stop_runner(rid, "idle")
        else:
            self._apply(self._state.keep(rid, self.loop.time()))



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
