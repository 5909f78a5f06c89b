"""Events: what pools and runners do, for handlers, the ``flame_asgi.events`` logger, and spans.

``subscribe(handler)`` registers ``handler(name, fields)``; the pool reports through
``emit`` and the helpers below. With no handler, the events logger not enabled for DEBUG
and no OpenTelemetry tracer provider, an event costs one check: nothing is built, timed or
formatted. The event names and their fields are listed in ``docs/observability.md``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from flame_asgi._base.exceptions import BootError, PoolClosed, RunnerLost
from flame_asgi._base.names import function_name
from flame_asgi._observe import tracing
from flame_asgi._wire.protocol import WorkKind


class ObservedPool(Protocol):
    """What events and metrics read of a pool (``FlamePool`` has it)."""

    @property
    def name(self) -> str: ...

    @property
    def running(self) -> bool: ...

    @property
    def min(self) -> int: ...

    @property
    def max(self) -> int: ...

    @property
    def max_concurrency(self) -> int: ...

    @property
    def backend(self) -> Any: ...

    def stats(self) -> Any: ...

Handler = Callable[[str, dict[str, Any]], object]

log = logging.getLogger("flame_asgi.events")
_DEBUG = logging.DEBUG
_handlers: tuple[Handler, ...] = ()  # replaced, never mutated: emit iterates without a lock
_pools: weakref.WeakSet[ObservedPool] = weakref.WeakSet()


def subscribe(handler: Handler) -> Callable[[], None]:
    """Call ``handler(name, fields)`` for every event of every pool in this process.

    Returns a function that unsubscribes it. Handlers run synchronously where the event
    happens (mostly on the event loop): keep them quick, and do not block. An exception
    in a handler is logged and otherwise ignored.
    """
    global _handlers
    _handlers = (*_handlers, handler)

    def unsubscribe() -> None:
        global _handlers
        _handlers = tuple(h for h in _handlers if h is not handler)

    return unsubscribe


def active() -> bool:
    """Is anyone listening (a handler, or the events logger at DEBUG)?"""
    return bool(_handlers) or log.isEnabledFor(_DEBUG)


def emit(name: str, /, **fields: Any) -> None:
    """Send one event to the handlers and, when it is enabled for DEBUG, the events logger."""
    for handler in _handlers:
        try:
            handler(name, fields)
        except Exception:
            log.exception("flame_asgi event handler %r raised on %s", handler, name)
    if log.isEnabledFor(_DEBUG):
        text = " ".join(f"{k}={_short(v)}" for k, v in fields.items())
        log.debug("%s %s", name, text, extra={"flame_event": name, "flame_fields": fields,
                                               **{f"flame_{k}": v for k, v in fields.items()}})


def _short(value: Any) -> str:
    return f"{value:.6f}" if isinstance(value, float) else str(value)


# -- pools and runners ------------------------------------------------------------------
def pools() -> Iterator[ObservedPool]:
    """The running pools of this process (for the metrics collector)."""
    return (p for p in list(_pools) if p.running)


def pool_started(pool: ObservedPool) -> None:
    _pools.add(pool)
    if active():
        emit("pool.start", pool=pool.name, backend=pool.backend.name, min=pool.min, max=pool.max,
             max_concurrency=pool.max_concurrency)


def pool_stopped(pool: ObservedPool) -> None:
    _pools.discard(pool)
    if active():
        emit("pool.stop", pool=pool.name, backend=pool.backend.name)


def boot_started(pool: str, backend: str, runner: str, count: int, why: str = "demand",
                 prepared: bool = False) -> float:
    """A runner begins to boot (the pool grows) for ``why`` (``min``, ``demand``, ``warm``),
    ``prepared`` if the backend had it ready on standby; returns the time to pass to ``boot_ended``."""
    if not active():
        return 0.0
    emit("runner.boot.start", pool=pool, runner=runner, backend=backend, count=count, why=why,
         prepared=prepared)
    return time.perf_counter()


def boot_ended(pool: str, backend: str, runner: str, began: float, error: BaseException | None,
               count: int) -> None:
    if not active():
        return
    duration = time.perf_counter() - began if began else None
    if error is None:
        reason = None
    elif isinstance(error, asyncio.CancelledError):
        reason = "cancelled"
    else:
        reason = getattr(error, "reason", None) or type(error).__name__
    emit("runner.boot.end", pool=pool, runner=runner, backend=backend, count=count,
         duration=duration, ok=error is None, reason=reason, error=None if error is None else str(error))


def runner_stopped(pool: str, backend: str, runner: str, reason: str, count: int, label: str | None = None) -> None:
    """A runner left the pool: ``reason`` as the core gives it (``idle``, ``lost: …``), and for
    a lost runner its ``label`` (see ``flame_asgi._wire.exits.loss_label``)."""
    if active():
        emit("runner.stop", pool=pool, runner=runner, backend=backend, count=count,
             reason=label or reason, detail=reason)


# -- calls ------------------------------------------------------------------------------
class CallObserver:
    """One call, cast, stream or child as its caller sees it; this base class does nothing.

    ``observe_call`` hands out the shared no-op ``OFF`` when nobody listens, so the pool
    calls these methods unconditionally at almost no cost.
    """

    trace: dict[str, str] | None = None  # the W3C trace context for the runner, if traced

    def __enter__(self) -> CallObserver:
        return self

    def __exit__(self, type_: object, exc: BaseException | None, tb: object) -> None:
        self.end(exc)

    def acquired(self, runner: str) -> None:
        """The call got a slot on ``runner``: its wait in the queue is over."""

    def end(self, exc: BaseException | None = None, outcome: str | None = None) -> None:
        """The caller is done with the work: ``exc`` is what it raised, if anything."""

    def settle(self, fut: asyncio.Future[Any]) -> None:
        """End from a future's state (a child's result)."""
        if not fut.done():
            self.end(None, "stopped")
        elif fut.cancelled():
            self.end(asyncio.CancelledError())
        else:
            self.end(fut.exception())


OFF = CallObserver()


class _Observer(CallObserver):
    def __init__(self, pool: str, kind: str, function: str) -> None:
        self.pool, self.kind, self.function = pool, kind, function
        self.runner: str | None = None
        self._ran: float | None = None
        self._ended = False
        self._span, self.trace = tracing.caller_span(pool, kind, function)
        if active():
            emit("call.start", pool=pool, kind=kind, function=function)
        self._began = time.perf_counter()

    def acquired(self, runner: str) -> None:
        self.runner = runner
        self._ran = time.perf_counter()
        if self._span is not None:
            tracing.acquired(self._span, runner, self._ran - self._began)

    def end(self, exc: BaseException | None = None, outcome: str | None = None) -> None:
        if self._ended:
            return
        self._ended = True
        now = time.perf_counter()
        outcome = outcome or _outcome(exc)
        if self._span is not None:
            tracing.end(self._span, exc, outcome)
        if not active():
            return
        queue = (self._ran if self._ran is not None else now) - self._began
        run = now - self._ran if self._ran is not None else None
        fields = {"pool": self.pool, "kind": self.kind, "function": self.function, "runner": self.runner,
                  "queue_time": queue, "run_time": run, "outcome": outcome}
        if outcome in ("ok", "stopped"):
            emit("call.end", **fields)
        else:
            emit("call.exception", **fields, error=type(exc).__name__ if exc is not None else outcome)


def observe_call(pool: str, kind: WorkKind, fn: Any) -> CallObserver:
    """Start observing one piece of work (``OFF`` when nobody listens and nothing traces)."""
    if not (_handlers or log.isEnabledFor(_DEBUG) or tracing.enabled()):
        return OFF
    return _Observer(pool, kind, function_name(fn))


def _outcome(exc: BaseException | None) -> str:
    if exc is None:
        return "ok"
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    if isinstance(exc, TimeoutError):  # CallTimeout included
        return "timeout"
    if isinstance(exc, RunnerLost):
        return "lost"
    if isinstance(exc, BootError):
        return "boot_error"
    if isinstance(exc, PoolClosed):
        return "pool_closed"
    return "error"

