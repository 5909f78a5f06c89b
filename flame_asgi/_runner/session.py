"""Runner side of one parent session: verify each frame, run the work, send results back.

One ``RunnerSession`` serves one parent over one channel, whatever the backend: the
runner-mode endpoint wraps the WebSocket, the local backend an in-memory pair. Work runs
as asyncio tasks; sync code runs in worker threads. The session ends when the parent
says stop, its channel closes, or its heartbeat stops; linked work is then cancelled and
unlinked work gets ``shutdown_timeout`` to finish.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from flame_asgi._base.exceptions import FlameError, PayloadTooLarge, ProtocolError
from flame_asgi._base.names import function_name, unwrap
from flame_asgi._base.parent import ParentInfo, _local_parent, code_version
from flame_asgi._observe.tracing import remote_span
from flame_asgi._runner import dataport
from flame_asgi._runner.dataport import DataEnd
from flame_asgi._runner.progress import current_reporter
from flame_asgi._runner.threads import ElasticThreadPool
from flame_asgi._runner.work import Work
from flame_asgi._wire.channel import Channel, ChannelClosed
from flame_asgi._wire.codec import Frame, FrameKey, FrameOpener, FrameSealer, NeedsData
from flame_asgi._wire.dataplane import DataPlaneError
from flame_asgi._wire.keys import RunnerKeys
from flame_asgi._wire.liveness import Beacon, Beacons, PeerBeacon, heartbeat
from flame_asgi._wire.payload import Payload, Pickled
from flame_asgi._wire.pickling import dumps, loads, pack_exception
from flame_asgi._wire.protocol import (
    FrameType,
    WorkReply,
    is_to_runner,
    is_transfer,
)
from flame_asgi._wire.shm import SharedMemory, check_probe
from flame_asgi._wire.tracking import ResourceTable
from flame_asgi._wire.transfer import TransferHub
from flame_asgi._wire.writer import FrameWriter, split

log = logging.getLogger("flame_asgi.runner")
_END = object()


class RunnerSession:
    """The runner's side of one parent session over one channel."""

    def __init__(self, info: ParentInfo, keys: RunnerKeys, *, local: bool = False, max_threads: int = 512,
                 on_ready: Callable[[], None] | None = None) -> None:
        self.info = info
        self._on_ready = on_ready
        self.local = local
        self.ready = False  # the parent's hello was verified: this is the parent's session
        # Only this runner's own keys: it cannot sign for another runner.
        self._shm = SharedMemory()  # large payloads through sealed memory, if the parent is on this host
        self._beacons: Beacons | None = None  # the parent's and ours, if it is on this host: idle means no ping
        self._key_in = FrameKey(keys.to_runner)
        self._opener = FrameOpener(self._key_in, info.max_payload, shm=self._shm)
        self._data: DataEnd | None = None  # large payloads beside the WebSocket (_runner.dataport)
        self._signer_out = FrameKey(keys.to_parent)
        self._writer: FrameWriter | None = None
        self._work: dict[int, Work] = {}
        self._max_threads = max_threads
        self._executor: ElasticThreadPool | None = None
        self._channel: Channel | None = None
        self._last_seen = 0.0
        self._recycle_asked = False
        self.loop: asyncio.AbstractEventLoop
        self.loop_thread = 0
        self.end_reason: str | None = None
        self.hub = TransferHub(self.send, info.max_payload)
        self.resources = ResourceTable()  # tracked objects the parent still holds
        self._background: set[asyncio.Task[None]] = set()

    @property
    def active(self) -> int:
        return len(self._work)

    async def send(self, type_: FrameType, id_: int = 0, payload: Payload = b"", **meta: Any) -> None:
        assert self._writer is not None
        await self._writer.send(type_, id_, payload, **meta)

    def spawn_send(self, type_: FrameType, id_: int = 0, **meta: Any) -> None:
        """Send a control frame without waiting for it (a credit, say)."""
        self._spawn(self._send_quietly(type_, id_, **meta))

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = self.loop.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def serve(self, channel: Channel) -> str:
        """Run the session to its end; return why it ended."""
        self._channel = channel
        self.loop = asyncio.get_running_loop()
        self.loop_thread = threading.get_ident()
        self._executor = ElasticThreadPool(self.loop, max_workers=self._max_threads)
        if self.local:
            _local_parent.set(self.info)
        try:
            await self._handshake(channel)
        except (ProtocolError, ChannelClosed, TimeoutError) as exc:
            reason = f"handshake failed: {str(exc) or 'no hello in time'}"
            await self._flush()  # a "refused" answer must reach the parent before the close
            await channel.aclose(reason)
            self._executor.shutdown(wait=False)
            self._close_beacons()
            self._close_data()
            return reason
        self._last_seen = self.loop.time()
        reader = self.loop.create_task(self._read_loop(channel))
        watchdog = self.loop.create_task(self._heartbeat())
        try:
            await asyncio.wait({reader, watchdog}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            reader.cancel()
            watchdog.cancel()
            reason = self.end_reason or "session ended"
            await self._wind_down(reason)
        return reason

    async def _handshake(self, channel: Channel) -> None:
        hello = self._opener.open(await asyncio.wait_for(channel.recv(), self.info.failsafe_timeout))
        assert self._opener.session is not None
        sealer = FrameSealer(self._signer_out, self._opener.session, self.info.max_payload, shm=self._shm)
        self._writer = FrameWriter(channel, sealer)
        if hello.meta.get("runner") != self.info.runner_id:
            raise ProtocolError("hello for another runner refused")
        mine = self.info.code_version if self.local else code_version(self.info.app)
        theirs = hello.meta.get("v")
        if theirs != mine:
            await self.send("refused", reason=(
                f"version skew: the runner runs code version {mine} but its parent runs {theirs}; "
                "deploy the same code (or image) to both"))
            raise ProtocolError("version skew")
        # The parent's probe: if we can read its memfds, it can read ours (same host and user).
        self._shm.enabled = check_probe(hello.meta.get("pr"))
        extra: dict[str, Any] = {}
        if self._shm.enabled and channel.loopback:  # it can read our beacon too: idle channels need no ping
            peer = PeerBeacon.open(hello.meta.get("lv"))
            if peer is not None:
                ours = Beacon()
                self._beacons = Beacons(ours, peer)
                extra["lv"] = ours.ref()
        if dataport.serving and not self._shm.enabled and not self.local:
            # Large payloads beside the WebSocket (_wire.dataplane), on our own port; ours
            # wait there for the parent's pull once its probe has shown it can reach us.
            end = self._data = DataEnd(self._opener.session, self._key_in, self.info.max_payload,
                                       self.info.heartbeat_timeout, on_reachable=lambda: setattr(sealer, "dp", end))
            extra["data"] = True
        await self.send("ready", pid=os.getpid(), v=mine, shm=self._shm.enabled, **extra)
        self.ready = True
        if self._on_ready is not None:
            self._on_ready()

    async def _read_loop(self, channel: Channel) -> None:
        try:
            while True:
                message = await channel.recv()
                self._last_seen = self.loop.time()
                for data in split(message):
                    try:
                        try:
                            frame = self._opener.open(data)
                        except NeedsData as need:  # its payload comes on the data plane
                            if self._data is None:
                                raise ProtocolError("a data-plane payload on a session without one") from None
                            frame = self._opener.open(data, await self._data.take(need.key, need.layout))
                            self._last_seen = self.loop.time()
                    except DataPlaneError as exc:
                        self.end_reason = f"a payload's data connection failed ({exc})"
                        return
                    except FlameError as exc:
                        # A forged or replayed frame on an authenticated channel: stop trusting it.
                        log.warning("runner %s refused a message: %s", self.info.runner_id, exc)
                        self.end_reason = f"refused a message: {exc}"
                        return
                    if frame.type == "stop":
                        self.end_reason = "stopped by parent"
                        return
                    self._dispatch(frame)
        except ChannelClosed as exc:
            self.end_reason = f"parent gone: {exc.reason}"

    def _dispatch(self, frame: Frame) -> None:
        type_ = frame.type
        if not is_to_runner(type_):
            return  # a type this version does not send to runners
        if is_transfer(type_):
            self.hub.handle(type_, frame.meta, frame.whole())
        elif type_ == "call":
            work = Work(self, frame.id, frame)
            self._work[frame.id] = work
            work.task = self.loop.create_task(self._run(work, frame.payload))
        elif type_ == "cancel":
            target = self._work.get(frame.id)
            if target is not None:
                target.cancel()
        elif type_ == "credit":
            target = self._work.get(frame.id)
            if target is not None:
                target.add_credit(int(frame.meta.get("c", 0)))
        elif type_ == "message":
            target = self._work.get(frame.id)
            if target is not None:
                target.deliver_message(frame.payload if isinstance(frame.payload, Pickled) else bytes(frame.payload))
        elif type_ == "release":
            self._spawn(self.resources.release(str(frame.meta.get("x", ""))))
        elif type_ == "ping":  # it refreshed _last_seen, as every frame does; and it may ask more
            if frame.meta.get("nb"):  # the parent could not read our beacon: ping as everyone does
                self._close_beacons()
            elif frame.meta.get("r") and self._beacons is not None:
                self.spawn_send("ping")  # it has work in flight: show it the channel works

    async def _heartbeat(self) -> None:
        # As the parent's: one timer, for the next ping or the timeout, whichever is sooner,
        # and no ping while idle with a parent on this host (_wire.liveness).
        interval, timeout = self.info.heartbeat_interval, self.info.heartbeat_timeout
        next_ping = self.loop.time() + interval
        while True:
            silent_until = self._last_seen + timeout + 0.001
            await asyncio.sleep(max(0.0, min(next_ping, silent_until) - self.loop.time()))
            now = self.loop.time()
            if self._data is not None and self._data.busy:
                self._last_seen = now  # a payload is moving on the data plane: the parent is there
            due = now >= next_ping
            if due:
                next_ping = now + interval
            self._last_seen, ping = heartbeat(self._beacons, now, self._last_seen, due=due,
                                              in_flight=bool(self._work) or not self.hub.quiet,
                                              owes_ack=self._shm.owes_ack)
            if now - self._last_seen > timeout:
                self.end_reason = f"parent unreachable: no message for {timeout:g} s"
                return
            if ping is None:
                continue
            try:
                await self.send("ping", **ping)
            except ChannelClosed:
                self.end_reason = "parent gone"
                return

    def check_stuck(self, work: Work, ident: int) -> None:
        if work.thread_ident == ident and not self._recycle_asked:
            self._recycle_asked = True
            log.warning("runner %s: a cancelled sync call did not stop; asking to be recycled",
                        self.info.runner_id)
            self.loop.create_task(self._send_quietly("recycle", reason="a cancelled sync call is still running"))

    async def _send_quietly(self, type_: FrameType, id_: int = 0, **meta: Any) -> None:
        try:
            await self.send(type_, id_, **meta)
        except ChannelClosed:
            pass

    async def _run(self, work: Work, payload: memoryview | Pickled) -> None:
        work.started = True
        current_reporter.set(work)
        span = remote_span(self.info, work.kind, work.trace)
        try:
            if work.cancelled:
                raise asyncio.CancelledError
            fn, args, kwargs = loads(payload, self.hub)
            del payload
            span.named(fn)
            if work.kind == "stream":
                await self._run_stream(work, fn, args, kwargs)
                await work.emit("end")
            else:
                result = await self._invoke(work, fn, args, kwargs)
                await work.emit("result", dumps(result, f"the result of {function_name(fn)}()",
                                                resources=self.resources if work.track else None))
        except asyncio.CancelledError:
            if not work.cancelled:
                raise
            await self._quiet(work, "cancelled")
        except ChannelClosed:
            pass
        except BaseException as exc:  # everything the user's code raises goes back to the caller
            span.failed(exc)
            await self._quiet(work, "error", pack_exception(exc))
        finally:
            self._work.pop(work.id, None)
            span.end()

    async def _quiet(self, work: Work, type_: WorkReply, data: Payload = b"") -> None:
        try:
            await self.send(type_, work.id, data)
        except PayloadTooLarge as exc:  # an exception too big to send: say so instead
            too_big = PayloadTooLarge(f"the remote error could not be sent: {exc}")
            await self._quiet(work, "error", pack_exception(too_big))
        except ChannelClosed:
            pass

    async def _invoke(self, work: Work, fn: Callable[..., Any], args: tuple[Any, ...],
                      kwargs: dict[str, Any]) -> Any:
        if inspect.iscoroutinefunction(unwrap(fn)):
            return await fn(*args, **kwargs)
        result = await self._in_thread(work, fn, *args, **kwargs)
        if inspect.isawaitable(result):
            result = await result
        return result

    async def _in_thread(self, work: Work, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        ctx = contextvars.copy_context()
        assert self._executor is not None
        return await self._executor.run(work.thread_call, ctx, fn, args, kwargs)

    async def _run_stream(self, work: Work, fn: Callable[..., Any], args: tuple[Any, ...],
                          kwargs: dict[str, Any]) -> None:
        target = unwrap(fn)
        if inspect.isasyncgenfunction(target) or inspect.isgeneratorfunction(target):
            source = fn(*args, **kwargs)  # creating a generator runs none of its code
        else:
            source = await self._invoke(work, fn, args, kwargs)
        if hasattr(source, "__aiter__"):
            iterator = source.__aiter__()
            try:
                async for item in iterator:
                    await work.enqueue("item", dumps(item, f"an item of {function_name(fn)}()"))
            finally:
                if hasattr(iterator, "aclose"):
                    await iterator.aclose()
            return
        sync_iter = iter(source)
        try:
            while True:
                item = await self._in_thread(work, next, sync_iter, _END)
                if item is _END:
                    return
                await work.enqueue("item", dumps(item, f"an item of {function_name(fn)}()"))
        finally:
            close = getattr(sync_iter, "close", None)
            if close is not None:
                try:
                    close()
                except ValueError:  # still executing in an abandoned thread
                    pass

    async def _wind_down(self, reason: str) -> None:
        unlinked = []
        for work in list(self._work.values()):
            if work.link or work.task is None:
                work.cancel()
            else:
                unlinked.append(work.task)
        if unlinked:
            timeout = self.info.shutdown_timeout
            await asyncio.wait(unlinked, timeout=timeout)
            for work in list(self._work.values()):
                work.cancel()
        self.hub.close(reason)
        await self.resources.release_all()  # the parent is gone or done: nobody will release them
        await self._flush()
        if self._channel is not None:
            await self._channel.aclose(reason)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        self._shm.close()
        self._close_beacons()
        self._close_data()

    def _close_data(self) -> None:
        if self._data is not None:
            self._data.close()
            self._data = None

    def _close_beacons(self) -> None:
        if self._beacons is not None:
            self._beacons.close()
            self._beacons = None

    async def _flush(self) -> None:
        if self._writer is not None:
            try:
                await asyncio.wait_for(self._writer.flush(), 2.0)
            except TimeoutError:
                pass
            self._writer.close()

    def abort(self, reason: str) -> None:
        """Stop everything at once (the local backend's stand-in for a killed process)."""
        self.end_reason = reason
        for work in list(self._work.values()):
            work.cancel()

