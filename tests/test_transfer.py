"""Large transfers: chunked, signed, pulled on demand, with bounded memory."""

from __future__ import annotations

import asyncio
import hashlib
import pathlib
from collections.abc import Iterator
from typing import Any

import pytest

from flame_asgi import FlamePool, PayloadTooLarge, ProcessBackend, RemoteBytes, TransferError, Upload
from tests import remote
from tests.conftest import BackendFactory


def save_sync(data: Any, path: str) -> int:
    """Sync remote code (run in a worker thread) saving the RemoteBytes it was sent, as
    docs/transfers.md shows."""
    assert isinstance(data, RemoteBytes)
    return data.save_sync(path)


def _file(path: pathlib.Path, megabytes: int) -> str:
    block = bytes(range(256)) * 4096
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(megabytes):
            f.write(block)
            h.update(block)
    return h.hexdigest()


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field}")


def _reset_peak_rss() -> None:
    # Freed buffers go back to the OS, so RSS afterwards proves nothing: measure the peak
    # (VmHWM), reset to the current RSS here (proc(5), clear_refs "5").
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


async def test_upload_to_the_runner_and_back(backend: BackendFactory, tmp_path: pathlib.Path) -> None:
    src = tmp_path / "in.bin"
    digest = _file(src, 8)
    async with FlamePool("transfer", backend=backend()) as pool:
        assert await pool.call(remote.digest_upload, Upload(src)) == (8 << 20, digest)
        assert await pool.call(remote.digest_upload_sync, Upload(src, chunk_size=300_000)) == (8 << 20, digest)
        assert await pool.call(remote.digest_upload, Upload(b"small bytes")) == (
            11, hashlib.sha256(b"small bytes").hexdigest())

        async def agen():  # type: ignore[no-untyped-def]
            for i in range(10):
                yield bytes([i]) * 1000

        n, _ = await pool.call(remote.digest_upload, Upload(agen()))
        assert n == 10_000
        back = await pool.call(remote.make_file, str(tmp_path / "made.bin"), 3)
        assert back.size == 3 << 20
        out = tmp_path / "copy.bin"
        assert await back.save(out) == 3 << 20
        assert out.read_bytes() == (tmp_path / "made.bin").read_bytes()


async def test_save_sync_in_sync_remote_code_and_in_a_worker_thread(backend: BackendFactory,
                                                                    tmp_path: pathlib.Path) -> None:
    src = tmp_path / "in.bin"
    _file(src, 3)
    async with FlamePool("save-sync", backend=backend()) as pool:
        saved = tmp_path / "saved-by-the-runner.bin"
        assert await pool.call(save_sync, Upload(src, chunk_size=300_000), str(saved)) == 3 << 20
        assert saved.read_bytes() == src.read_bytes()
        back = await pool.call(remote.make_file, str(tmp_path / "made.bin"), 2)
        copy = tmp_path / "copy.bin"
        assert await asyncio.to_thread(back.save_sync, copy) == 2 << 20
        assert copy.read_bytes() == (tmp_path / "made.bin").read_bytes()

        def broken() -> Iterator[bytes]:
            yield b"ok"
            raise OSError("disk gone")

        with pytest.raises(TransferError, match="disk gone"):  # the sender's error, as for save()
            await pool.call(save_sync, Upload(broken()), str(tmp_path / "broken.bin"))
        with pytest.raises(PayloadTooLarge):
            await pool.call(save_sync, Upload(iter([b"x" * 1000] * 3), limit=2000), str(tmp_path / "big.bin"))
        assert await pool.call(remote.works) == "works"


async def test_upload_limit_is_a_clear_error(backend: BackendFactory, tmp_path: pathlib.Path) -> None:
    src = tmp_path / "in.bin"
    _file(src, 2)
    with pytest.raises(PayloadTooLarge, match="exceeds its 1,000,000-byte limit"):
        Upload(src, limit=1_000_000)

    def endless():  # type: ignore[no-untyped-def]
        while True:
            yield b"x" * 65536

    async with FlamePool("limit", backend=backend()) as pool:
        with pytest.raises(PayloadTooLarge, match="limit"):
            await pool.call(remote.digest_upload, Upload(endless(), limit=1_000_000))

        def broken():  # type: ignore[no-untyped-def]
            yield b"ok"
            raise OSError("disk gone")

        with pytest.raises(TransferError, match="disk gone"):
            await pool.call(remote.digest_upload, Upload(broken()))
        assert await pool.call(remote.works) == "works"


@pytest.mark.slow
async def test_200_mb_through_a_process_runner_with_bounded_parent_memory(tmp_path: pathlib.Path) -> None:
    src = tmp_path / "big.bin"
    digest = _file(src, 200)
    async with FlamePool("big", backend=ProcessBackend()) as pool:
        await pool.call(remote.works)
        _reset_peak_rss()
        before = _status_mb("VmRSS")
        assert await pool.call(remote.digest_upload, Upload(src)) == (200 << 20, digest)
        back = await pool.call(remote.make_file, str(tmp_path / "made.bin"), 200)
        h = hashlib.sha256()
        async for chunk in back:
            h.update(chunk)
        growth = _status_mb("VmHWM") - before
    assert h.hexdigest() == hashlib.sha256((tmp_path / "made.bin").read_bytes()).hexdigest()
    print(f"parent peak RSS growth over 400 MB of transfers: {growth:.1f} MB")
    assert growth < 60  # a few chunks in flight, not the file


async def test_uploads_are_forgotten_when_their_call_ends(backend: BackendFactory, tmp_path: pathlib.Path) -> None:
    import threading

    from flame_asgi._wire import transfer

    src = tmp_path / "in.bin"
    _file(src, 1)
    before = set(transfer._sources)
    async with FlamePool("tokens", backend=backend(), max_concurrency=4) as pool:
        await pool.call(remote.digest_upload, Upload(src))
        with pytest.raises(TypeError):  # the remote call fails before reading the upload
            await pool.call(remote.raise_value_error, Upload(src))  # type: ignore[call-arg]
        with pytest.raises(Exception):  # noqa: B017 - unpicklable: nothing is sent
            await pool.call(remote.digest_upload, (Upload(src), threading.Lock()))
        handle = await pool.place_child(remote.digest_upload, Upload(src))
        await handle
        stream = pool.stream(remote.count_up, 2)
        assert [x async for x in stream] == [0, 1]
        pool.cast(remote.digest_upload, Upload(src))
        while pool._dispatch.casts_running:
            await asyncio.sleep(0.01)
    assert set(transfer._sources) == before  # none left registered in the parent
