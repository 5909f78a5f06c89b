"""Large payloads on the data plane: a TCP connection of their own beside the WebSocket, to
a runner whose memory the parent cannot read (another host, a container). Here a real
ProcessBackend runner with the shared-memory path turned off in the parent, so its
channel is what a runner elsewhere gets; DockerBackend's is in tests/backends/test_docker.py."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from flame_asgi import FlamePool, ProcessBackend
from flame_asgi._wire import connection, dataplane
from flame_asgi._wire.channel import WebSocketClientChannel
from flame_asgi._wire.codec import FrameKey
from flame_asgi._wire.dataplane import DATA_MIN, MAGIC, OK, DataClient, sign_request
from tests import remote
from tests.conftest import until

Requests = list[tuple[str, bytes]]


@pytest.fixture
def requests(monkeypatch: pytest.MonkeyPatch) -> Requests:
    """Turn the shared memory off in this parent, and record every data-plane request it
    sends (the real ones: the exchange runs unchanged)."""
    monkeypatch.setattr(connection, "shm_available", lambda: False)
    seen: Requests = []
    real = DataClient._exchange

    def recording(self: DataClient, request: bytes, op: str, *args: Any) -> Any:
        seen.append((op, request))
        return real(self, request, op, *args)

    monkeypatch.setattr(DataClient, "_exchange", recording)
    return seen


@pytest.fixture
async def pool(requests: Requests) -> AsyncIterator[FlamePool]:
    async with FlamePool("dp", backend=ProcessBackend(), min=1, max=1, timeout=60) as pool:
        (runner,) = pool._runners
        await until(lambda: runner.conn._data is not None and runner.conn._data.ready, what="the probe")
        yield pool


def data_client(pool: FlamePool) -> DataClient:
    (runner,) = pool._runners
    assert runner.conn._data is not None
    return runner.conn._data


def address(pool: FlamePool) -> tuple[str, int]:
    host, port = data_client(pool)._address[:2]
    return host, port


def answer(request: bytes, addr: tuple[str, int], pause: float = 0.0) -> bytes:
    """What the runner's port answers to ``request`` (b"" when it closes without a word)."""
    with socket.create_connection(addr, timeout=10) as sock:
        if pause:
            for i in range(len(request)):  # one byte at a time: the request arrives in pieces
                sock.sendall(request[i:i + 1])
                time.sleep(pause)
        else:
            sock.sendall(request)
        try:
            return sock.recv(1)
        except ConnectionResetError:
            return b""


async def test_large_payloads_cross_on_the_data_plane_both_ways(pool: FlamePool, requests: Requests) -> None:
    assert [op for op, _ in requests] == ["probe"]
    data = os.urandom(3 * DATA_MIN)
    back = await pool.call(remote.echo, data)
    assert back == data and type(back) is bytes
    assert [op for op, _ in requests] == ["probe", "push", "pull"]
    # Pickled with buffers beside the pickle: a structure that holds large bytes.
    nested = {"a": data, "b": [data[:DATA_MIN], 7], "c": "text"}
    assert await pool.call(remote.echo, nested) == nested
    assert [op for op, _ in requests][3:] == ["push", "pull"]
    # Small payloads stay on the WebSocket; a large one one way only takes one request.
    assert await pool.call(remote.echo, b"x" * 1000) == b"x" * 1000
    assert await pool.call(len, data) == len(data)
    assert [op for op, _ in requests][5:] == ["push"]


