"""Large files and byte streams between parent and runner, in signed chunks, on demand.

Wrap a source in ``Upload`` and pass it as an argument (or return it from remote code):
it is pickled as a token, and the other side gets a ``RemoteBytes`` that pulls chunks
over the same signed channel as it reads them, a few at a time. Neither side ever holds
more than ``CHUNK_WINDOW`` chunks of it, so a 10 GB file crosses with a few MB of memory.

Frames (all signed like every other): ``pull`` (reader asks for more chunks of token
``x``), ``chunk``/``eof``/``abort`` (the source's answer), ``drop`` (reader stops early).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import secrets
import threading
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from typing import Any, BinaryIO, Literal

from flame_asgi._base.exceptions import PayloadTooLarge, TransferError
from flame_asgi._base.settings import MAX_TRANSFER
from flame_asgi._wire.protocol import SendFrame, Transfer, TransferAnswer
from flame_asgi._wire.tracking import noticed

CHUNK_SIZE = 1 << 20
CHUNK_WINDOW = 4  # chunks in flight per transfer

Source = str | os.PathLike[str] | bytes | bytearray | memoryview | BinaryIO | Any


class Upload:
    """A file or byte stream to send to the other side in chunks.

    ``source``: a path, bytes, a binary file object, or a (sync or async) iterable of
    bytes. ``limit`` caps the total size (default ``FLAME_MAX_TRANSFER``, 16 GiB): past
    it the transfer fails with ``PayloadTooLarge`` on both sides.
    """

    def __init__(self, source: Source, *, chunk_size: int = CHUNK_SIZE, limit: int | None = None) -> None:
        self.source = source
        self.chunk_size = chunk_size
        self.limit = MAX_TRANSFER.read() if limit is None else limit
        self.size: int | None = None
        if isinstance(source, (str, os.PathLike)):
            self.size = os.path.getsize(source)
        elif isinstance(source, (bytes, bytearray, memoryview)):
            self.size = len(source)
        if self.size is not None and self.size > self.limit:
            raise PayloadTooLarge(f"upload of {self.size:,} bytes exceeds its {self.limit:,}-byte limit "
                                  "(FLAME_MAX_TRANSFER or Upload(limit=...))")

    def __repr__(self) -> str:
        return f"<Upload size={self.size} chunk_size={self.chunk_size}>"

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled as a token: the source stays here, the other side pulls it in chunks.
        token = register(self)
        tokens = _tokens.get()
        if tokens is not None:
            tokens.append(token)
        return (_receive, (token, self.size, self.limit))

    async def chunks(self) -> AsyncIterator[bytes]:
        src = self.source
        if isinstance(src, (bytes, bytearray, memoryview)):
            view = memoryview(src)
            for start in range(0, len(view), self.chunk_size):
                yield bytes(view[start:start + self.chunk_size])
        elif isinstance(src, (str, os.PathLike)):
            f = await asyncio.to_thread(open, src, "rb")
            try:
                while chunk := await asyncio.to_thread(f.read, self.chunk_size):
                    yield chunk
            finally:
                f.close()
        elif hasattr(src, "read"):
            while chunk := await asyncio.to_thread(src.read, self.chunk_size):
                yield chunk
        elif hasattr(src, "__aiter__"):
            async for chunk in src:
                yield bytes(chunk)
        else:
            it = iter(src)
            end = object()
            while (item := await asyncio.to_thread(_next, it, end)) is not end:
                yield bytes(item)


_tokens: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("flame_upload_tokens", default=None)
_hub: contextvars.ContextVar[TransferHub | None] = contextvars.ContextVar("flame_transfer_hub", default=None)


@contextlib.contextmanager
def collecting_tokens(tokens: list[str] | None) -> Iterator[None]:
    """While pickling: record the tokens of the Uploads pickled."""
    reset = _tokens.set(tokens)
    try:
        yield
    finally:
        _tokens.reset(reset)


@contextlib.contextmanager
def receiving_through(hub: TransferHub | None) -> Iterator[None]:
    """While unpickling: Upload tokens become RemoteBytes read through ``hub``."""
    reset = _hub.set(hub)
    try:
        yield
    finally:
        _hub.reset(reset)


def _receive(token: str, size: int | None, limit: int) -> RemoteBytes:
    hub = _hub.get()
    if hub is None:
        raise TransferError("an Upload can only be received as part of a flame_asgi call")
    reader = hub.remote(token, size, limit)
    noticed("drop", token, reader)  # in a tracked result, it keeps its runner up until read
    return reader


# Uploads pickled in this process, waiting to be pulled: token -> Upload. A token is
# only meaningful to a peer holding the channel key, and only over that channel.
_sources: dict[str, Upload] = {}
_sources_lock = threading.Lock()


def register(upload: Upload) -> str:
    token = secrets.token_hex(12)
    with _sources_lock:
        _sources[token] = upload
    return token


def forget(tokens: list[str]) -> None:
    with _sources_lock:
        for token in tokens:
            _sources.pop(token, None)


def _next(it: Iterator[Any], end: object) -> Any:
    return next(it, end)


class TransferHub:
    """One channel end's transfers: sources it serves, RemoteBytes it reads."""

    def __init__(self, send: SendFrame, max_payload: int) -> None:
        self._send = send
        self._max_payload = max_payload
        self._serving: dict[str, tuple[asyncio.Task[None], list[int]]] = {}
        self._credit_events: dict[str, asyncio.Event] = {}
        # Weak: a RemoteBytes the remote code dropped unread must not stay for the session.
        self._reading: weakref.WeakValueDictionary[str, RemoteBytes] = weakref.WeakValueDictionary()
        self.loop: asyncio.AbstractEventLoop | None = None

    @property
    def quiet(self) -> bool:
        """Nothing served or being read: the channel's liveness may rest on a beacon."""
        return not self._serving and not self._reading

    def remote(self, token: str, size: int | None, limit: int) -> RemoteBytes:
        self.loop = self.loop or asyncio.get_running_loop()
        reader = RemoteBytes(self, token, size, limit)
        self._reading[token] = reader
        return reader

    def handle(self, type_: Transfer, meta: dict[str, Any], payload: memoryview) -> None:
        token = str(meta.get("x", ""))
        if type_ == "pull":
            self._pull(token, int(meta.get("c", 0)))
        elif type_ == "drop":
            served = self._serving.pop(token, None)
            if served is not None:
                served[0].cancel()
            forget([token])
        else:  # chunk / eof / abort for something we read
            reader = self._reading.get(token)
            if reader is not None:
                reader._deliver(type_, meta, payload)
                if type_ != "chunk":
                    self._reading.pop(token, None)

    def _pull(self, token: str, credit: int) -> None:
        if token in self._serving:
            self._serving[token][1][0] += credit
            self._credit_events[token].set()
            return
        with _sources_lock:
            upload = _sources.get(token)
        if upload is None:
            asyncio.get_running_loop().create_task(
                self._quiet("abort", x=token, e="unknown or expired transfer (the call that sent it has ended)"))
            return
        box = [credit]  # shared with the serving task, topped up by later pulls
        self._credit_events[token] = asyncio.Event()
        task = asyncio.get_running_loop().create_task(self._serve(token, upload, box))
        self._serving[token] = (task, box)

    async def _serve(self, token: str, upload: Upload, credit: list[int]) -> None:
        sent = 0
        event = self._credit_events[token]
        try:
            async for chunk in upload.chunks():
                sent += len(chunk)
                if sent > upload.limit:
                    raise PayloadTooLarge(f"upload exceeds its {upload.limit:,}-byte limit")
                if len(chunk) > self._max_payload:
                    raise PayloadTooLarge(f"chunk of {len(chunk):,} bytes exceeds FLAME_MAX_PAYLOAD")
                while credit[0] <= 0:
                    event.clear()
                    await event.wait()
                credit[0] -= 1
                await self._send("chunk", 0, chunk, x=token)
            await self._send("eof", 0, b"", x=token, size=sent)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._quiet("abort", x=token, e=f"{type(exc).__name__}: {exc}",
                              big=isinstance(exc, PayloadTooLarge))
        finally:
            self._serving.pop(token, None)
            self._credit_events.pop(token, None)
            forget([token])

    async def tell(self, type_: Literal["drop", "release"], token: str) -> None:
        """Tell the other side it may free ``token`` (an unread transfer, a tracked object)."""
        await self._quiet(type_, x=token)

    async def _quiet(self, type_: Transfer | Literal["release"], **meta: Any) -> None:
        try:
            await self._send(type_, 0, b"", **meta)
        except Exception:
            pass

    def close(self, reason: str) -> None:
        for task, _ in self._serving.values():
            task.cancel()
        self._serving.clear()
        for reader in list(self._reading.values()):
            reader._deliver("abort", {"e": f"channel closed: {reason}"}, memoryview(b""))
        self._reading.clear()


