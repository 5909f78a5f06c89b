"""Worker threads for sync remote code: a few for quick calls, more when calls block.

A plain ThreadPoolExecutor starts a new thread for every submission that finds no idle
one, so a burst of 100 trivial calls makes 100 threads fighting over the GIL. This pool
keeps ``core`` threads; beyond them it starts another only when submitted work has
waited ``GROW_AFTER`` seconds (its threads are blocked: sleeping, in I/O, waiting on a
subprocess), up to ``max_workers``, so blocking calls still run side by side. Threads
beyond ``core`` retire after ``retire_after`` seconds without work.

Built on public APIs only (a queue under a Condition, ``concurrent.futures.Future``), so
that no Python release can change it from under us; ``loop.run_in_executor`` takes it as
it takes any ``Executor``. The runner's own calls use ``run``, which settles an asyncio
future straight from the thread (one ``call_soon_threadsafe``) instead of chaining a
``concurrent.futures.Future`` to one, as ``run_in_executor`` does (two futures, two
callbacks, a lock: ~15 µs of a warm sync call's CPU).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, ParamSpec, TypeVar

GROW_AFTER = 0.005
RETIRE_AFTER = 30.0

P = ParamSpec("P")
T = TypeVar("T")


class _Call:
    __slots__ = ("args", "fn", "future", "kwargs", "queued_at")

    def __init__(self, future: Future[Any], fn: Callable[..., Any], args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> None:
        self.future = future
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.queued_at = time.monotonic()

    def run(self) -> None:
        if not self.future.set_running_or_notify_cancel():
            return  # cancelled while it waited
        try:
            result = self.fn(*self.args, **self.kwargs)
        except BaseException as exc:  # WorkCancelled too: the caller gets it, the thread goes on
            self.future.set_exception(exc)
        else:
            self.future.set_result(result)

    def cancel(self) -> None:
        self.future.cancel()


class _LoopCall(_Call):
    """A call whose outcome goes to an asyncio future of ``loop``, set on the loop's thread."""

    __slots__ = ("loop",)

    def __init__(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], fn: Callable[..., Any],
                 args: tuple[Any, ...]) -> None:
        super().__init__(future, fn, args, {})  # type: ignore[arg-type]
        self.loop = loop

    def run(self) -> None:
        future: asyncio.Future[Any] = self.future  # type: ignore[assignment]
        if future.cancelled():  # cancelled while it waited (read across threads: a flag, as good as a lock here)
            return
        try:
            result = self.fn(*self.args)
        except BaseException as exc:  # WorkCancelled too: the caller gets it, the thread goes on
            self._report(future, None, exc)
        else:
            self._report(future, result, None)

    def cancel(self) -> None:
        if _running_loop() is self.loop:
            self.future.cancel()
        else:  # an asyncio future is the loop's to change
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
                self.loop.call_soon_threadsafe(self.future.cancel)

    def _report(self, future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
            self.loop.call_soon_threadsafe(_settle, future, result, exc)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _settle(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if future.done():  # cancelled meanwhile
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


class ElasticThreadPool(Executor):
    def __init__(self, loop: asyncio.AbstractEventLoop, *, core: int = 4, max_workers: int = 512,
                 retire_after: float = RETIRE_AFTER) -> None:
        self._loop = loop  # times the growth: GROW_AFTER is a call_later on it
        self._core = max(1, core)
        self._max_workers = max(max_workers, core)
        self._retire_after = retire_after
        self._queue: collections.deque[_Call] = collections.deque()
        self._changed = threading.Condition()
        self._threads: set[threading.Thread] = set()
        self._idle = 0  # threads waiting for work
        self._shutdown = False
        self._grow_scheduled = False
        self._names = itertools.count()

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        future: Future[T] = Future()
        self._put(_Call(future, fn, args, kwargs))
        return future

    def run(self, fn: Callable[..., T], /, *args: Any) -> asyncio.Future[T]:
        """``fn(*args)`` on a thread of the pool, as a future of the pool's loop (called from
        the loop's thread). Cancelling it before a thread takes the call skips the call."""
        future: asyncio.Future[T] = self._loop.create_future()
        self._put(_LoopCall(self._loop, future, fn, args))
        return future

    def _put(self, call: _Call) -> None:
        with self._changed:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._queue.append(call)
            if self._idle >= len(self._queue):
                self._changed.notify()  # a waiting thread takes it
            elif len(self._threads) < self._core:
                self._start_thread()
            else:
                self._schedule_grow(GROW_AFTER)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._changed:
            self._shutdown = True
            if cancel_futures:
                while self._queue:
                    self._queue.popleft().cancel()
            self._changed.notify_all()  # idle threads exit; busy ones after the queue empties
            threads = list(self._threads)
        if wait:
            for thread in threads:
                thread.join()

    def _start_thread(self) -> None:  # with self._changed held
        # Daemon: a sync call stuck in C must not keep the runner's interpreter from exiting.
        thread = threading.Thread(target=self._work, name=f"flame-work_{next(self._names)}", daemon=True)
        self._threads.add(thread)
        thread.start()

    def _schedule_grow(self, delay: float) -> None:  # with self._changed held
        if self._grow_scheduled or len(self._threads) >= self._max_workers:
            return
        self._grow_scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._loop.call_later, delay, self._grow)
        except RuntimeError:  # the loop is closed: nothing can time the wait, so grow now
            self._grow_scheduled = False
            self._start_thread()

    def _grow(self) -> None:
        with self._changed:
            self._grow_scheduled = False
            if self._shutdown or len(self._queue) <= self._idle:
                return
            waited = time.monotonic() - self._queue[0].queued_at
            if waited < GROW_AFTER:  # the work that asked for this was taken; this one is newer
                self._schedule_grow(GROW_AFTER - waited)
                return
            self._start_thread()  # work still waits: its threads are blocked
            if len(self._queue) > 1:  # more than the new thread takes: look again
                self._schedule_grow(GROW_AFTER)

    def _work(self) -> None:
        me = threading.current_thread()
        while True:
            with self._changed:
                while not self._queue:
                    if self._shutdown or self._wait_or_retire():
                        self._threads.discard(me)
                        return
                call = self._queue.popleft()
            try:
                call.run()
            except BaseException:
                # Raised into this thread just after its call ended (a late cancellation
                # of the call): the call already has its outcome, and the thread goes on.
                pass
            del call  # no reference to its arguments or result while idle

    def _wait_or_retire(self) -> bool:  # with self._changed held and the queue empty
        self._idle += 1
        try:
            woken = self._changed.wait(self._retire_after)
        finally:
            self._idle -= 1
        return not woken and not self._queue and len(self._threads) > self._core
