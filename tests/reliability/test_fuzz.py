"""Fuzzing the runner's internal endpoints: nothing unauthenticated is ever unpickled,
and hostile input costs an attacker their own connection, never the runner.

The session logic is fuzzed fast over an in-memory channel (the same ``RunnerSession``
that serves the WebSocket); a real uvicorn runner then gets fewer, end-to-end examples
of WebSocket frames, HTTP requests and WebSocket upgrade requests. Its door (the
``x-flame-auth`` upgrade token) is fuzzed both ways: without a token every upgrade is
refused with HTTP 403, and with a valid one the fuzzed frames meet the channel's checks.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import pathlib
import pickle
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any
from unittest import mock

import httpx
import pytest
import websockets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from flame_asgi import ParentInfo, PayloadTooLarge, ProtocolError
from flame_asgi._runner.session import RunnerSession
from flame_asgi._wire.channel import MemoryChannel
from flame_asgi._wire.codec import TO_PARENT, TO_RUNNER, FrameOpener, FrameSealer, make_signer
from flame_asgi._wire.keys import AUTH_HEADER, RunnerKeys
from tests.reliability.support import alive, listening_addresses

SECRET = "fuzz-" + secrets.token_hex(16)
RID = "fuzz-1"
KEYS = RunnerKeys.derive(SECRET.encode(), RID)  # what the runner gets: its own keys, not SECRET
VERSION = "fuzz-build"
MARKER = pathlib.Path(tempfile.gettempdir()) / f"flame-fuzz-pwned-{os.getpid()}"
# Hypothesis caches things in ./.hypothesis even without an example database: not in the repo.
set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "flame-asgi-hypothesis"))
_BASE = settings(database=None, deadline=None, suppress_health_check=list(HealthCheck))


def fuzz(examples: int) -> settings:
    return settings(_BASE, max_examples=examples)


class Evil:
    """Unpickling this creates MARKER: proof that bytes reached the unpickler."""

    def __reduce__(self) -> Any:
        return (pathlib.Path(str(MARKER)).touch, ())


EVIL = pickle.dumps(Evil())


def _frame(header: bytes, payload: bytes) -> bytes:
    return len(header).to_bytes(4, "big") + header + payload


headers_json = st.fixed_dictionaries(
    {"s": st.text(max_size=20), "n": st.integers(-2, 2**40), "t": st.sampled_from(["hello", "call", "stop", "x"]),
     "i": st.integers(0, 5)},
    optional={"runner": st.just(RID), "v": st.just(VERSION), "d": st.text(max_size=64)},
).map(lambda h: json.dumps(h).encode())
keys = st.one_of(
    st.binary(min_size=1, max_size=40).map(lambda k: make_signer(k, RID, TO_RUNNER)),  # guessed key
    st.just(make_signer(SECRET.encode(), "fuzz-2", TO_RUNNER)),  # another runner's key
    st.just(make_signer(SECRET.encode(), RID, TO_PARENT)),  # the other direction's key
)
signed_elsewhere = st.builds(lambda signer, header: signer.sign(header), keys, headers_json)
fake_signature = st.builds(
    lambda header, ts, sig: header + b"." + base64.urlsafe_b64encode(ts).rstrip(b"=") + b"." + sig,
    headers_json, st.binary(max_size=6), st.binary(max_size=48))
payloads = st.one_of(st.just(EVIL), st.just(b""), st.binary(max_size=64).map(lambda b: EVIL + b))
forged_frames = st.one_of(
    st.binary(max_size=300),  # noise
    st.builds(_frame, st.binary(max_size=200), payloads),  # well framed, unsigned
    st.builds(_frame, fake_signature, payloads),  # looks signed
    st.builds(_frame, signed_elsewhere, payloads),  # really signed, with a key that is not this channel's
    st.builds(lambda n, rest: n.to_bytes(4, "big") + rest, st.integers(0, 2**32 - 1), st.binary(max_size=100)),
)
# After a genuine handshake, frames that pass as much as the attacker can make pass.
attacks = st.one_of(
    forged_frames.map(lambda f: ("raw", f)),
    st.binary(max_size=64).map(lambda junk: ("tampered", junk)),  # genuine header, swapped payload
    st.just(("replayed", b"")),  # the genuine hello again
    st.integers(2, 50).map(lambda n: ("out-of-order", n)),
    st.just(("other-session", b"")),
)


def _info() -> ParentInfo:
    return ParentInfo(pool="fuzz", runner_id=RID, parent_address="fuzz", backend="local", code_version=VERSION,
                      app="flame_asgi._bare:app", failsafe_timeout=5, heartbeat_interval=30, heartbeat_timeout=60)


def _sealer(session: str = "genuine") -> FrameSealer:
    return FrameSealer(make_signer(SECRET.encode(), RID, TO_RUNNER), session, 1 << 20)


@pytest.fixture
def unpickled() -> Iterator[list[bytes]]:
    """Records every pickle.loads (it still runs, so Evil would leave MARKER)."""
    calls: list[bytes] = []
    real = pickle.loads

    def recording(data: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(bytes(data))
        return real(data, *args, **kwargs)

    MARKER.unlink(missing_ok=True)
    with mock.patch.object(pickle, "loads", recording):
        yield calls
    assert not MARKER.exists()
    MARKER.unlink(missing_ok=True)


@fuzz(500)
@given(st.binary(max_size=2000) | forged_frames)
def test_the_codec_refuses_any_bytes_with_a_protocol_error(data: bytes) -> None:
    opener = FrameOpener(make_signer(SECRET.encode(), RID, TO_RUNNER), 1 << 20)
    with pytest.raises((ProtocolError, PayloadTooLarge)):
        opener.open(data)


async def _session(first: list[bytes], attack: list[tuple[str, Any]]) -> tuple[str, list[bytes]]:
    """Serve one session over memory; send ``first`` as strangers' frames (no handshake)
    or, when empty, a genuine hello then ``attack``. Return how it ended and the replies."""
    parent_end, runner_end = MemoryChannel.pair()
    session = RunnerSession(_info(), KEYS, local=True, max_threads=4)
    serving = asyncio.create_task(session.serve(runner_end))
    replies: list[bytes] = []
    if first:
        for frame in first:
            await parent_end.send(frame)
    else:
        sealer = _sealer()
        hello = sealer.seal("hello", runner=RID, v=VERSION)
        await parent_end.send(hello)
        replies.append(await asyncio.wait_for(parent_end.recv(), 5))  # ready
        for kind, arg in attack:
            if kind == "raw":
                frame = arg
            elif kind == "tampered":
                genuine = sealer.seal("call", 1, b"harmless")
                header_len = int.from_bytes(genuine[:4], "big")
                frame = genuine[: 4 + header_len] + EVIL + arg
            elif kind == "replayed":
                frame = hello
            elif kind == "out-of-order":
                other = _sealer()
                other._seq = sealer._seq + arg  # skips ahead
                frame = other.seal("call", 1, EVIL)
            else:
                frame = _sealer("someone-else").seal("call", 1, EVIL)
            await parent_end.send(frame)
    await asyncio.sleep(0)
    parent_end.close("fuzzer done")
    reason = await asyncio.wait_for(serving, 5)
    return reason, replies


@fuzz(300)
@given(st.lists(forged_frames, min_size=1, max_size=4))
def test_a_session_refuses_strangers_before_unpickling_anything(unpickled: list[bytes], frames: list[bytes]) -> None:
    reason, replies = asyncio.run(_session(frames, []))
    assert reason.startswith("handshake failed")  # a stranger's first frame ends only its own connection
    assert replies == [] and unpickled == []


@fuzz(300)
@given(st.lists(attacks, min_size=1, max_size=4))
def test_an_attached_session_ends_on_the_first_forged_frame_without_unpickling(
        unpickled: list[bytes], attack: list[tuple[str, Any]]) -> None:
    reason, replies = asyncio.run(_session([], attack))
    assert len(replies) == 1  # only "ready"
    assert reason.startswith("refused a message"), reason
    assert unpickled == []


# -- a real runner process ---------------------------------------------------------------
class RealRunner:
    def __init__(self, tmp: pathlib.Path) -> None:
        self.info = ParentInfo(pool="fuzz", runner_id=RID, parent_address="fuzz", backend="process",
                               code_version=VERSION, app="flame_asgi._bare:app", failsafe_timeout=300)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.ws_url = self.url.replace("http://", "ws://") + "/_flame/ws"
        self.log = tmp / "runner.log"
        env = {**os.environ, "FLAME_PARENT": self.info.encode(), "FLAME_RUNNER_KEYS": KEYS.encode(),
               "FLAME_CODE_VERSION": VERSION}
        env.pop("FLAME_SECRET", None)
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "flame_asgi._bare:app", "--fd", str(sock.fileno()),
                 "--lifespan", "on", "--log-level", "info", "--ws-per-message-deflate", "false"],
                pass_fds=(sock.fileno(),), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        sock.close()
        self.http = httpx.Client(base_url=self.url, trust_env=False, timeout=10)

    def health(self) -> dict[str, Any]:
        return self.http.get("/_flame/health").json()  # type: ignore[no-any-return]

    def close(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealRunner]:
    real = RealRunner(tmp_path_factory.mktemp("fuzz-runner"))
    try:
        for _ in range(300):
            try:
                real.health()
                break
            except httpx.TransportError:
                if real.proc.poll() is not None:
                    raise AssertionError(real.log.read_text()) from None
                time.sleep(0.05)
        yield real
    finally:
        real.close()


def _still_fine(runner: RealRunner) -> None:
    assert runner.proc.poll() is None, runner.log.read_text()[-2000:]
    assert runner.health() == {"status": "ok", "runner_id": RID, "pool": "fuzz"}


def _authed() -> dict[str, str]:
    """Headers that open the runner's door: a fresh token signed with its upgrade key."""
    return {AUTH_HEADER: KEYS.upgrade_token()}