class RemoteBytes:
    """Bytes the other side is sending: iterate (``async for`` / ``for`` in a worker thread),
    ``read()`` them all, or ``save(path)`` them. ``size`` is the total when known."""

    def __init__(self, hub: TransferHub, token: str, size: int | None, limit: int) -> None:
        self._hub = hub
        self.token = token
        self.size = size
        self._limit = limit
        self._queue: asyncio.Queue[tuple[TransferAnswer, dict[str, Any], bytes]] = asyncio.Queue()
        self._started = False
        self._done = False
        self._received = 0
        self._on_end: Callable[[], Any] | None = None  # a tracked one's release (``_tracking``)

    def __repr__(self) -> str:
        return f"<RemoteBytes size={self.size} received={self._received}>"

    def _deliver(self, type_: TransferAnswer, meta: dict[str, Any], payload: memoryview) -> None:
        self._queue.put_nowait((type_, meta, bytes(payload) if type_ == "chunk" else b""))

    def __aiter__(self) -> AsyncGenerator[bytes, None]:
        return self._chunks()

    async def _chunks(self) -> AsyncGenerator[bytes, None]:
        if self._started:
            raise RuntimeError("a RemoteBytes can be read once")
        self._started = True
        await self._hub._send("pull", 0, b"", x=self.token, c=CHUNK_WINDOW)
        try:
            while True:
                type_, meta, data = await self._queue.get()
                if type_ == "chunk":
                    self._received += len(data)
                    if self._received > self._limit:
                        raise PayloadTooLarge(f"transfer exceeds the {self._limit:,}-byte limit")
                    await self._hub._send("pull", 0, b"", x=self.token, c=1)
                    yield data
                elif type_ == "eof":
                    self._done = True
                    return
                else:
                    self._done = True
                    message = str(meta.get("e", "transfer aborted"))
                    raise (PayloadTooLarge if meta.get("big") else TransferError)(f"transfer failed: {message}")
        finally:
            if not self._done:
                self._done = True
                await self._hub._quiet("drop", x=self.token)
            if self._on_end is not None:
                self._on_end()

    def __iter__(self) -> Iterator[bytes]:
        """Sync iteration, for code running in a worker thread (not on the event loop)."""
        loop = self._hub.loop
        assert loop is not None
        agen = self._chunks()
        try:
            while True:
                try:
                    yield asyncio.run_coroutine_threadsafe(agen.__anext__(), loop).result()
                except StopAsyncIteration:
                    return
        finally:
            asyncio.run_coroutine_threadsafe(agen.aclose(), loop).result()

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self])

    async def save(self, path: str | os.PathLike[str]) -> int:
        """Write everything to ``path``; return the number of bytes."""
        total = 0
        f = await asyncio.to_thread(open, path, "wb")
        try:
            async for chunk in self:
                await asyncio.to_thread(f.write, chunk)
                total += len(chunk)
        finally:
            f.close()
        return total

    def save_sync(self, path: str | os.PathLike[str]) -> int:
        total = 0
        with open(path, "wb") as f:
            for chunk in self:
                f.write(chunk)
                total += len(chunk)
        return total