async def test_a_stranger_on_the_runners_port_gets_nothing_and_costs_nothing(pool: FlamePool,
                                                                             requests: Requests) -> None:
    addr = address(pool)
    pid = await pool.call(os.getpid)
    client = data_client(pool)
    probe = requests[0][1]
    header = json.loads(probe[len(MAGIC) + 2:-32])
    fresh = {**header, "c": header["c"] + 100, "ts": int(time.time())}
    stranger = FrameKey(b"s" * 32)
    refused = {
        "garbage after the magic": MAGIC + b"\xff\xff" + b"x" * 64,
        "a header longer than any request": MAGIC + struct.pack(">H", 65_000) + b"{" * 100,
        "a request signed with another key": sign_request(stranger, fresh),
        "a request for another session": sign_request(client._key, {**fresh, "s": "0" * 32}),
        "the parent's own probe, replayed": probe,
        "a stale request": sign_request(client._key, {**fresh, "ts": int(time.time()) - 3600}),
        "a push larger than the runner's limit": sign_request(client._key, {**fresh, "op": "push", "k": 99,
                                                                            "b": [1 << 40]}),
        "a pull of nothing the runner holds": sign_request(client._key, {**fresh, "op": "pull", "k": 99,
                                                                         "b": [10]}),
        "an unknown operation": sign_request(client._key, {**fresh, "op": "exec"}),
        "more than a request before the answer": sign_request(client._key, fresh) + b"x" * 1000,
    }
    for what, request in refused.items():
        assert await asyncio.to_thread(answer, request, addr) == b"", what
    # Bytes that begin like the magic and then are not go to uvicorn, which answers them.
    assert await asyncio.to_thread(answer, b"FLAMINGO / HTTP/1.1\r\nHost: x\r\n\r\n", addr) == b"H"
    # The same port still serves HTTP (and the parent's WebSocket) as before.
    async with httpx.AsyncClient() as http:
        assert (await http.get(f"http://{addr[0]}:{addr[1]}/_flame/health")).status_code == 200
    data = os.urandom(2 * DATA_MIN)
    assert await pool.call(remote.echo, data) == data
    assert await pool.call(os.getpid) == pid  # the same runner: nothing crashed, nothing was lost


async def test_a_request_that_arrives_in_pieces_is_read_whole(pool: FlamePool) -> None:
    client = data_client(pool)
    # Signed with the parent's key, as the parent would (a counter above its own).
    header = {"s": client._session, "c": client._counter + 1_000, "ts": int(time.time()), "op": "probe", "b": []}
    assert await asyncio.to_thread(answer, sign_request(client._key, header), address(pool), 0.001) == OK
    data = os.urandom(2 * DATA_MIN)
    client._counter += 1_000  # the runner has seen that counter now: the parent's go on from there
    assert await pool.call(remote.echo, data) == data


async def test_a_path_that_does_not_carry_the_data_plane_leaves_payloads_on_the_websocket(
        requests: Requests, monkeypatch: pytest.MonkeyPatch) -> None:
    # As if an HTTP-only proxy stood between: the data connection reaches a port that
    # accepts and closes at once, so the probe fails and the WebSocket carries everything.
    server = socket.create_server(("127.0.0.1", 0))
    closing = asyncio.get_running_loop().create_task(asyncio.to_thread(_accept_and_close, server))
    real_init = WebSocketClientChannel.__init__

    def elsewhere(self: WebSocketClientChannel, ws: Any) -> None:
        real_init(self, ws)
        self.data_address = server.getsockname()

    monkeypatch.setattr(WebSocketClientChannel, "__init__", elsewhere)
    try:
        async with FlamePool("dp-none", backend=ProcessBackend(), min=1, max=1, timeout=60) as pool:
            (runner,) = pool._runners
            await until(lambda: requests != [], what="the probe")
            data = os.urandom(2 * DATA_MIN)
            assert await pool.call(remote.echo, data) == data
            assert runner.conn._data is not None and not runner.conn._data.ready
            assert [op for op, _ in requests] == ["probe"]
    finally:
        server.close()
        await closing


def _accept_and_close(server: socket.socket) -> None:
    try:
        conn, _ = server.accept()
        conn.close()
    except OSError:
        pass


def test_a_data_plane_request_is_never_a_frame() -> None:
    # Signed in a domain of its own: the same key's frame signature over the same bytes differs.
    key = FrameKey(b"k" * 32)
    request = sign_request(key, {"s": "x", "c": 1, "ts": 0, "op": "probe", "b": []})
    raw = request[len(MAGIC) + 2:-32]
    assert request[-32:] != key.sign(raw)
    assert dataplane.read_request(lambda s: (key, None), request[len(MAGIC):]) is None  # stale: ts 0
