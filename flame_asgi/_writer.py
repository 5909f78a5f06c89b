"""Ordered frame writing with coalescing: one channel message can carry many frames.

Every frame is sealed (signed, numbered) the moment it is sent, in the caller's order.
The first sender writes; frames sent while it writes queue up and go out together as
one batch message, so a burst of calls or results costs one write and one wake-up of
the peer instead of one per frame. A batch is ``0xFF`` followed by ``u32 length +
frame`` repeated; a lone frame starts with its header length (< 64 KiB), so its first
byte is ``0x00`` and the two never mix up. Each frame in a batch is verified on its own.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterator
from typing import Any

from flame_asgi._channel import Channel, ChannelClosed
from flame_asgi._codec import FrameSealer

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
        self._writing = False
        self._drained = asyncio.Event()
        self._error: ChannelClosed | None = None

    async def send(self, type_: str, id_: int = 0, payload: bytes = b"", **meta: Any) -> None:
        if self._error is not None:
            raise self._error
        frame = self._sealer.seal(type_, id_, payload, **meta)
        if self._writing:
            self._queue.append(frame)
            self._queued += len(frame)
            while self._writing and self._queued > HIGH_WATER:
                self._drained.clear()
                await self._drained.wait()
            if self._error is not None:
                raise self._error
            return
        self._writing = True
        try:
            await self._channel.send(frame)
            while self._queue:
                frames, self._queue, self._queued = self._queue, [], 0
                self._drained.set()
                for message in _pack(frames):
                    await self._channel.send(message)
        except ChannelClosed as exc:
            self._error = exc
            raise
        finally:
            self._writing = False
            self._drained.set()


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
