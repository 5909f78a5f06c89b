"""The runner's end of the data plane (``_wire.dataplane``), on uvicorn's own port.

``sniffing(protocol_class)`` wraps the HTTP protocol class uvicorn would use: a new
connection is held until its first bytes arrive; one that starts with ``MAGIC`` is the
parent's data connection, and anything else is handed to uvicorn's protocol unchanged
(``transport.set_protocol``; uvicorn sees an ordinary connection whose first bytes have
just arrived). Only ``_serve`` (the server every backend runs) installs it: a runner under
another server has no data plane, says so in its ``ready``, and payloads stay on the
WebSocket.

A stranger who reaches the port and speaks the magic costs the runner a buffer of at most
``MAX_REQUEST`` bytes for at most ``REQUEST_TIMEOUT`` seconds, and then the connection:
nothing is allocated, started or answered before the request is verified.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Sequence
from typing import Any

from flame_asgi._wire.codec import FrameKey
from flame_asgi._wire.dataplane import (
    DATA_MIN,
    MAGIC,
    MAX_REQUEST,
    OK,
    DataPlaneError,
    check_layout,
    read_request,
    recv_parts,
    request_size,
    run,
    send_parts,
    stall_timeout,
)

log = logging.getLogger("flame_asgi.runner")
REQUEST_TIMEOUT = 10.0
# Pushed payloads not yet claimed by their frame, per session. Only the parent can push
# (requests are signed), and each push waits for the one before it, so this bounds a
# parent gone wrong, not a stranger; its frames are claimed as they arrive.
MAX_PENDING = 256

serving = False  # set by _serve before uvicorn starts: this process's port speaks the data plane
_ends: dict[str, DataEnd] = {}


def _key_of(session: Any) -> tuple[FrameKey, DataEnd] | None:
    end = _ends.get(session) if isinstance(session, str) else None
    return None if end is None else (end.key, end)


class DataEnd:
    """One session's data plane on the runner: payloads pushed to it, and its own payloads
    waiting for the parent to pull them."""

    def __init__(self, session: str, key: FrameKey, max_payload: int, timeout: float,
                 on_reachable: Callable[[], None]) -> None:
        self.session = session
        self.key = key
        self._max_payload = max_payload
        self.timeout = timeout
        self._on_reachable = on_reachable
        self._counter = 0
        self._arrived: dict[int, list[bytes] | BaseException] = {}
        self._waiters: dict[int, asyncio.Future[None]] = {}
        self._expected: set[int] = set()  # pushes accepted and on their way
        self._outbox: dict[int, Sequence[bytes | memoryview]] = {}
        self._closed = False
        self._serving = 0  # pulls being sent
        self.reachable = False  # the parent's probe came through: our payloads may wait for its pull
        _ends[session] = self

    @property
    def busy(self) -> bool:
        """A payload is moving: pushed to us, or pulled from us."""
        return bool(self._expected) or self._serving > 0

    # -- the sealer's side: our own large payloads, for the parent to pull --------------------
    def wants(self, size: int) -> bool:
        return self.reachable and not self._closed and size >= DATA_MIN

    def put(self, seq: int, parts: Sequence[bytes | memoryview]) -> int:
        self._outbox[seq] = parts
        return seq

    # -- the reader's side: a frame names a payload that was pushed ---------------------------
    async def take(self, seq: int, layout: list[int]) -> list[bytes]:
        loop = asyncio.get_running_loop()
        waited = 0.0
        while seq not in self._arrived:
            if self._closed:
                raise DataPlaneError("session ended")
            future = self._waiters.setdefault(seq, loop.create_future())
            try:
                await asyncio.wait_for(asyncio.shield(future), self.timeout)
            except TimeoutError:
                waited += self.timeout
                if seq not in self._expected:  # never began: it is not coming
                    raise DataPlaneError(f"the payload of message {seq} did not arrive within {waited:g} s") from None
        got = self._arrived.pop(seq)
        self._waiters.pop(seq, None)
        if isinstance(got, BaseException):
            raise DataPlaneError(f"the payload of message {seq} did not arrive: {got}")
        if [len(p) for p in got] != layout:
            raise DataPlaneError(f"the payload of message {seq} does not match its frame's layout")
        return got

    def _arrive(self, seq: int, got: list[bytes] | BaseException) -> None:
        self._expected.discard(seq)
        if self._closed:
            return
        self._arrived[seq] = got
        future = self._waiters.get(seq)
        if future is not None and not future.done():
            future.set_result(None)

    # -- a verified request -------------------------------------------------------------------
    def accept(self, header: dict[str, Any]) -> tuple[str, int, list[int]] | None:
        """The request's (op, seq, layout) if it may be served now, else None."""
        counter, op, seq = header.get("c"), header.get("op"), header.get("k", 0)
        if self._closed or type(counter) is not int or counter <= self._counter or type(seq) is not int:
            return None  # a replay, or out of order
        if op == "probe":
            layout: list[int] | None = [] if header.get("b") == [] else None
        else:
            layout = check_layout(header.get("b"), self._max_payload)
        if layout is None:
            return None
        if op == "push":
            if seq in self._arrived or seq in self._expected or len(self._arrived) + len(self._expected) >= MAX_PENDING:
                return None
            self._expected.add(seq)
        elif op == "pull":
            parts = self._outbox.get(seq)
            if parts is None or [len(p) for p in parts] != layout:
                return None
        elif op != "probe":
            return None
        self._counter = counter
        if not self.reachable:
            self.reachable = True
            self._on_reachable()
        return op, seq, layout

    def take_outgoing(self, seq: int) -> Sequence[bytes | memoryview]:
        return self._outbox.pop(seq)

    def close(self) -> None:
        self._closed = True
        _ends.pop(self.session, None)
        self._outbox.clear()
        self._arrived.clear()
        for future in self._waiters.values():
            if not future.done():
                future.set_result(None)


