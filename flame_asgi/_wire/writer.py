"""Ordered frame writing with coalescing: one channel message can carry many frames.

Every frame is sealed (signed, numbered) the moment it is sent, in the callers' order,
and queued; one writer task per channel end writes the queue out. Frames queued while
it writes go out together as one batch message, so a burst of calls or results costs one
write and one wake-up of the peer instead of one per frame. Because a task of its own
does the writing, a caller cancelled mid-send cannot strand frames numbered after its
own (the peer would refuse them as out of order and end the session). The first small frame
of a loop iteration, when nothing is queued or being written, goes out at once if the
channel can write without waiting (``send_now``): a lone call does not wait for the
writer task's turn, and frames sent later in the same iteration still coalesce. A batch is
``0xFF`` followed by ``u32 length + frame`` repeated; a lone frame starts with its header
length (< 64 KiB), so its first byte is ``0x00``. Each frame in a batch is verified alone.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterator
from typing import Any

from flame_asgi._wire.channel import Channel, ChannelClosed
from flame_asgi._wire.codec import FrameSealer
from flame_asgi._wire.payload import Payload
from flame_asgi._wire.protocol import FrameType

BATCH = 0xFF
_LEN = struct.Struct(">I")
MAX_BATCH_BYTES = 256 * 1024  # frames above this travel alone (no copy into a batch)
HIGH_WATER = 8 * 1024 * 1024  # queued bytes above which senders wait for the writer


class FrameWriter:
    def __init__(self, channel: Channel, sealer: FrameSealer) -> None:
        self._channel = channel
        self._sealer = sealer
        self._queue: list[bytes] = []
        self._queued = 0
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()  # set whenever the writer has taken the queue
        self._idle = asyncio.Event()  # set when everything queued has been written
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._error: ChannelClosed | None = None
        self._writing = False  # the writer task is between taking the queue and the end of its writes
        self._direct = False  # a frame went out directly in this loop iteration

    async def send(self, type_: FrameType, id_: int = 0, payload: Payload = b"", **meta: Any) -> None:
        """Queue a frame; wait only while too much is queued (back-pressure)."""
        if self._error is not None:
            raise self._error
        frame = self._sealer.seal(type_, id_, payload, **meta)
        if (not self._queue and not self._writing and not self._direct and len(frame) <= MAX_BATCH_BYTES
                and self._channel.send_now(frame)):
            self._direct = True  # until the loop's next turn: later frames queue up and coalesce
            asyncio.get_running_loop().call_soon(self._end_direct)
            return
        self._queue.append(frame)
        self._queued += len(frame)
        self._idle.clear()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._write())
        self._wake.set()
        while self._queued > HIGH_WATER and self._error is None:
            self._drained.clear()
            await self._drained.wait()
        if self._error is not None:
            raise self._error

    async def _write(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                self._writing = True
                while self._queue:
                    frames, self._queue, self._queued = self._queue, [], 0
                    self._drained.set()
                    for message in _pack(frames):
                        await self._channel.send(message)
                self._writing = False
                self._idle.set()
        except ChannelClosed as exc:
            self._error = exc
        finally:
            self._drained.set()
            self._idle.set()

    def _end_direct(self) -> None:
        self._direct = False

    async def flush(self) -> None:
        """Wait until everything queued so far has been written (or the channel failed)."""
        await self._idle.wait()

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()


def _pack(frames: list[bytes]) -> Iterator[bytes]:
    batch: list[bytes] = []
    size = 0
    for frame in frames:
        if len(frame) > MAX_BATCH_BYTES:
            if batch:
                yield _join(batch)
                batch, size = [], 0
            yield frame
            continue
        batch.append(frame)
        size += len(frame)
        if size >= MAX_BATCH_BYTES:
            yield _join(batch)
            batch, size = [], 0
    if batch:
        yield _join(batch)


def _join(frames: list[bytes]) -> bytes:
    if len(frames) == 1:
        return frames[0]
    parts = [bytes([BATCH])]
    for frame in frames:
        parts.append(_LEN.pack(len(frame)))
        parts.append(frame)
    return b"".join(parts)


def split(message: bytes) -> list[bytes]:
    """The frames in one channel message (malformed batches yield a frame that fails to verify)."""
    if not message or message[0] != BATCH:
        return [message]
    frames = []
    view = memoryview(message)
    pos = 1
    while pos + _LEN.size <= len(message):
        (n,) = _LEN.unpack_from(message, pos)
        pos += _LEN.size
        frames.append(bytes(view[pos:pos + n]))
        pos += n
    if pos != len(message):
        frames.append(b"")  # truncated: FrameOpener refuses it, ending the session
    return frames
