"""The parent's end of one runner's channel: handshake, calls in flight, heartbeat, loss.

Every call placed on the runner is a ``RemoteCall`` multiplexed over the one channel.
When the channel closes or the heartbeat stops, every call in flight fails at once with
``RunnerLost``, with the backend's account of why (exit signal, OOM) when it has one.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import secrets
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from flame_asgi._base.exceptions import BootError, FlameError, ProtocolError, RunnerLost, VersionSkew
from flame_asgi._base.ticks import on_grid
from flame_asgi._wire.channel import Channel, ChannelClosed, MemoryChannel
from flame_asgi._wire.codec import TO_PARENT, TO_RUNNER, FrameOpener, FrameSealer, NeedsData, make_signer
from flame_asgi._wire.dataplane import DATA_MIN, DataClient, DataPlaneError
from flame_asgi._wire.exits import ExitReason, loss_label
from flame_asgi._wire.liveness import Beacon, Beacons, PeerBeacon, heartbeat
from flame_asgi._wire.payload import Payload
from flame_asgi._wire.pickling import unpack_exception
from flame_asgi._wire.protocol import (
    CREDITED,
    MESSAGE_WINDOW,
    TERMINAL,
    FrameType,
    Reply,
    WorkKind,
    is_transfer,
    is_work_reply,
)
from flame_asgi._wire.shm import SharedMemory
from flame_asgi._wire.shm import available as shm_available
from flame_asgi._wire.shm import probe as shm_probe
from flame_asgi._wire.transfer import TransferHub, forget
from flame_asgi._wire.writer import FrameWriter, split

log = logging.getLogger("flame_asgi.pool")


class RemoteCall:
    """The parent's view of one piece of work running on a runner."""

    def __init__(self, conn: RunnerConnection, id_: int, window: int, on_finish: Callable[[], None]) -> None:
        self._conn = conn
        self.id = id_
        self._window = window
        self._on_finish = on_finish
        # Replies not yet read, and the reader's wait for the next: an asyncio.Queue per call
        # (three deques and an Event, built for many producers and consumers) cost more.
        self._replies: collections.deque[tuple[Reply, Any]] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self.hub = conn.hub  # results may carry Uploads, read back over this runner's channel
        self.tokens: list[str] = []  # Uploads this call sends: forgotten when it ends
        self._consumed = 0
        self._message_credit = MESSAGE_WINDOW  # messages the runner has room for (a child's)
        self._credit_changed: asyncio.Event | None = None  # made when a sender waits for room
        self.finished = False  # the runner is done with it (or gone): the slot is free
        self.detached = False  # nobody reads any more

    async def next(self) -> tuple[Reply, Any]:
        """The next reply and its data: a pickled payload, or the RunnerLost of a ``lost``."""
        while not self._replies:
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        type_, data = self._replies.popleft()
        if type_ in CREDITED:
            self._consumed += 1
            if self._consumed >= max(1, self._window // 2):
                self._conn.grant(self.id, self._consumed)
                self._consumed = 0
        return type_, data

    def deliver(self, type_: Reply, data: Any) -> None:
        if type_ in TERMINAL or type_ == "lost":
            self.finish()
        if not self.detached:
            self._replies.append((type_, data))
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        elif type_ in CREDITED:
            self._conn.grant(self.id, 1)  # nobody listens: keep the remote side unblocked

    def abandon(self, link: bool) -> None:
        """The caller stops listening: cancel the remote work if linked.

        The slot is freed now for a linked cancel, or when the runner reports the end of
        the work otherwise.
        """
        if self.detached:
            return
        self.detached = True
        while self._replies:  # drop buffered events, handing their credit back
            type_, _ = self._replies.popleft()
            if type_ in CREDITED:
                self._conn.grant(self.id, 1)
        if self.finished:
            return
        if link:
            self._conn.cancel(self.id)
            self.finish()

    def failure(self, type_: Reply, data: Any) -> BaseException:
        """What a reply other than a result or an item means to the caller: the remote
        exception, the runner's loss, or (``cancelled`` unasked) the runner shutting down."""
        rid = self._conn.runner_id
        if type_ == "error":
            return unpack_exception(data, rid)
        if type_ == "lost":
            assert isinstance(data, BaseException)
            return data
        return RunnerLost(f"runner {rid} cancelled the work (it is shutting down)", runner_id=rid)

    async def send_message(self, data: Payload) -> None:
        """Send a message to this work (a child), in order; wait while the runner holds
        ``MESSAGE_WINDOW`` untaken ones."""
        while self._message_credit <= 0 and not self.finished:
            if self._credit_changed is None:
                self._credit_changed = asyncio.Event()
            self._credit_changed.clear()
            await self._credit_changed.wait()
        if self.finished:
            raise FlameError(f"the child on runner {self._conn.runner_id} has ended: it takes no more messages")
        self._message_credit -= 1
        await self._conn._send("message", self.id, data)

    def add_message_credit(self, n: int) -> None:
        self._message_credit += n
        if self._credit_changed is not None:
            self._credit_changed.set()

    def request_cancel(self) -> None:
        """Ask the runner to stop the work, and keep reading until it says it has."""
        if not self.finished:
            self._conn.cancel(self.id)

    def finish(self) -> None:
        if not self.finished:
            self.finished = True
            forget(self.tokens)
            if self._credit_changed is not None:
                self._credit_changed.set()  # a sender waiting for room learns the child ended
            self._on_finish()


class _Pushes:
    """The sealer's data plane on the parent: each large payload pushed, in order."""

    def __init__(self, connection: RunnerConnection) -> None:
        self._connection = connection

    def wants(self, size: int) -> bool:
        return size >= DATA_MIN and self._connection.closed is None

    def put(self, seq: int, parts: Sequence[bytes | memoryview]) -> int:
        self._connection._spawn(self._connection._push(seq, parts))
        return seq


class RunnerConnection:
    """One runner's channel as seen from the parent."""

    def __init__(
        self,
        runner_id: str,
        channel: Channel,
        secret: bytes,
        *,
        max_payload: int,
        heartbeat_interval: float,
        heartbeat_timeout: float,
        describe_loss: Callable[[], Awaitable[ExitReason | None]],
        on_lost: Callable[[str, str], None],
        on_recycle: Callable[[str], None],
        on_closing: Callable[[], None] = lambda: None,
        describe_timeout: float = 1.5,
    ) -> None:
        self.runner_id = runner_id
        self._channel = channel
        self._secret = secret
        self._max_payload = max_payload
        self._interval = heartbeat_interval
        self._timeout = heartbeat_timeout
        self._describe_loss = describe_loss
        self._describe_timeout = describe_timeout
        self._on_lost = on_lost
        self._on_recycle = on_recycle
        self._on_closing = on_closing
        self._calls: dict[int, RemoteCall] = {}
        self._ids = itertools.count(1)
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()
        self._last_seen = 0.0
        self.closed: str | None = None
        self.hub = TransferHub(self._send, max_payload)
        self._shm = SharedMemory()
        self._offered: Beacon | None = None  # ours, named in the hello, until the runner shows one
        self._beacons: Beacons | None = None  # both, for a runner on this host: idle means no ping
        self._data: DataClient | None = None  # large payloads beside the WebSocket (_wire.dataplane)

    async def handshake(self, version: str) -> None:
        try:
            await self._handshake(version)
        except BaseException:
            self._let_go()  # no channel came of it: nothing is left to watch
            raise

    async def _handshake(self, version: str) -> None:
        session = secrets.token_hex(16)
        to_runner = make_signer(self._secret, self.runner_id, TO_RUNNER)
        sealer = FrameSealer(to_runner, session, self._max_payload, shm=self._shm)
        self._writer = FrameWriter(self._channel, sealer)
        self._opener = FrameOpener(make_signer(self._secret, self.runner_id, TO_PARENT), self._max_payload, session,
                                   shm=self._shm)
        probe_fd, extra = None, dict[str, Any]()
        if shm_available() and not isinstance(self._channel, MemoryChannel):
            # Can the runner read our memfds (same host)? Then large payloads skip the socket.
            probe = shm_probe()
            if probe is not None:
                probe_fd, extra["pr"] = probe
            if self._channel.loopback:
                self._offered = Beacon()
                extra["lv"] = self._offered.ref()
        try:
            await self._send("hello", runner=self.runner_id, v=version, **extra)
            reply = self._opener.open(await self._channel.recv())
        except ChannelClosed as exc:
            raise BootError(f"runner {self.runner_id} closed the channel during the handshake: {exc.reason}",
                            reason=exc.reason) from None
        except FlameError as exc:
            raise BootError(f"runner {self.runner_id} answered the handshake with an invalid message: {exc}") from None
        finally:
            if probe_fd is not None:
                os.close(probe_fd)
        self._shm.enabled = bool(reply.meta.get("shm"))
        offered, self._offered = self._offered, None
        if offered is not None:
            peer = PeerBeacon.open(reply.meta.get("lv")) if self._shm.enabled else None
            if peer is not None:
                self._beacons = Beacons(offered, peer)
            else:  # another host, or a runner that shows none: pings only
                offered.close()
        self.pid: int | None = reply.meta.get("pid")  # the runner's process id, as it says
        if reply.type == "refused":
            reason = str(reply.meta.get("reason", "refused"))
            raise VersionSkew(f"runner {self.runner_id} refused: {reason}", reason=reason)
        if reply.type != "ready":
            raise BootError(f"runner {self.runner_id} sent {reply.type!r} instead of ready")
        loop = asyncio.get_running_loop()
        self._last_seen = loop.time()
        self._tasks = [loop.create_task(self._reader()), loop.create_task(self._heartbeat())]
        if self._beacons is None and "lv" in reply.meta and reply.type == "ready":
            # The runner showed a beacon we could not read: it is to ping as everyone does.
            await self._send_quietly("ping", nb=True)
        address = self._channel.data_address
        if reply.meta.get("data") and not self._shm.enabled and address is not None:
            # Large payloads beside the WebSocket (_wire.dataplane), once a probe shows the
            # path carries a connection of ours: probed in the background, the first call
            # does not wait for it.
            self._data = DataClient(address, to_runner, session, self._timeout)
            self._spawn(self._probe_data(sealer))

    async def _probe_data(self, sealer: FrameSealer) -> None:
        assert self._data is not None
        if await self._data.probe():
            sealer.dp = _Pushes(self)
        else:
            log.info("runner %s: its data plane did not answer; large payloads stay on the WebSocket",
                     self.runner_id)

    async def _push(self, seq: int, parts: Sequence[bytes | memoryview]) -> None:
        assert self._data is not None
        try:
            await self._data.push(seq, parts)
        except DataPlaneError as exc:
            await self._lose(f"a payload's data connection failed ({exc})", unreachable=True)

    async def _pull(self, need: NeedsData) -> list[bytes]:
        # Not ``ready``: the runner names payloads there once our probe reached it, which
        # may be before the probe's answer is back here.
        if self._data is None:
            raise ProtocolError("the runner named a data-plane payload on a channel without one")
        try:
            parts = await self._data.pull(need.key, need.layout)
        except DataPlaneError as exc:
            raise ChannelClosed(f"a payload's data connection failed ({exc})") from None
        self._last_seen = asyncio.get_running_loop().time()  # it moved every byte meanwhile
        return parts

    async def _send(self, type_: FrameType, id_: int = 0, payload: Payload = b"", **meta: Any) -> None:
        await self._writer.send(type_, id_, payload, **meta)

    async def start(self, kind: WorkKind, payload: Payload, *, link: bool, progress: bool, window: int,
                    on_finish: Callable[[], None], trace: dict[str, str] | None = None,
                    tokens: list[str] | None = None, track: bool = False) -> RemoteCall:
        if self.closed is not None:
            forget(tokens or [])
            on_finish()  # nothing was sent: hand the slot back
            raise RunnerLost(f"runner {self.runner_id} is gone: {self.closed}", runner_id=self.runner_id,
                             reason=self.closed)
        call = RemoteCall(self, next(self._ids), window, on_finish)
        call.tokens = tokens or []
        self._calls[call.id] = call
        try:
            extra: dict[str, Any] = {"tc": trace} if trace else {}  # the caller's trace context (W3C)
            if track:
                extra["tr"] = True  # track the resources in the result
            await self._send("call", call.id, payload, k=kind, l=link, p=progress, w=window, **extra)
        except ChannelClosed as exc:
            self._calls.pop(call.id, None)
            call.finish()
            if self._closing(exc.reason):  # seen here before the reader saw it: report the loss now
                self._spawn_loss(exc.reason)
            raise RunnerLost(f"runner {self.runner_id} went away while the call was sent: {exc.reason}",
                             runner_id=self.runner_id, reason=exc.reason) from None
        except BaseException:
            self._calls.pop(call.id, None)
            call.finish()
            raise
        return call

    def grant(self, id_: int, n: int) -> None:
        self._spawn(self._send_quietly("credit", id_, c=n))

    def cancel(self, id_: int) -> None:
        self._spawn(self._send_quietly("cancel", id_))

    def _spawn(self, coro: Awaitable[None]) -> None:
        if self.closed is None:
            task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _send_quietly(self, type_: FrameType, id_: int = 0, **meta: Any) -> None:
        try:
            await self._send(type_, id_, **meta)
        except (ChannelClosed, FlameError):
            pass

    async def _reader(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                message = await self._channel.recv()
                self._last_seen = loop.time()
                for raw in split(message):
                    try:
                        frame = self._opener.open(raw)
                    except NeedsData as need:  # its payload is on the data plane: fetch it first
                        frame = self._opener.open(raw, await self._pull(need))
                    type_ = frame.type
                    if is_transfer(type_):
                        self.hub.handle(type_, frame.meta, frame.whole())
                        continue
                    call = self._calls.get(frame.id) if frame.id else None
                    if call is not None and is_work_reply(type_):
                        if type_ in TERMINAL:
                            del self._calls[frame.id]
                        call.deliver(type_, frame.payload)
                    elif type_ == "credit" and call is not None:
                        call.add_message_credit(int(frame.meta.get("c", 0)))
                    elif type_ == "recycle":
                        self._on_recycle(str(frame.meta.get("reason", "")))
                    elif type_ == "ping" and frame.meta.get("r") and self._beacons is not None:
                        self._spawn(self._send_quietly("ping"))  # it has work in flight: show the channel works
        except ChannelClosed as exc:
            await self._lose(exc.reason)
        except FlameError as exc:
            await self._lose(f"the runner sent an invalid message ({exc})")

    async def _heartbeat(self) -> None:
        # One timer per channel that wakes for the next ping or, if sooner, the moment the
        # runner's silence reaches the timeout: the loss is seen at the timeout, not up to an
        # interval later, whatever the interval. An idle channel to a runner on this host
        # sends no ping: each tick stamps our beacon and reads the runner's (_wire.liveness).
        # Pings fall on a grid shared by every channel of this loop (_base.ticks): one wake
        # of an idle parent serves all its runners' heartbeats, not one wake per runner.
        loop = asyncio.get_running_loop()
        next_ping = on_grid(loop.time() + self._interval, self._interval)
        while True:
            silent_until = self._last_seen + self._timeout + 0.001
            await asyncio.sleep(max(0.0, min(next_ping, silent_until) - loop.time()))
            now = loop.time()
            if self._data is not None and self._data.busy:
                self._last_seen = now  # a payload is moving on the data plane: the runner is there
            due = now >= next_ping
            if due:
                next_ping = on_grid(now + self._interval, self._interval)
            self._last_seen, ping = heartbeat(self._beacons, now, self._last_seen, due=due,
                                              in_flight=bool(self._calls) or not self.hub.quiet,
                                              owes_ack=self._shm.owes_ack)
            if now - self._last_seen > self._timeout:
                await self._lose(f"no heartbeat for {self._timeout:g} s (network partition or hung runner)",
                                 unreachable=True)
                return
            if ping is not None:
                await self._send_quietly("ping", **ping)

    def _closing(self, reason: str) -> bool:
        """Mark the channel gone, synchronously: from now on no call is placed on this runner."""
        if self.closed is not None:
            return False
        self.closed = reason
        self._let_go()
        self._on_closing()
        return True

    def _let_go(self) -> None:
        """Our beacon reads as stale from now on: a runner we gave up on (its loop stopped,
        then went on) ends itself at its next tick instead of living on unwatched."""
        for beacon in (self._offered, self._beacons):
            if beacon is not None:
                beacon.close()
        self._offered = self._beacons = None

    def _spawn_loss(self, reason: str) -> None:
        task = asyncio.get_running_loop().create_task(self._report_loss(reason))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _lose(self, reason: str, *, unreachable: bool = False) -> None:
        if self._closing(reason):
            await self._report_loss(reason, unreachable=unreachable)

    async def _report_loss(self, reason: str, *, unreachable: bool = False) -> None:
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        try:
            # Long enough for a backend to ask its API how the runner ended; a process
            # backend answers in milliseconds.
            ended = await asyncio.wait_for(self._describe_loss(), self._describe_timeout)
        except (TimeoutError, Exception):
            ended = None
        why = f"{reason}; {ended}" if ended else reason
        error = RunnerLost(f"runner {self.runner_id} was lost: {why}", runner_id=self.runner_id, reason=why)
        self._fail_calls(error, why)
        self._on_lost(why, loss_label(ended, unreachable))
        self._writer.close()
        self._shm.close()
        self._channel.abort()  # no closing handshake with a runner that is gone

    def _fail_calls(self, error: RunnerLost, reason: str) -> None:
        calls, self._calls = self._calls, {}
        for call in calls.values():
            call.deliver("lost", error)
        self.hub.close(reason)

    async def aclose(self, reason: str) -> None:
        """Tell the runner to stop and close the channel; calls still in flight are lost."""
        if self.closed is not None:
            return
        # Marked closed first: a loss noticed while "stop" is on its way is not a second end.
        self.closed = reason
        for task in self._tasks:
            task.cancel()
        try:  # a runner that stopped reading must not hold up the shutdown
            await self._writer.send("stop")
            await asyncio.wait_for(self._writer.flush(), 2.0)
        except (TimeoutError, ChannelClosed, FlameError):
            pass
        self._writer.close()
        self._fail_calls(RunnerLost(f"runner {self.runner_id} was stopped ({reason})", runner_id=self.runner_id,
                                    reason=reason), reason)
        self._shm.close()
        self._let_go()
        try:
            await self._channel.aclose(reason)
        except Exception:
            pass
