"""The channel refuses unsigned, forged, tampered, expired and replayed messages before
unpickling anything, both in the codec and on a real runner process; and the runner's
door (its WebSocket upgrade) opens only for a fresh token signed with its own key, once."""

from __future__ import annotations

import asyncio
import hashlib
import os
import pathlib
import pickle
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import websockets
from websockets.asyncio.client import connect

from flame_asgi import FlamePool, ParentInfo, PayloadTooLarge, ProcessBackend, ProtocolError
from flame_asgi._base.parent import code_version
from flame_asgi._wire.codec import MAC_MIN, TO_PARENT, TO_RUNNER, FrameOpener, FrameSealer, make_signer
from flame_asgi._wire.keys import AUTH_HEADER, RunnerKeys
from flame_asgi._wire.payload import Payload, Pickled
from flame_asgi.backends import RunnerSpec
from flame_asgi.backends.process import ProcessRunnerHandle
from tests import remote
from tests.knock import knock

SECRET = "test-secret-" + "x" * 20


class Evil:
    """Unpickling this creates a file: proof that bytes reached the unpickler."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (pathlib.Path(self.path).touch, ())


def an_hour_ago() -> float:
    return time.time() - 3600


def in_an_hour() -> float:
    return time.time() + 3600


def test_codec_refuses_bad_frames_before_unpickling(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    evil = pickle.dumps(Evil(str(tmp_path / "pwned")))
    signer = make_signer(SECRET.encode(), "r1", TO_RUNNER)

    def opener() -> FrameOpener:
        return FrameOpener(signer, 1 << 20)

    good = FrameSealer(signer, "session", 1 << 20)
    hello = good.seal("hello", runner="r1")
    call = good.seal("call", 1, evil)
    skipper = FrameSealer(signer, "session", 1 << 20)
    skipper.seal("hello", runner="r1")
    skipper.seal("call", 1, evil)  # sequence 2, never delivered
    skipped = skipper.seal("call", 2, evil)  # sequence 3 right after 1: a frame went missing

    def flipped(payload: Payload, at: int) -> list[bytes]:
        """hello, then a call carrying ``payload`` with its byte ``at`` (from the end) flipped."""
        sealer = FrameSealer(signer, "session", 1 << 20)
        first, frame = sealer.seal("hello", runner="r1"), bytearray(sealer.seal("call", 1, payload))
        frame[-at] ^= 1
        return [first, bytes(frame)]

    big = os.urandom(MAC_MIN * 4)  # checked with Poly1305, not SHA-256
    out_of_band = Pickled(evil, [big])  # the pickle, then its buffer, as dumps() makes them
    cases = {
        "unsigned": [evil],
        "garbage header": [b"\x00\x00\x00\x05hello" + evil],
        "wrong key": [FrameSealer(make_signer(b"other", "r1", TO_RUNNER), "session", 1 << 20).seal("hello")],
        "other runner": [FrameSealer(make_signer(SECRET.encode(), "r2", TO_RUNNER), "session", 1 << 20).seal("hello")],
        "wrong direction": [
            FrameSealer(make_signer(SECRET.encode(), "r1", TO_PARENT), "session", 1 << 20).seal("hello")],
        "expired": [FrameSealer(signer, "s", 1 << 20, clock=an_hour_ago).seal("hello")],
        "from the future": [FrameSealer(signer, "s", 1 << 20, clock=in_an_hour).seal("hello")],
        "signature cut off": [hello[:-40]],
        "tampered payload": [hello, call[:-1] + bytes([call[-1] ^ 1])],
        "tampered large payload": flipped(evil + big, 1),
        "tampered out-of-band buffer": flipped(out_of_band, 1),
        "tampered pickle of an out-of-band payload": flipped(out_of_band, len(big) + 1),
        "replayed": [hello, call, call],
        "skipped sequence": [hello, skipped],
        "call before hello": [call],
    }
    loaded: list[Any] = []
    monkeypatch.setattr("flame_asgi._wire.pickling.pickle.loads", lambda data, **_: loaded.append(data))
    for name, frames in cases.items():
        o = opener()
        with pytest.raises(ProtocolError):
            for frame in frames:
                f = o.open(frame)
                if f.type == "call" and name != "replayed":
                    pytest.fail(f"{name}: a bad call frame was accepted")
        assert loaded == [], name
    assert not (tmp_path / "pwned").exists()


def test_oversized_messages_are_refused_on_both_sides() -> None:
    signer = make_signer(SECRET.encode(), "r1", TO_RUNNER)
    with pytest.raises(PayloadTooLarge, match="FLAME_MAX_PAYLOAD"):
        FrameSealer(signer, "s", 100).seal("call", 1, b"x" * 101)
    big = FrameSealer(signer, "s", 1000).seal("hello", 0, b"x" * 500)
    with pytest.raises(PayloadTooLarge):
        FrameOpener(signer, 100).open(big)


def test_secret_never_appears_in_reprs() -> None:
    info = ParentInfo(pool="p", runner_id="r", parent_address="a", backend="process", code_version="v", app="a:b")
    spec = RunnerSpec(pool="p", runner_id="r", info=info, app=None, boot_timeout=1, secret=SECRET)
    assert SECRET not in repr(spec) and SECRET not in info.encode()
    keys = spec.keys
    shown = repr(spec) + repr(keys) + str(keys)
    for key in (keys.to_runner, keys.to_parent, keys.upgrade):
        assert key.hex() not in shown and str(key) not in shown
    assert keys.encode() not in shown
    # The runner gets its own keys, never the root secret, in any form.
    assert "FLAME_SECRET" not in spec.env and not any(SECRET in value for value in spec.env.values())
    assert RunnerKeys.decode("r", spec.env["FLAME_RUNNER_KEYS"]) == keys


def test_an_upgrade_token_opens_only_its_runners_door_and_only_while_fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    keys = RunnerKeys.derive(SECRET.encode(), "r1")
    token = keys.upgrade_token()
    assert keys.check_upgrade_token(token) != keys.check_upgrade_token(keys.upgrade_token())  # a nonce each
    refused = {
        "none": None,
        "empty": "",
        "garbage": "not-a-token",
        "tampered": token.replace("r1:", "r2:", 1),  # another runner's name, the signature kept
        "another runner's": RunnerKeys.derive(SECRET.encode(), "r2").upgrade_token(),
        "another parent's": RunnerKeys.derive(b"other-root", "r1").upgrade_token(),
    }
    for name, bad in refused.items():
        try:
            keys.check_upgrade_token(bad)
        except ProtocolError:
            continue
        pytest.fail(f"{name} token opened the door")
    # A channel key cannot stand in for the door's key (nor the reverse): they are distinct.
    assert len({keys.to_runner, keys.to_parent, keys.upgrade}) == 3
    later = int(time.time()) + 61
    monkeypatch.setattr("itsdangerous.TimestampSigner.get_timestamp", lambda self: later)
    with pytest.raises(ProtocolError, match="expired"):
        keys.check_upgrade_token(token)


@pytest.fixture
async def runner(tmp_path: pathlib.Path) -> AsyncIterator[tuple[str, ProcessRunnerHandle]]:
    """A real runner process (uvicorn, runner mode) whose key the test knows."""
    app = "flame_asgi._bare:app"
    info = ParentInfo(pool="sec", runner_id="sec-1", parent_address="test", backend="process",
                      code_version=code_version(app), app=app, failsafe_timeout=30)
    spec = RunnerSpec(pool="sec", runner_id="sec-1", info=info, app=app, boot_timeout=20, secret=SECRET)
    handle = await ProcessBackend().boot(spec)
    try:
        async with httpx.AsyncClient() as client:
            for _ in range(200):
                try:
                    await client.get(f"{handle.url}/_flame/health")
                    break
                except httpx.TransportError:
                    await asyncio.sleep(0.05)
        yield info.code_version, handle
    finally:
        await handle.stop(5)


async def _session(url: str, frames: list[bytes], token: str | None = None) -> str:
    return await knock(url, frames, token)


async def test_runner_refuses_unsigned_forged_and_expired_hellos(runner: tuple[str, ProcessRunnerHandle],
                                                                 tmp_path: pathlib.Path) -> None:
    version, handle = runner
    assert handle.url is not None
    evil = pickle.dumps(Evil(str(tmp_path / "pwned")))
    forged = FrameSealer(make_signer(b"guessed-key", "sec-1", TO_RUNNER), "s", 1 << 20)
    expired = FrameSealer(make_signer(SECRET.encode(), "sec-1", TO_RUNNER), "s", 1 << 20, clock=an_hour_ago)
    for frames in ([evil], [forged.seal("hello", runner="sec-1", v=version), forged.seal("call", 1, evil)],
                   [expired.seal("hello", runner="sec-1", v=version)]):
        # Without a token the door stays shut: HTTP 403, not a byte of the frames is read.
        assert await _session(handle.url, frames) == "refused 403"
        assert await _session(handle.url, frames, "garbage") == "refused 403"
        # Behind the door (a valid token), the frames themselves are refused.
        assert (await _session(handle.url, frames, handle.spec.upgrade_token())).startswith("closed")
    assert not (tmp_path / "pwned").exists()
    health = httpx.get(f"{handle.url}/_flame/health").json()
    assert health == {"status": "ok", "runner_id": "sec-1", "pool": "sec"}  # nothing to time an attack by
    assert httpx.get(f"{handle.url}/").status_code == 404  # runner mode: no web routes
    # Refused sessions did not take the parent's place: the parent's hello still gets "ready".
    hello = FrameSealer(make_signer(SECRET.encode(), "sec-1", TO_RUNNER), "genuine", 1 << 20)
    assert (await _session(handle.url, [hello.seal("hello", runner="sec-1", v=version)],
                           handle.spec.upgrade_token())).startswith("reply")


async def test_runner_refuses_tampered_and_replayed_calls(runner: tuple[str, ProcessRunnerHandle],
                                                          tmp_path: pathlib.Path) -> None:
    version, handle = runner
    assert handle.url is not None
    marker = tmp_path / "pwned"
    sealer = FrameSealer(make_signer(SECRET.encode(), "sec-1", TO_RUNNER), "session-1", 1 << 20)
    token = handle.spec.upgrade_token()
    ws = await connect(handle.url.replace("http", "ws") + "/_flame/ws", compression=None,
                       additional_headers={AUTH_HEADER: token})
    await ws.send(sealer.seal("hello", runner="sec-1", v=version))
    assert await ws.recv()  # ready: this connection is the runner's parent now
    # The door is held: neither the same token again nor a fresh one opens it a second time.
    assert await _session(handle.url, [b"anything"], token) == "refused 403"
    assert await _session(handle.url, [b"anything"], handle.spec.upgrade_token()) == "refused 403"
    call = sealer.seal("call", 1, pickle.dumps(Evil(str(marker))))
    await ws.send(call)
    for _ in range(100):  # the genuine call is unpickled (proving the payload is live)...
        if marker.exists():
            break
        await asyncio.sleep(0.02)
    assert marker.exists()
    marker.unlink()
    await ws.send(call)  # ...its replay is not
    with pytest.raises(websockets.ConnectionClosed):
        while True:
            await asyncio.wait_for(ws.recv(), 5)
    assert not marker.exists()
    # A second would-be parent is refused: the runner had exactly one, and is now exiting.
    await asyncio.wait_for(handle.proc.wait(), 15)


async def test_runner_refuses_a_tampered_payload(runner: tuple[str, ProcessRunnerHandle],
                                                 tmp_path: pathlib.Path) -> None:
    version, handle = runner
    assert handle.url is not None
    sealer = FrameSealer(make_signer(SECRET.encode(), "sec-1", TO_RUNNER), "session-2", 1 << 20)
    genuine = sealer.seal("call", 1, pickle.dumps(("fn", ())))
    evil = pickle.dumps(Evil(str(tmp_path / "pwned")))
    header_len = int.from_bytes(genuine[:4], "big")
    tampered = genuine[: 4 + header_len] + evil  # signed header kept, payload swapped
    hello = FrameSealer(make_signer(SECRET.encode(), "sec-1", TO_RUNNER), "session-2", 1 << 20).seal(
        "hello", runner="sec-1", v=version)
    assert await _session(handle.url, [hello, tampered]) == "refused 403"  # no token: not even read
    assert (await _session(handle.url, [hello, tampered], handle.spec.upgrade_token())).startswith(
        ("reply", "closed"))
    await asyncio.wait_for(handle.proc.wait(), 15)
    assert not (tmp_path / "pwned").exists()
    assert hashlib.sha256(evil).hexdigest() not in genuine.decode(errors="replace")


async def test_a_second_parent_is_refused(tmp_path: pathlib.Path) -> None:
    async with FlamePool("one-parent", backend=ProcessBackend()) as pool:
        await pool.call(remote.works)
        url = pool.stats().runners[0].url
        assert url is not None
        assert await _session(url, [b"anything"]) == "refused 403"
        # Even a valid token (one the parent could have minted) finds the door taken.
        (runner,) = pool._runners
        assert isinstance(runner.handle, ProcessRunnerHandle)
        assert await _session(url, [b"anything"], runner.handle.spec.upgrade_token()) == "refused 403"
        assert await pool.call(remote.works) == "works"  # the real parent is undisturbed
