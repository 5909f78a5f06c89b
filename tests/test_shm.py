"""Large payloads through sealed shared memory (same host): what a runner accepts, what it
refuses, and that the memory is freed."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import struct

import pytest

from flame_asgi import FlamePool, LocalBackend, ProcessBackend, ProtocolError
from flame_asgi._wire.codec import TREE_CHUNK, TREE_MIN, FrameKey, FrameOpener, FrameSealer, digest_of
from flame_asgi._wire.shm import SHM_MIN, SharedMemory
from tests import remote
from tests.conftest import until

KEY = FrameKey(b"k" * 32)


def pair() -> tuple[FrameSealer, FrameOpener, SharedMemory, SharedMemory]:
    sender, receiver = SharedMemory(), SharedMemory()
    sender.enabled = True
    return (FrameSealer(KEY, "session", 1 << 30, shm=sender), FrameOpener(KEY, 1 << 30, "session", shm=receiver),
            sender, receiver)


def memfds(pid: int) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += "memfd:flame-payload" in os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
    return count


def test_a_large_payload_crosses_through_sealed_memory_and_is_freed_once_acknowledged() -> None:
    sealer, opener, sender, receiver = pair()
    payload = os.urandom(SHM_MIN * 4)
    frame = sealer.seal("call", 1, payload)
    assert len(frame) < 1024  # the payload is not in the frame
    assert memfds(os.getpid()) == 1
    opened = opener.open(frame)
    assert bytes(opened.payload) == payload
    # The receiver's next frame acknowledges it; the sender then closes its memfd.
    back = FrameSealer(KEY, "session", 1 << 30, shm=receiver).seal("ping")
    FrameOpener(KEY, 1 << 30, "session", shm=sender).open(back)
    del opened
    assert memfds(os.getpid()) == 0
    small = sealer.seal("call", 2, b"x" * 100)
    assert small.endswith(b"x" * 100)  # small payloads stay in the frame


def test_a_reference_to_memory_that_is_not_sealed_is_refused() -> None:
    sealer, opener, sender, _ = pair()
    frame = sealer.seal("call", 1, os.urandom(SHM_MIN))
    # Swap the sealed memfd for an unsealed one with the same number: the inode differs.
    fd = next(iter(sender._sent.values()))
    unsealed = os.memfd_create("flame-payload", os.MFD_ALLOW_SEALING)
    os.write(unsealed, b"\0" * SHM_MIN)
    os.dup2(unsealed, fd)
    with pytest.raises(ProtocolError, match="not the one the frame was signed for"):
        opener.open(frame)
    os.close(unsealed)
    sender.close()


def test_memory_changed_before_its_seal_fails_the_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    # A same-user process could write into the memfd between its creation and its seal.
    import flame_asgi._wire.shm as shm

    real = shm._sealed

    def tampered(payload: bytes | memoryview) -> int:
        fd = os.memfd_create("flame-payload", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.write(fd, b"evil" + bytes(payload)[4:])
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, shm._SEALS)
        return fd

    monkeypatch.setattr(shm, "_sealed", tampered)
    sealer, opener, sender, _ = pair()
    frame = sealer.seal("call", 1, os.urandom(SHM_MIN))
    with pytest.raises(ProtocolError, match="does not match its signed digest"):
        opener.open(frame)
    monkeypatch.setattr(shm, "_sealed", real)
    sender.close()


def test_a_reference_without_a_shared_memory_end_is_refused() -> None:
    sealer, _, sender, _ = pair()
    frame = sealer.seal("call", 1, os.urandom(SHM_MIN))
    with pytest.raises(ProtocolError, match="unexpected shared-memory reference"):
        FrameOpener(KEY, 1 << 30, "session").open(frame)  # an end that never offered it
    sender.close()


def test_large_payloads_use_a_tree_digest_that_both_ends_agree_on() -> None:
    data = os.urandom(40 * 1024 * 1024)
    assert digest_of(data) == digest_of(memoryview(data)) and digest_of(data).startswith("t")
    assert digest_of(data[:-1] + b"!") != digest_of(data)
    # The definition, computed here independently: SHA-256 of the pieces' SHA-256s.
    pieces = b"".join(hashlib.sha256(data[i:i + TREE_CHUNK]).digest() for i in range(0, len(data), TREE_CHUNK))
    assert digest_of(data) == "t" + hashlib.sha256(pieces).hexdigest()


def test_a_shared_memory_frame_carries_the_digest_of_the_payload_it_copied_while_hashing() -> None:
    sealer, opener, sender, _ = pair()
    data = os.urandom(TREE_MIN + 12345)
    frame = sealer.seal("call", 1, data)
    header = json.loads(frame[4:4 + struct.unpack(">I", frame[:4])[0]])
    assert "sh" in header and header["d"] == digest_of(data)
    assert bytes(opener.open(frame).payload) == data
    sender.close()


async def test_process_runners_use_shared_memory_and_free_it(tmp_path: object) -> None:
    data = os.urandom(20_000_000)
    async with FlamePool("shm", backend=ProcessBackend(heartbeat_interval=0.2)) as pool:
        assert await pool.call(remote.echo, data) == data
        runner = next(iter(pool._runners))
        assert runner.conn._shm.enabled
        pid = runner.conn.pid
        assert pid is not None
        await until(lambda: memfds(os.getpid()) == 0 and memfds(pid) == 0, what="both memfds closed")
        with pytest.raises(ValueError, match="remote boom"):
            await pool.call(remote.raise_after_receiving, data)
        await until(lambda: memfds(os.getpid()) == 0 and memfds(pid) == 0, what="memfds of a failed call closed")
    async with FlamePool("no-shm", backend=LocalBackend()) as pool:
        assert await pool.call(remote.echo, data) == data
        assert not next(iter(pool._runners)).conn._shm.enabled  # in-process: nothing to share
    await asyncio.sleep(0)