@fuzz(60)
@given(st.lists(forged_frames | st.text(max_size=50), min_size=1, max_size=3))
def test_a_real_runner_survives_fuzzed_websocket_sessions(runner: RealRunner, unpickled: list[bytes],
                                                          frames: list[bytes | str]) -> None:
    # Without a token the upgrade is refused before any frame is read...
    with pytest.raises(InvalidStatus) as refused:
        connect(runner.ws_url, proxy=None, compression=None, open_timeout=10, ping_interval=None)
    assert refused.value.response.status_code == 403
    # ...and behind the door, the frames meet the channel's checks.
    with connect(runner.ws_url, proxy=None, compression=None, open_timeout=10, close_timeout=2,
                 ping_interval=None, additional_headers=_authed()) as ws:
        try:
            for frame in frames:
                ws.send(frame)
            if any(isinstance(f, bytes) for f in frames):
                reply = ws.recv(timeout=5)
                raise AssertionError(f"the runner answered a stranger: {reply!r}")
        except websockets.ConnectionClosed:
            pass  # the runner hung up on us: the expected answer
    _still_fine(runner)


token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-_0123456789", min_size=1, max_size=20)
value = st.text(alphabet=[chr(c) for c in range(0x20, 0x7F)], max_size=60).map(str.strip)


