"""Large payloads through sealed shared memory (same host): what a runner accepts, what it
refuses, and that the memory is freed."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import struct

import pytest

from flame_asgi import FlamePool, LocalBackend, ProcessBackend, ProtocolError
from flame_asgi._wire.codec import MAC_MIN, FrameKey, FrameOpener, FrameSealer
from flame_asgi._wire.pickling import dumps, loads
from flame_asgi._wire.shm import OVERLAP_MIN, SHM_MIN, SharedMemory
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


@pytest.mark.parametrize("size", [SHM_MIN, OVERLAP_MIN + 12345])
@pytest.mark.parametrize("out_of_band", [False, True], ids=["in-band", "out-of-band"])
def test_memory_changed_before_its_seal_fails_the_check(monkeypatch: pytest.MonkeyPatch, size: int,
                                                        out_of_band: bool) -> None:
    # A same-user process could write into the memfd between its creation and its seal; the
    # receiver must refuse it whether it maps the payload or reads it part by part, and
    # whether it checks it on its own thread or beside the copy (from OVERLAP_MIN).
    import flame_asgi._wire.shm as shm

    def tampered(*parts: bytes | memoryview) -> int:
        data = b"".join(bytes(part) for part in parts)
        fd = os.memfd_create("flame-payload", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.write(fd, data[:-4] + b"evil")
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, shm._SEALS)
        return fd

    monkeypatch.setattr(shm, "_sealed", tampered)
    sealer, opener, sender, _ = pair()
    payload = dumps(os.urandom(size), "a result") if out_of_band else os.urandom(size)
    assert type(payload).__name__ == ("Pickled" if out_of_band else "bytes")
    frame = sealer.seal("call", 1, payload)
    with pytest.raises(ProtocolError, match="does not match its signed check"):
        opener.open(frame)
    sender.close()


def test_a_reference_without_a_shared_memory_end_is_refused() -> None:
    sealer, _, sender, _ = pair()
    frame = sealer.seal("call", 1, os.urandom(SHM_MIN))
    with pytest.raises(ProtocolError, match="unexpected shared-memory reference"):
        FrameOpener(KEY, 1 << 30, "session").open(frame)  # an end that never offered it
    sender.close()


@pytest.mark.parametrize("size", [SHM_MIN, OVERLAP_MIN + 12345])
def test_an_out_of_band_payload_is_read_from_shared_memory_as_the_bytes_it_unpickles_to(size: int) -> None:
    sealer, opener, sender, _ = pair()
    data = os.urandom(size)
    frame = sealer.seal("result", 1, dumps({"a": data, "b": data, "c": b"small"}, "a result"))
    header = json.loads(frame[4:4 + struct.unpack(">I", frame[:4])[0]])
    assert "sh" in header and "m" in header and "d" not in header  # Poly1305 from MAC_MIN
    assert header["b"][1] == size  # the pickle, then the one buffer: shared bytes go once
    result = loads(opener.open(frame).payload)
    assert result["a"] == data and result["a"] is result["b"] and result["c"] == b"small"
    sender.close()


def test_small_payloads_carry_a_sha256_and_large_ones_a_tag_that_no_two_frames_share() -> None:
    sealer, opener, sender, _ = pair()
    small, large = b"x" * (MAC_MIN - 1), b"y" * MAC_MIN

    def header(frame: bytes) -> dict[str, object]:
        opener.open(frame)
        parsed: dict[str, object] = json.loads(frame[4:4 + struct.unpack(">I", frame[:4])[0]])
        return parsed

    first, second = header(sealer.seal("call", 1, large)), header(sealer.seal("call", 2, large))
    assert first["m"] != second["m"]  # the same bytes, another one-time key
    assert "m" not in header(sealer.seal("call", 3, small)) and "d" in header(sealer.seal("call", 4, small))
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
