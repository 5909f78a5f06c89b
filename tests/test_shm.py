"""Large payloads through sealed shared memory (same host): what a runner accepts, what it
refuses, and that the memory is freed."""

from __future__ import annotations

import asyncio
import errno
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



class Refusals:
    """Whether sealing is refused now, and each errno the kernel answered."""

    def __init__(self) -> None:
        self.active = True
        self.errnos: list[int] = []


@pytest.fixture
def kernel_refuses_seals(monkeypatch: pytest.MonkeyPatch) -> Refusals:
    """While ``active``, every memfd this process seals has a writable shared mapping when
    the seal is asked for, so the kernel itself answers EBUSY (as CI once saw it do for pages
    it still counted as in use)."""
    import mmap as mmap_module

    from flame_asgi._wire import shm

    refusals, real = Refusals(), fcntl.fcntl

    def fcntl_with_a_mapping(fd: int, cmd: int, arg: int = 0) -> int:
        if cmd != fcntl.F_ADD_SEALS or not refusals.active:
            return real(fd, cmd, arg)
        with mmap_module.mmap(fd, os.fstat(fd).st_size, mmap_module.MAP_SHARED, mmap_module.PROT_WRITE):
            try:
                return real(fd, cmd, arg)
            except OSError as exc:
                refusals.errnos.append(exc.errno)
                raise

    monkeypatch.setattr(shm.fcntl, "fcntl", fcntl_with_a_mapping)
    return refusals


def test_a_payload_the_kernel_will_not_seal_travels_in_its_frame_and_the_channel_goes_on(
        kernel_refuses_seals: Refusals) -> None:
    sealer, opener, sender, _ = pair()
    payload = os.urandom(SHM_MIN * 4)
    frame = sealer.seal("call", 1, payload)
    assert kernel_refuses_seals.errnos == [errno.EBUSY]  # the kernel's own refusal, not a stand-in
    assert frame.endswith(payload) and memfds(os.getpid()) == 0  # in the frame; no memfd left open
    assert bytes(opener.open(frame).payload) == payload
    pickled = dumps([payload, payload[:SHM_MIN]], "out of band")
    assert loads(opener.open(sealer.seal("result", 2, pickled)).payload) == [payload, payload[:SHM_MIN]]
    sender.close()


def test_a_frame_that_fails_to_seal_leaves_no_gap_in_the_sequence(monkeypatch: pytest.MonkeyPatch) -> None:
    # The peer refuses a sequence number that skips one as a replay and ends the session: a
    # frame that was never sent must not use one up.
    sealer, opener, sender, _ = pair()
    assert opener.open(sealer.seal("call", 1, b"first")).id == 1

    def broken(seq: int, parts: object) -> None:
        raise MemoryError("no room for the payload")

    monkeypatch.setattr(sender, "put", broken)
    with pytest.raises(MemoryError):
        sealer.seal("call", 2, os.urandom(SHM_MIN))
    monkeypatch.undo()
    assert opener.open(sealer.seal("call", 3, b"after")).id == 3  # it has sequence number 2: accepted
    sender.close()


async def test_a_pool_whose_kernel_will_not_seal_memfds_still_carries_large_payloads(
        kernel_refuses_seals: Refusals) -> None:
    # Sealing is refused in this process (the parent) only: the runner's memfds still seal.
    data, small = os.urandom(3 * 1024 * 1024), os.urandom(SHM_MIN)
    async with FlamePool("no-seal", backend=ProcessBackend()) as pool:  # refused at the handshake
        assert await pool.call(remote.echo, data) == data
        assert not next(iter(pool._runners)).conn._shm.enabled  # no shared memory on this channel
        assert kernel_refuses_seals.errnos == [errno.EBUSY]
    kernel_refuses_seals.active = False
    async with FlamePool("seal-then-not", backend=ProcessBackend(), max_concurrency=4) as pool:
        assert await pool.call(remote.echo, data) == data
        runner = next(iter(pool._runners))
        assert runner.conn._shm.enabled
        kernel_refuses_seals.active = True  # refused from now on, on a channel that has shared memory
        for _ in range(3):
            assert await pool.call(remote.echo, (data, small)) == (data, small)
        assert kernel_refuses_seals.errnos == [errno.EBUSY] * 4 and list(pool._runners) == [runner]
        await until(lambda: memfds(os.getpid()) == 0, what="the parent's memfds closed")