@fuzz(60)
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "OPTIONS", "HEAD", "PATCH"]),
       path=st.sampled_from(["/_flame/ws", "/_flame/health", "/_flame", "/", "/docs", "/_flame/../x"])
       | token.map(lambda t: "/_flame/" + t),
       headers=st.dictionaries(token.filter(lambda t: t not in ("host", "content-length", "transfer-encoding")),
                               value, max_size=6),
       body=st.binary(max_size=200))
def test_a_real_runner_answers_fuzzed_http_without_crashing(runner: RealRunner, method: str, path: str,
                                                            headers: dict[str, str], body: bytes) -> None:
    response = runner.http.request(method, path, headers=headers, content=body or None)
    assert response.status_code < 500, (response.status_code, response.text)
    if path != "/_flame/health":
        assert response.status_code >= 400  # runner mode: nothing but the health check answers
    _still_fine(runner)


@fuzz(40)
@given(key=value, version=value, extra=st.dictionaries(token, value, max_size=4), trailing=st.binary(max_size=100),
       auth=st.sampled_from(["none", "valid", "garbage"]))
def test_a_real_runner_survives_fuzzed_websocket_upgrades(runner: RealRunner, unpickled: list[bytes], key: str,
                                                          version: str, extra: dict[str, str],
                                                          trailing: bytes, auth: str) -> None:
    lines = ["GET /_flame/ws HTTP/1.1", "Host: 127.0.0.1", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {key}", f"Sec-WebSocket-Version: {version}",
             *(f"{k}: {v}" for k, v in extra.items())]
    if auth != "none":
        lines.append(f"{AUTH_HEADER}: {KEYS.upgrade_token() if auth == 'valid' else 'x' + key}")
    port = int(runner.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + trailing)
        conn.shutdown(socket.SHUT_WR)
        answer = b""
        try:
            while chunk := conn.recv(4096):
                answer += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    if answer:
        assert answer.startswith(b"HTTP/1.1 "), answer[:100]
        assert not answer.startswith(b"HTTP/1.1 5"), answer[:300]
        if auth != "valid" and answer.startswith(b"HTTP/1.1 101"):
            raise AssertionError(f"an upgrade without a valid token was accepted: {answer[:300]!r}")
    _still_fine(runner)


def test_after_the_fuzzing_the_runner_is_whole_and_accepts_its_real_parent(runner: RealRunner,
                                                                             unpickled: list[bytes]) -> None:
    _still_fine(runner)
    assert listening_addresses(runner.proc.pid) == [("127.0.0.1", int(runner.url.rsplit(":", 1)[1]))]
    sealer = _sealer()
    opener = FrameOpener(make_signer(SECRET.encode(), RID, TO_PARENT), 1 << 20, "genuine")
    with connect(runner.ws_url, proxy=None, compression=None, open_timeout=10, ping_interval=None,
                 additional_headers=_authed()) as ws:
        ws.send(sealer.seal("hello", runner=RID, v=VERSION))
        answer = ws.recv(timeout=5)
        assert isinstance(answer, bytes)
        reply = opener.open(answer)
        assert reply.type == "ready"
    log = runner.log.read_text()
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]
    assert SECRET not in log and KEYS.encode() not in log
    # The session ended when we left: a runner whose parent is gone exits.
    runner.proc.wait(15)
    assert not alive(runner.proc.pid)
