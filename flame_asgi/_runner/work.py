"""One piece of work on a runner (a call, cast, stream or child): its progress and items
sent in order within the caller's credit, the messages a child receives, the worker thread
it may run in, and how it is cancelled.
"""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from flame_asgi._base.exceptions import PayloadTooLarge
from flame_asgi._base.parent import ParentInfo
from flame_asgi._runner.progress import Sent
from flame_asgi._wire.codec import Frame
from flame_asgi._wire.payload import Payload, Pickled
from flame_asgi._wire.pickling import dumps, loads
from flame_asgi._wire.protocol import CREDITED, MESSAGE_WINDOW, FrameType, WorkKind, WorkReply, is_work_kind
from flame_asgi._wire.transfer import TransferHub


class Session(Protocol):
    """What a piece of work uses of the channel it came on (the runner's ``RunnerSession``)."""

    info: ParentInfo
    loop: asyncio.AbstractEventLoop
    loop_thread: int
    hub: TransferHub

    async def send(self, type_: FrameType, id_: int = 0, payload: Payload = b"", **meta: Any) -> None: ...

    def spawn_send(self, type_: FrameType, id_: int = 0, **meta: Any) -> None: ...

    def check_stuck(self, work: Work, ident: int) -> None: ...

# A thread that ignores cancellation this long after it was asked to stop is "stuck":
# its slot is already free, so the runner asks to be recycled rather than leak threads.
STUCK_THREAD_GRACE = 2.0


class WorkCancelled(BaseException):
    """Raised inside a worker thread whose call was cancelled (a BaseException so that
    ``except Exception`` in user code does not swallow it)."""


def _async_raise(thread_ident: int) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_ident), ctypes.py_object(WorkCancelled))



class Work:
    """One call, cast, stream or child placed on this runner."""

    def __init__(self, session: Session, id_: int, frame: Frame) -> None:
        self.session = session
        self.id = id_
        kind = frame.meta.get("k", "call")
        self.kind: WorkKind = kind if is_work_kind(kind) else "call"  # unknown kinds run as calls
        self.link: bool = frame.meta.get("l", True)
        self.wants_progress: bool = frame.meta.get("p", False)
        self.credit: int = frame.meta.get("w", 32)
        self.trace: dict[str, str] | None = frame.meta.get("tc")  # the caller's trace context
        self.track: bool = bool(frame.meta.get("tr", False))  # keep the result's resources (``_tracking``)
        self._inbox: asyncio.Queue[bytes | Pickled] | None = None  # a child's messages, made on first use
        self.task: asyncio.Task[None] | None = None
        self.started = False
        self.cancelled = False
        self.thread_ident: int | None = None
        self._thread_lock = threading.Lock()
        self._credit_event = asyncio.Event()
        self._outq: deque[tuple[WorkReply, Payload, asyncio.Future[None]]] = deque()
        self._sender: asyncio.Task[None] | None = None

    # -- progress and items, in order, within the caller's credit ---------------------
    def report(self, event: Any) -> Sent:
        if not self.wants_progress or self.cancelled:
            return Sent()
        data = dumps(event, "a progress event")
        if len(data) > self.session.info.max_payload:  # fail in the reporting code, not the sender
            raise PayloadTooLarge(f"progress event of {len(data):,} bytes exceeds FLAME_MAX_PAYLOAD; "
                                  "report a path or an Upload instead")
        loop = self.session.loop
        if threading.get_ident() == self.session.loop_thread:
            return Sent(self.enqueue("event", data))
        # From a worker thread: block it until the event is sent (back-pressure).
        asyncio.run_coroutine_threadsafe(self._enqueue_and_wait("event", data), loop).result()
        return Sent()

    def deliver_message(self, data: bytes | Pickled) -> None:
        if self._inbox is None:
            self._inbox = asyncio.Queue()
        if self._inbox.qsize() < MESSAGE_WINDOW:  # the parent keeps within it; a peer that does not loses
            self._inbox.put_nowait(data)

    def receive(self, timeout: float | None) -> Any:
        if self.kind != "child":
            raise RuntimeError("flame_asgi.receive() works only inside a child placed with pool.place_child(), "
                               f"not in a {self.kind}")
        if threading.get_ident() == self.session.loop_thread:
            return self._next_message(timeout)
        # From a worker thread: block in short waits, so that a cancellation raised into
        # this thread (WorkCancelled) is seen between them.
        future = asyncio.run_coroutine_threadsafe(self._next_message(timeout), self.session.loop)
        try:
            while True:
                try:
                    return future.result(0.1)
                except TimeoutError:
                    if future.done():  # receive's own timeout, not this wait's
                        raise
        finally:
            future.cancel()

    async def _next_message(self, timeout: float | None) -> Any:
        if self._inbox is None:
            self._inbox = asyncio.Queue()
        async with asyncio.timeout(timeout):
            data = await self._inbox.get()
        self.session.spawn_send("credit", self.id, c=1)
        return loads(data, self.session.hub)

    async def _enqueue_and_wait(self, type_: WorkReply, data: Payload) -> None:
        await self.enqueue(type_, data)

    def enqueue(self, type_: WorkReply, data: Payload) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = self.session.loop.create_future()
        self._outq.append((type_, data, fut))
        if self._sender is None or self._sender.done():
            self._sender = self.session.loop.create_task(self._drain())
        return fut

    def add_credit(self, n: int) -> None:
        self.credit += n
        self._credit_event.set()

    async def _drain(self) -> None:
        while self._outq:
            type_, data, fut = self._outq[0]
            if type_ in CREDITED:
                while self.credit <= 0:
                    self._credit_event.clear()
                    await self._credit_event.wait()
                self.credit -= 1
            await self.session.send(type_, self.id, data)
            self._outq.popleft()
            if not fut.done():
                fut.set_result(None)

    async def emit(self, type_: WorkReply, data: Payload = b"") -> None:
        """Send a final frame after every event already queued."""
        if self._outq:
            await self.enqueue(type_, data)
        else:
            await self.session.send(type_, self.id, data)

    # -- threads -----------------------------------------------------------------------
    def thread_call(self, ctx: contextvars.Context, fn: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        with self._thread_lock:
            self.thread_ident = threading.get_ident()
        try:
            return ctx.run(fn, *args, **kwargs)
        finally:
            with self._thread_lock:
                self.thread_ident = None

    def cancel(self) -> None:
        if self.cancelled:
            return  # cancelling again would interrupt the work's own cleanup (except CancelledError: ...)
        self.cancelled = True
        # A task cancelled before its first step never enters _run's try block (nothing
        # would tell the parent); an unstarted one sees ``cancelled`` as it starts instead.
        if self.task is not None and self.started:
            self.task.cancel()
        if self._sender is not None:
            self._sender.cancel()
        for _, _, fut in self._outq:
            fut.cancel()
        with self._thread_lock:
            ident = self.thread_ident
            if ident is not None:
                _async_raise(ident)
        if ident is not None:
            self.session.loop.call_later(STUCK_THREAD_GRACE, self.session.check_stuck, self, ident)
