"""Message channels between a parent and a runner: in memory, or one WebSocket.

A channel moves whole binary messages in order and reports its end as ChannelClosed.
It knows nothing of signing: that is ``_codec``'s job, on top of any channel.
"""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any, Protocol

from starlette.types import Receive, Send
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State


class ChannelClosed(Exception):
    """The other end went away; ``reason`` says how, when known."""

    def __init__(self, reason: str = "channel closed") -> None:
        super().__init__(reason)
        self.reason = reason


def _is_loopback(address: Any) -> bool:
    """Is this (host, port, ...) socket address the loopback interface's?"""
    try:
        return ipaddress.ip_address(str(address[0]).split("%")[0]).is_loopback
    except (TypeError, IndexError, ValueError):
        return False


class Channel(Protocol):
    # The peer is reached over the loopback interface: no network lies between the two
    # processes that a partition could cut (a runner in another network namespace is not).
    loopback: bool
    # Where the parent may open a data connection of its own to the runner (_wire.dataplane):
    # the address its WebSocket reached, over plain TCP; None for any other channel.
    data_address: tuple[Any, ...] | None

    async def send(self, data: bytes) -> None: ...

    def send_now(self, data: bytes) -> bool:
        """Write ``data`` at once if that needs no waiting (True); False: use ``send``."""

    async def recv(self) -> bytes: ...

    async def aclose(self, reason: str = "closed") -> None: ...

    def abort(self) -> None:
        """Drop the channel at once, without a closing handshake (the peer is gone)."""


class MemoryChannel:
    """One end of an in-process pair (LocalBackend)."""

    loopback = False  # in one process: nothing to watch that the channel itself does not show
    data_address: tuple[Any, ...] | None = None

    def __init__(self) -> None:
        self._inbox: asyncio.Queue[bytes | ChannelClosed] = asyncio.Queue()
        self.peer: MemoryChannel | None = None
        self._closed: ChannelClosed | None = None

    @classmethod
    def pair(cls) -> tuple[MemoryChannel, MemoryChannel]:
        a, b = cls(), cls()
        a.peer, b.peer = b, a
        return a, b

    async def send(self, data: bytes) -> None:
        if self._closed is not None:
            raise self._closed
        assert self.peer is not None
        if self.peer._closed is None:
            self.peer._inbox.put_nowait(data)

    def send_now(self, data: bytes) -> bool:
        if self._closed is not None:
            return False  # send() raises the reason
        assert self.peer is not None
        if self.peer._closed is None:
            self.peer._inbox.put_nowait(data)
        return True

    async def recv(self) -> bytes:
        if self._closed is not None:
            raise self._closed
        item = await self._inbox.get()
        if isinstance(item, ChannelClosed):
            self._closed = item
            raise item
        return item

    async def aclose(self, reason: str = "closed") -> None:
        self.close(reason)

    def abort(self) -> None:
        self.close("aborted")

    def close(self, reason: str = "closed") -> None:
        if self._closed is None:
            self._closed = ChannelClosed(reason)
            self._inbox.put_nowait(self._closed)
            if self.peer is not None and self.peer._closed is None:
                self.peer._inbox.put_nowait(ChannelClosed(f"peer closed: {reason}"))


class WebSocketClientChannel:
    """The parent's end: a websockets client connection to ``/_flame/ws``."""

    def __init__(self, ws: ClientConnection) -> None:
        self._ws = ws
        self.loopback = _is_loopback(ws.remote_address)
        plain = ws.transport.get_extra_info("sslcontext") is None
        self.data_address: tuple[Any, ...] | None = tuple(ws.remote_address) if plain else None

    async def send(self, data: bytes) -> None:
        try:
            await self._ws.send(data)
        except ConnectionClosed as exc:
            raise ChannelClosed(f"websocket closed ({exc})") from None

    def send_now(self, data: bytes) -> bool:
        # What ``send`` does when it has nothing to wait for (an open connection whose
        # writes are not paused): the frame goes to the transport now, without a trip
        # through the event loop. Anything else (closing, back-pressure) takes ``send``.
        ws = self._ws
        if ws.protocol.state is not State.OPEN or ws.paused or ws.transport.is_closing():
            return False
        ws.protocol.send_binary(data)
        ws.send_data()
        return True

    async def recv(self) -> bytes:
        try:
            data = await self._ws.recv()
        except ConnectionClosed as exc:
            raise ChannelClosed(f"websocket closed ({exc})") from None
        if isinstance(data, str):
            raise ChannelClosed("unexpected text message")
        return data

    async def aclose(self, reason: str = "closed") -> None:
        await self._ws.close(1000, reason[:100])

    def abort(self) -> None:
        # A closing handshake with a peer that is gone (killed, partitioned) would wait for
        # websockets' close timeout (10 s) and keep the socket open past the pool's end.
        self._ws.transport.abort()


class ASGIWebSocketChannel:
    """The runner's end: an accepted ASGI WebSocket."""

    def __init__(self, receive: Receive, send: Send, client: Any = None) -> None:
        self.loopback = _is_loopback(client)  # the ASGI scope's "client": the parent's address
        self.data_address: tuple[Any, ...] | None = None  # the parent opens data connections, never the runner
        self._receive = receive
        self._send = send
        self._closed = False
        self._lock = asyncio.Lock()  # ASGI servers do not promise concurrent sends are safe

    async def send(self, data: bytes) -> None:
        if self._closed:
            raise ChannelClosed("websocket closed")
        async with self._lock:
            try:
                await self._send({"type": "websocket.send", "bytes": data})
            except (OSError, RuntimeError) as exc:  # the client is gone
                self._closed = True
                raise ChannelClosed(f"websocket send failed ({exc})") from None

    async def recv(self) -> bytes:
        while True:
            message = await self._receive()
            if message["type"] == "websocket.disconnect":
                self._closed = True
                raise ChannelClosed(f"parent disconnected (code {message.get('code')})")
            data = message.get("bytes")
            if data is not None:
                return bytes(data)

    def send_now(self, data: bytes) -> bool:
        return False  # an ASGI send is a coroutine: it may wait before it writes

    def abort(self) -> None:
        self._closed = True  # the server owns the socket: it closes when the app returns

    async def aclose(self, reason: str = "closed") -> None:
        if not self._closed:
            self._closed = True
            try:
                await self._send({"type": "websocket.close", "code": 1000, "reason": reason[:100]})
            except (OSError, RuntimeError):
                pass