class _Sniffer(asyncio.Protocol):
    """Tells the parent's data connections from HTTP by their first bytes."""

    def __init__(self, inner: Callable[[], asyncio.Protocol]) -> None:
        self._inner = inner
        self._transport: asyncio.Transport | None = None
        self._buffer = b""
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport

    def data_received(self, data: bytes) -> None:
        assert self._transport is not None
        self._buffer += data
        head = self._buffer[:len(MAGIC)]
        if not MAGIC.startswith(head):  # HTTP (or anything else): uvicorn's, untouched
            self._hand_over()
            return
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(REQUEST_TIMEOUT, self._transport.abort)
        rest = self._buffer[len(MAGIC):]
        size = request_size(rest) if len(head) == len(MAGIC) else None
        if size is None:
            return  # the magic, or the request's length, is still on its way
        if size > MAX_REQUEST + 64 or len(rest) > size:
            self._drop()  # too long, or more than a request before our answer: not our parent
        elif len(rest) == size:
            self._timer.cancel()
            self._serve(rest)

    def _hand_over(self) -> None:
        assert self._transport is not None
        if self._timer is not None:  # it began like the magic, then was not: uvicorn's timeouts now
            self._timer.cancel()
        protocol = self._inner()
        protocol.connection_made(self._transport)
        self._transport.set_protocol(protocol)
        data, self._buffer = self._buffer, b""
        protocol.data_received(data)

    def _drop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._transport is not None:
            self._transport.abort()

    def eof_received(self) -> bool | None:
        self._drop()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def _serve(self, request: bytes) -> None:
        transport = self._transport
        assert transport is not None
        verified = read_request(_key_of, request)
        accepted = verified[1].accept(verified[0]) if verified is not None else None
        if verified is None or accepted is None:
            transport.abort()  # no answer: a stranger learns nothing, not even why
            return
        end: DataEnd = verified[1]
        op, seq, layout = accepted
        if op == "probe":
            transport.write(OK)
            transport.close()
            return
        transport.pause_reading()
        raw = transport.get_extra_info("socket")
        sock = socket.socket(fileno=os.dup(raw.fileno()))
        sock.setblocking(True)  # ours alone from here: the transport neither reads nor writes again
        stall_timeout(sock, end.timeout)
        outgoing = end.take_outgoing(seq) if op == "pull" else ()
        end._serving += op == "pull"
        future = run(_transfer, sock, op, layout, outgoing)

        def done(f: asyncio.Future[Any]) -> None:
            transport.abort()
            end._serving -= op == "pull"
            exc = f.exception()
            if op == "push":
                end._arrive(seq, exc if exc is not None else f.result())
            elif exc is not None:
                log.warning("runner: the parent's pull of message %s failed: %s", seq, exc)

        future.add_done_callback(done)


def _transfer(sock: socket.socket, op: str, layout: list[int],
              outgoing: Sequence[bytes | memoryview]) -> list[bytes] | None:
    try:
        sock.sendall(OK)
        if op == "push":
            parts = recv_parts(sock, layout)
            sock.sendall(OK)
            return parts
        send_parts(sock, outgoing)
        return None
    except OSError as exc:
        raise DataPlaneError(str(exc)) from None
    finally:
        sock.close()


def sniffing(protocol_class: type[asyncio.Protocol]) -> Callable[..., asyncio.Protocol]:
    """A protocol factory for ``uvicorn.Config(http=...)``: uvicorn's ``protocol_class``
    for HTTP and WebSockets, the data plane for connections that start with ``MAGIC``."""

    class SniffingProtocol(_Sniffer):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(lambda: protocol_class(**kwargs))

    return SniffingProtocol
