"""Large payloads over a TCP connection of their own, beside the WebSocket (the data plane).

A 100 MB payload that crosses a WebSocket is copied some nine times on its way (pickle
parts joined into a frame, masked by the client, buffered by both ends' protocol code,
reassembled by the server) and reaches ~110 MB/s round trip on this kind of machine, where
a plain TCP connection between the same two processes moves ~400 MB/s. So a channel to a
runner on another host, or in a container, sends each payload from ``DATA_MIN`` bytes as
two things: its frame on the WebSocket, exactly as always (signed header, layout, Poly1305
tag, sequence number), but with the payload left out and named (``dp``: the frame's
sequence number); and the payload's bytes on a new TCP connection to the same address and
port, written and read with one blocking system call per part on a worker thread (the
kernel copies straight out of the sender's ``bytes`` and into the receiver's, and the
event loop goes on with heartbeats meanwhile). The receiver opens the frame with those
bytes as its payload: the same checks run, in the same order, and nothing is unpickled
before the tag matches.

The parent always opens the connection (a runner's parent may be unreachable from the
runner: behind NAT, outside the cluster): to *push* a payload it sends, and to *pull* one
the runner sent. Every connection begins with ``MAGIC`` and a *request*: a JSON header
(session, a request counter that only grows, what to do, the payload's layout) signed
with the channel's parent-to-runner key, in a domain of its own (a request can never pass
for a frame). The runner's port is uvicorn's (``_runner.dataport`` tells the two kinds of
connection apart by their first bytes), so a Docker published port, a Kubernetes pod port
and any L4 path that carries the WebSocket carry this too. The runner answers ``OK``
only to a request that passes: a known session, a valid signature, a counter above every
one before it (a replayed request is refused), a size within the limit; only then is
anything allocated. A parent uses the data plane only after a first request (a probe)
came back ``OK``, so a path that does not carry it (a proxy that speaks only HTTP) costs
nothing but that probe.

What it protects, and what it does not: the bytes are authenticated exactly as on the
WebSocket, and no more private (``ws://`` is not encrypted either; a channel over TLS
does not use the data plane).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import socket
import struct
import time
from collections.abc import Sequence
from typing import Any

from flame_asgi._wire.codec import MAX_AGE_SECONDS, FrameKey

MAGIC = b"FLAME-DATA/1\n"  # not an HTTP request line: no HTTP client ever starts with it
DATA_MIN = 1024 * 1024  # payloads from this size take the data plane
MAX_REQUEST = 4096  # a request header longer than this is refused before it is read
OK = b"\x01"
_LEN = struct.Struct(">H")
_SIG = 32
_DOMAIN = b"flame-asgi data request\n"  # what is signed: never a frame header
_MAX_PARTS = 1 + 65_536
_encode = json.JSONEncoder(separators=(",", ":")).encode
_executor: concurrent.futures.ThreadPoolExecutor | None = None  # made on first use: never before a fork


class DataPlaneError(Exception):
    """A data-plane request failed: refused, cut, or timed out."""


def sign_request(key: FrameKey, header: dict[str, Any]) -> bytes:
    raw = _encode(header).encode()
    return b"".join((MAGIC, _LEN.pack(len(raw)), raw, key.sign(_DOMAIN + raw)))


def read_request(key_of: Any, data: bytes) -> tuple[dict[str, Any], Any] | None:
    """A verified request from the bytes after ``MAGIC`` (length, header, signature), with
    the object ``key_of(session)`` found for its session, or None for anything else: too
    short, too long, unknown session, bad signature, stale. ``key_of`` returns (key, end) or
    None."""
    if len(data) < _LEN.size:
        return None
    (hlen,) = _LEN.unpack_from(data)
    if hlen > MAX_REQUEST or len(data) != _LEN.size + hlen + _SIG:
        return None
    raw = data[_LEN.size:_LEN.size + hlen]
    try:
        header = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(header, dict):
        return None
    found = key_of(header.get("s"))
    if found is None:
        return None
    key, end = found
    if not key.verify(_DOMAIN + raw, data[_LEN.size + hlen:]):
        return None
    ts = header.get("ts")
    if type(ts) is not int or abs(time.time() - ts) > MAX_AGE_SECONDS:
        return None
    return header, end


def request_size(data: bytes) -> int | None:
    """How many bytes after ``MAGIC`` a request takes, once its length is in ``data``."""
    if len(data) < _LEN.size:
        return None
    (hlen,) = _LEN.unpack_from(data)
    return _LEN.size + int(hlen) + _SIG


def check_layout(layout: Any, max_payload: int) -> list[int] | None:
    if (not isinstance(layout, list) or not 1 <= len(layout) <= _MAX_PARTS
            or not all(type(n) is int and n >= 0 for n in layout) or sum(layout) > max_payload):
        return None
    return layout


def run(fn: Any, *args: Any) -> asyncio.Future[Any]:
    """Run blocking socket work on the data plane's threads (they release the GIL in every
    system call)."""
    global _executor
    if _executor is None:
        _executor = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="flame-data")
    return asyncio.get_running_loop().run_in_executor(_executor, fn, *args)


def stall_timeout(sock: socket.socket, seconds: float) -> None:
    """Fail a blocking send or receive that moves nothing for ``seconds`` (the kernel's own
    timeout: Python's would make the socket non-blocking, and a large receive piecemeal)."""
    whole = int(seconds)
    value = struct.pack("ll", whole, int((seconds - whole) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)


def send_parts(sock: socket.socket, parts: Sequence[bytes | memoryview]) -> None:
    for part in parts:
        sock.sendall(part)


def recv_parts(sock: socket.socket, layout: Sequence[int]) -> list[bytes]:
    """Each part into a ``bytes`` of its own, one receive each (``MSG_WAITALL``: the kernel
    fills the object the unpickler will hand on; no copy after it)."""
    parts = []
    for n in layout:
        part = sock.recv(n, socket.MSG_WAITALL) if n else b""
        while len(part) < n:  # a signal, or a stall that reached the timeout
            more = sock.recv(n - len(part), socket.MSG_WAITALL)
            if not more:
                raise DataPlaneError(f"the connection ended after {len(part):,} of {n:,} bytes")
            part += more
        parts.append(part)
    return parts


class DataClient:
    """The parent's side of one runner's data plane: one request at a time, in order."""

    def __init__(self, address: tuple[Any, ...], key: FrameKey, session: str, timeout: float) -> None:
        self._address = address
        self._key = key
        self._session = session
        self._timeout = timeout
        self._counter = 0
        self._lock = asyncio.Lock()
        self.ready = False  # a probe came back OK: payloads may take this path

    @property
    def busy(self) -> bool:
        """A request is on its way (one at a time: the lock is held for its whole length)."""
        return self._lock.locked()

    def __repr__(self) -> str:
        return f"<DataClient {self._address[0]}:{self._address[1]}>"

    async def probe(self) -> bool:
        try:
            await self._request("probe", [], None)
        except (DataPlaneError, OSError):
            return False
        self.ready = True
        return True

    async def push(self, seq: int, parts: Sequence[bytes | memoryview]) -> None:
        await self._request("push", [len(p) for p in parts], seq, send=parts)

    async def pull(self, seq: int, layout: list[int]) -> list[bytes]:
        parts = await self._request("pull", layout, seq)
        assert parts is not None
        return parts

    async def _request(self, op: str, layout: list[int], seq: int | None,
                       send: Sequence[bytes | memoryview] = ()) -> list[bytes] | None:
        async with self._lock:  # requests in counter order: the runner refuses one that is not
            self._counter += 1
            header = {"s": self._session, "c": self._counter, "ts": int(time.time()), "op": op, "b": layout}
            if seq is not None:
                header["k"] = seq
            request = sign_request(self._key, header)
            parts: list[bytes] | None = await run(self._exchange, request, op, layout, send)
            return parts

    def _exchange(self, request: bytes, op: str, layout: list[int],
                  send: Sequence[bytes | memoryview]) -> list[bytes] | None:
        try:
            sock = socket.create_connection(self._address[:2], timeout=self._timeout)
        except OSError as exc:
            raise DataPlaneError(f"cannot connect to {self._address[0]}:{self._address[1]} ({exc})") from None
        try:
            sock.settimeout(None)  # blocking: one receive per part (see recv_parts)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            stall_timeout(sock, self._timeout)
            sock.sendall(request)
            if sock.recv(1, socket.MSG_WAITALL) != OK:
                raise DataPlaneError("the runner refused the request")
            if op == "push":
                send_parts(sock, send)
                if sock.recv(1, socket.MSG_WAITALL) != OK:  # all of it arrived
                    raise DataPlaneError("the runner did not confirm the payload")
                return None
            if op == "pull":
                return recv_parts(sock, layout)
            return None
        except OSError as exc:
            raise DataPlaneError(f"data connection failed ({exc})") from None
        finally:
            sock.close()
