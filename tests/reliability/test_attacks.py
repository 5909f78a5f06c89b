"""Attacks on real runners over 127.0.0.1, one per finding of the security review
(docs/security.md says what each one defends).

1. A stranger who connects first (before the parent) to a booting runner.
2. A whole session copied by an on-path relay and replayed on a second connection.
3. Hundreds of MiB sent before authenticating, to raise the runner's memory.
4. The keys a runner holds, seen by the processes it starts.
5. One runner's keys (a compromised runner) used on another runner.

Every attack is bounded in time and in connections, and is made only against processes
this test started.
"""

from __future__ import annotations

import asyncio
import base64
import os
import pathlib
import pickle
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest

from flame_asgi import FlamePool, ProcessBackend
from flame_asgi._base.secret import channel_secret
from flame_asgi._wire.codec import FrameKey, FrameSealer
from flame_asgi._wire.keys import AUTH_HEADER, RunnerKeys
from flame_asgi.backends import RunnerSpec
from flame_asgi.backends.process import ProcessRunnerHandle
from tests.apps.procs import descendants
from tests.knock import knock
from tests.reliability import work
from tests.reliability.support import booted, in_flight, socket_inodes, until

MiB = 1024 * 1024


class Evil:
    """Unpickling this creates ``path``: proof that an attacker's bytes reached the unpickler."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (pathlib.Path(self.path).touch, ())


# -- functions the runners run (this module is importable there) ---------------------------
def append_line(path: str, line: str) -> str:
    """Leave one line per execution: a call run twice leaves two."""
    with open(path, "a") as f:
        f.write(line + "\n")
    return line


def environment_seen() -> dict[str, str]:
    """What the runner's own process and a subprocess it starts see of the environment."""
    child = subprocess.run(["env"], capture_output=True, text=True, check=True, timeout=10).stdout
    return {"subprocess": child, "os.environ": "\n".join(f"{k}={v}" for k, v in os.environ.items())}


def _names(env_text: str) -> set[str]:
    return {line.partition("=")[0] for line in env_text.splitlines()}


# -- a raw WebSocket client, to send what a library would refuse to ---------------------------
def upgrade_request(port: int, token: str | None = None, path: str = "/_flame/ws") -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
    if token is not None:
        lines.append(f"{AUTH_HEADER}: {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def frame_header(length: int) -> bytes:
    """A client's (masked) binary WebSocket frame header announcing ``length`` bytes."""
    if length < 126:
        size = bytes([0x80 | length])
    elif length < 1 << 16:
        size = bytes([0x80 | 126]) + length.to_bytes(2, "big")
    else:
        size = bytes([0x80 | 127]) + length.to_bytes(8, "big")
    return b"\x82" + size + b"\x00\x00\x00\x00"  # FIN + binary; a zero mask leaves the payload as is


def ws_frame(payload: bytes) -> bytes:
    return frame_header(len(payload)) + payload


def status_of(answer: bytes) -> str:
    """``"403"`` from ``b"HTTP/1.1 403 Forbidden..."``; what came back otherwise."""
    first = answer.split(b"\r\n", 1)[0]
    parts = first.split()
    return parts[1].decode() if len(parts) > 1 and first.startswith(b"HTTP/") else f"no answer {first[:40]!r}"


def read_answer(conn: socket.socket, limit: int = 1 << 16) -> bytes:
    answer = b""
    try:
        while b"\r\n\r\n" not in answer and len(answer) < limit:
            chunk = conn.recv(4096)
            if not chunk:
                break
            answer += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return answer


def port_of(url: str | None) -> int:
    assert url is not None
    return int(url.rsplit(":", 1)[1])


def vm_hwm(pid: int) -> int:
    """The process's peak resident memory (VmHWM), in bytes."""
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for {pid}")


# == 1. a keyless racer ==============================================================================
def _listening_on_loopback() -> set[tuple[int, str]]:
    """(port, socket inode) of every TCP socket listening on 127.0.0.1 in this network namespace."""
    found = set()
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            address, _, port = fields[1].partition(":")
            if fields[3] == "0A" and address == "0100007F":  # LISTEN on 127.0.0.1 (little-endian hex)
                found.add((int(port, 16), fields[9]))
    return found


def _socket_inodes_of_this_process_tree() -> set[str]:
    """The socket inodes held by this process and its descendants (runners, the fork server)."""
    return set().union(*(socket_inodes(pid) for pid in {os.getpid(), *descendants(os.getpid())}))


RACER_STAYS = 0.3  # seconds a racer let in would stay; the test's calls last longer
CALL_SECONDS = 0.8


class Racer:
    """Watches /proc/net/tcp and dials every new loopback listener of this process tree at
    once, without a key: three upgrades, two without a token and one with a garbage token.
    Let in, each stays a while (the parent attaches meanwhile), two of them then send a
    message whose unpickling would create ``marker``, and all leave; refused, the two try
    to send it anyway."""

    def __init__(self, marker: pathlib.Path, *, max_ports: int = 60, seconds: float = 60.0) -> None:
        self.message = ws_frame(pickle.dumps(Evil(str(marker))))
        self.max_ports = max_ports
        self.deadline = time.monotonic() + seconds
        self.answers: dict[int, list[str]] = {}  # port -> status of each dial
        self.dialed: set[int] = set()  # ports whose three requests were sent
        self._known = _listening_on_loopback()  # listening before the test: not ours to dial
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._watcher = threading.Thread(target=self._watch, name="racer", daemon=True)

    def __enter__(self) -> Racer:
        self._watcher.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._watcher.join(10)
        for thread in self._threads:
            thread.join(10)

    def _watch(self) -> None:
        looked: dict[tuple[int, str], int] = {}  # new listeners not (yet) found in this process tree
        while not self._stop.is_set() and time.monotonic() < self.deadline:
            new = _listening_on_loopback() - self._known
            if new:
                ours = _socket_inodes_of_this_process_tree()
                for port, inode in new:
                    looked[port, inode] = looked.get((port, inode), 0) + 1
                    # A socket passing from the parent to its runner can slip between two
                    # reads of /proc: look a few times before calling it somebody else's.
                    if inode in ours or looked[port, inode] >= 5:
                        self._known.add((port, inode))
                    if inode in ours and len(self.answers) < self.max_ports:
                        self.answers[port] = []
                        self._dial(port)
            time.sleep(0.001)

    def _dial(self, port: int) -> None:
        conns = []
        for token, message in ((None, b""), (None, self.message), ("garbage-" + os.urandom(8).hex(), self.message)):
            try:
                conn = socket.create_connection(("127.0.0.1", port), timeout=10)
                conn.sendall(upgrade_request(port, token))
            except OSError as exc:
                with self._lock:
                    self.answers[port].append(f"dial failed: {exc!r}")
                continue
            conns.append((conn, message))
        self.dialed.add(port)  # all three requests are in the runner's backlog, before the parent's
        for conn, message in conns:
            thread = threading.Thread(target=self._answer, args=(port, conn, message), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _answer(self, port: int, conn: socket.socket, message: bytes) -> None:
        # The message goes after the answer: uvicorn drops bytes sent with the upgrade request.
        with conn:
            status = status_of(read_answer(conn))
            if status == "101":  # let in: stay while the parent attaches and its calls run
                time.sleep(RACER_STAYS)
            try:
                conn.sendall(message)
            except OSError:
                pass
        with self._lock:
            self.answers[port].append(status)

    async def wait_dialed(self, port: int, timeout: float) -> None:
        end = time.monotonic() + timeout
        while port not in self.dialed and time.monotonic() < end:
            await asyncio.sleep(0.002)


def _wrap_connect(handle: ProcessRunnerHandle, before: Callable[[], Awaitable[None]]) -> None:
    """Run ``before`` each time the parent is about to connect to this runner."""
    real = handle.connect

    async def connect_after(timeout: float | None) -> Any:
        await before()
        return await real(timeout)

    handle.connect = connect_after  # type: ignore[method-assign]


class RacedBackend(ProcessBackend):
    """Real runners whose parent connects only once the racer's dials are in the backlog:
    the race the stranger wins, made certain."""

    def __init__(self, racer: Racer) -> None:
        super().__init__()
        self.racer = racer
        self.ports: list[int] = []

    async def boot(self, spec: RunnerSpec) -> ProcessRunnerHandle:
        handle = await super().boot(spec)
        port = port_of(handle.url)
        self.ports.append(port)
        _wrap_connect(handle, lambda: self.racer.wait_dialed(port, 5.0))
        return handle


@pytest.mark.slow
async def test_a_keyless_racer_costs_the_parent_nothing(tmp_path: pathlib.Path) -> None:
    marker = tmp_path / "pwned"
    grown: list[tuple[BaseException | None, str]] = []

    def grow_end(error: BaseException | None, meta: dict[str, Any]) -> None:
        grown.append((error, str(meta["runner_id"])))

    with Racer(marker) as racer:
        backend = RacedBackend(racer)
        async with FlamePool("raced", backend=backend, max=3, max_concurrency=2, idle_shutdown_after=0.3,
                             boot_timeout=20, on_grow_end=grow_end) as pool:
            results = []
            for wave in range(6):  # waves of 5 calls, idle gaps between: runners boot, idle out, boot again
                calls = [pool.call(work.touch_after, CALL_SECONDS, str(tmp_path / f"{wave}-{i}")) for i in range(5)]
                results.extend(await asyncio.gather(*calls, return_exceptions=True))
                await asyncio.sleep(0.7)
    assert results == ["touched"] * 30  # no RunnerLost, no BootError: every call succeeded
    # Every boot succeeded, and none was extra: 5 calls need 3 runners of 2 slots, and idle
    # runners stop between waves (18 boots here; fewer if a runner outlived a gap).
    assert [error for error, _ in grown] == [None] * len(grown)
    assert len(grown) == len(backend.ports) and 3 < len(grown) <= 6 * 3, (grown, backend.ports)
    # The racer was first in every runner's backlog, and every one of its dials was refused at the door.
    assert set(backend.ports) <= racer.dialed, (backend.ports, racer.dialed)
    refused = {port: answers for port, answers in racer.answers.items() if port in backend.ports}
    assert refused == {port: ["403"] * 3 for port in backend.ports}
    assert not marker.exists()


class GatedBackend(ProcessBackend):
    """Real runners; the parent connects to the ``gated``-th one only once ``gate`` is set, so
    the test can knock on a booted runner's door before its real parent does."""

    def __init__(self, gated: int) -> None:
        super().__init__()
        self.gated = gated
        self.gate = asyncio.Event()
        self.handles: list[ProcessRunnerHandle] = []

    async def _at_the_gate(self) -> None:
        await self.gate.wait()

    async def boot(self, spec: RunnerSpec) -> ProcessRunnerHandle:
        handle = await super().boot(spec)
        self.handles.append(handle)
        if len(self.handles) == self.gated:
            _wrap_connect(handle, self._at_the_gate)
        return handle

    async def wait_up(self, n: int) -> ProcessRunnerHandle:
        """The ``n``-th runner, once it is booted and its app answers."""
        await until(lambda: len(self.handles) >= n, 20, f"runner {n} to boot")
        handle = self.handles[n - 1]
        async with httpx.AsyncClient(trust_env=False) as client:
            for _ in range(400):
                try:
                    await client.get(f"{handle.url}/_flame/health")
                    break
                except httpx.TransportError:
                    await asyncio.sleep(0.025)
        return handle


# == 2. a relayed copy of a session ======================================================================
class Relay:
    """An on-path relay between the parent and one runner: it forwards the parent's stream
    and, once the runner has answered the parent's upgrade, replays every byte the parent
    sent (the upgrade request with its token, then its frames) on a second connection."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.recorded = bytearray()
        self.replays: list[str] = []  # how the runner answered each replayed connection
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _relay(self, parent_r: asyncio.StreamReader, parent_w: asyncio.StreamWriter) -> None:
        # Tracked, so that aclose() ends it: the server's close() leaves open connections be,
        # and a writer left to the garbage collector after the loop closed warns.
        this = asyncio.current_task()
        if this is not None:
            self._tasks.add(this)
        try:
            await self._pipe(parent_r, parent_w)
        finally:
            parent_w.close()

    async def _pipe(self, parent_r: asyncio.StreamReader, parent_w: asyncio.StreamWriter) -> None:
        runner_r, runner_w = await asyncio.open_connection("127.0.0.1", self.target)
        answered = asyncio.Event()
        mirror: asyncio.Queue[bytes] = asyncio.Queue()

        async def parent_to_runner() -> None:
            while data := await parent_r.read(1 << 16):
                self.recorded += data
                mirror.put_nowait(data)
                runner_w.write(data)
                await runner_w.drain()
            runner_w.close()

        async def runner_to_parent() -> None:
            while data := await runner_r.read(1 << 16):
                answered.set()
                parent_w.write(data)
                await parent_w.drain()
            parent_w.close()

        async def replay() -> None:
            await answered.wait()  # the parent's upgrade went through: now copy it, frames and all
            self.replays.append(await self.replay(mirror))

        self._spawn(replay())
        try:
            await asyncio.gather(parent_to_runner(), runner_to_parent(), return_exceptions=True)
        finally:
            runner_w.close()

    async def replay(self, mirror: asyncio.Queue[bytes] | None = None) -> str:
        """Send everything recorded so far on a new connection to the runner (then, with
        ``mirror``, what the parent sends next); return the runner's answer."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.target)

        async def copy() -> None:
            writer.write(bytes(self.recorded))
            while mirror is not None:
                data = await mirror.get()
                writer.write(data)
                await writer.drain()

        copying = asyncio.ensure_future(copy())
        try:
            answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            answer = getattr(exc, "partial", b"")
        try:
            if status_of(answer) == "101":  # let in: keep feeding it the parent's frames for a while
                await asyncio.sleep(1.0)
        finally:
            copying.cancel()
            writer.close()
        return status_of(answer)


class RelayedBackend(ProcessBackend):
    """Real runners the parent reaches through a Relay."""

    def __init__(self) -> None:
        super().__init__()
        self.relays: list[Relay] = []

    async def boot(self, spec: RunnerSpec) -> ProcessRunnerHandle:
        handle = await super().boot(spec)
        relay = Relay(port_of(handle.url))
        await relay.start()
        self.relays.append(relay)
        handle.url = f"http://127.0.0.1:{relay.port}"
        return handle

    async def aclose(self) -> None:
        for relay in self.relays:
            await relay.aclose()
        await super().aclose()


async def test_a_relayed_copy_of_a_session_runs_nothing_twice(tmp_path: pathlib.Path) -> None:
    ledger = tmp_path / "ran"
    backend = RelayedBackend()
    async with FlamePool("relayed", backend=backend, boot_timeout=20) as pool:
        first = [await pool.call(append_line, str(ledger), f"call-{i}") for i in range(5)]  # one at a time
        rest = await asyncio.gather(*(pool.call(append_line, str(ledger), f"call-{i}") for i in range(5, 10)))
        assert first + rest == [f"call-{i}" for i in range(10)]
        (relay,) = backend.relays
        await until(lambda: relay.replays, 10, "the relay's replay to be answered")
        # The whole session so far (upgrade, token, hello, ten calls), replayed while the parent is attached.
        relay.replays.append(await relay.replay())
        await asyncio.sleep(0.5)  # what the runner would run, it would have run by now
        assert await pool.call(work.square, 7) == 49  # the parent's session is undisturbed
    assert sorted(ledger.read_text().split()) == [f"call-{i}" for i in range(10)]  # each ran exactly once
    recorded = bytes(relay.recorded)
    assert recorded.startswith(b"GET /_flame/ws") and AUTH_HEADER.encode() in recorded.lower()
    assert len(recorded) > 10 * 100  # the calls' frames were recorded, and offered to the runner again
    assert relay.replays == ["403", "403"]  # refused at the door: not a byte of the copy was read


# == 3. memory before authentication ======================================================================
ANNOUNCED = 400 * MiB


def _stream(port: int, head: bytes, body_head: bytes, total: int, seconds: float = 30.0) -> tuple[int, str]:
    """Send ``head``; for an upgrade, wait for the answer (uvicorn drops bytes sent with the
    request); then ``body_head`` and up to ``total`` bytes, stopping at the first error or
    after ``seconds``. Return how many were sent and the runner's answer."""
    sent = 0
    chunk = b"\x00" * MiB
    end = time.monotonic() + seconds
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        answer = b""
        try:
            conn.sendall(head)
            if head.startswith(b"GET"):
                answer = read_answer(conn)
            conn.sendall(body_head)
            while sent < total and time.monotonic() < end:
                conn.sendall(chunk[: min(MiB, total - sent)])
                sent += min(MiB, total - sent)
        except OSError:
            pass
        if not answer:
            try:
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            answer = read_answer(conn)
        return sent, status_of(answer)


async def _starve(port: int) -> dict[str, tuple[int, str]]:
    attacks = {  # request, then what announces the 400 MiB
        "upgrade, no token": (upgrade_request(port), frame_header(ANNOUNCED)),
        "upgrade, garbage token": (upgrade_request(port, "x" * 64), frame_header(ANNOUNCED)),
        "plain POST to the door": (f"POST /_flame/ws HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                   f"Content-Length: {ANNOUNCED}\r\n\r\n".encode(), b""),
    }
    return {name: await asyncio.to_thread(_stream, port, head, body, ANNOUNCED)
            for name, (head, body) in attacks.items()}


async def test_an_unauthenticated_400_mib_message_does_not_raise_the_runners_memory() -> None:
    backend = GatedBackend(gated=1)
    async with FlamePool("hungry", backend=backend, boot_timeout=30) as pool:
        first = asyncio.ensure_future(pool.call(work.pid))  # boots the runner; its parent waits at the gate
        try:
            handle = await backend.wait_up(1)
            pid, port = handle.proc.pid, port_of(handle.url)
            before = vm_hwm(pid)
            unclaimed = await _starve(port)  # the door not yet taken: the window strangers had
            backend.gate.set()
            assert await asyncio.wait_for(first, 20) == pid  # the real parent gets in, and its call runs
        finally:
            backend.gate.set()
            first.cancel()
        attached = await _starve(port)  # and once the parent holds the door
        after = vm_hwm(pid)
        for when, outcomes in (("unclaimed", unclaimed), ("attached", attached)):
            print(f"\n{when}: " + "; ".join(f"{name}: {sent / MiB:.0f} MiB sent, answer {answer}"
                                            for name, (sent, answer) in outcomes.items()), end="")
        print(f"\nthe runner's peak memory: {before / MiB:.0f} -> {after / MiB:.0f} MiB")
        assert after - before < 50 * MiB
        assert await pool.call(work.pid) == pid  # the same runner still serves its parent
    for outcomes in (unclaimed, attached):
        assert outcomes["upgrade, no token"][1] == "403" and outcomes["upgrade, garbage token"][1] == "403"
        assert outcomes["plain POST to the door"][1] == "404"  # runner mode: no route; the body is dropped


# == 4. what a runner's subprocesses see ======================================================================
@pytest.mark.parametrize("fork", [True, False], ids=["forked", "fresh-interpreter"])
async def test_a_runners_subprocesses_do_not_see_its_keys(fork: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLAME_SECRET", raising=False)
    async with FlamePool("env", backend=ProcessBackend(fork=fork), boot_timeout=20) as pool:
        seen = await pool.call(environment_seen)
        (runner,) = booted(pool)
        keys = runner.handle.spec.keys.encode()
    # (Assertions on names and flags only: a failure must not print the runner's environment.)
    for where, text in seen.items():
        names = _names(text) & {"FLAME_PARENT", "FLAME_RUNNER_KEYS", "FLAME_SECRET"}
        assert names == {"FLAME_PARENT"}, where  # FLAME_PARENT stays: flame_asgi.parent() reads it
        values_found = keys in text or channel_secret() in text
        assert not values_found, where


async def test_a_parents_flame_secret_does_not_reach_its_runners(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLAME_SECRET", "root-" + os.urandom(16).hex())  # as docs/security.md allows
    async with FlamePool("env-root", backend=ProcessBackend(), boot_timeout=20) as pool:
        seen = await pool.call(environment_seen)
    for where, text in seen.items():
        found = "FLAME_SECRET" in _names(text) or os.environ["FLAME_SECRET"] in text
        assert not found, where


@pytest.mark.parametrize("fork", [
    True,
    False,
], ids=["forked", "fresh-interpreter"])
async def test_a_same_uid_process_does_not_find_the_keys_in_proc_environ(fork: bool) -> None:
    async with FlamePool("proc-env", backend=ProcessBackend(fork=fork), boot_timeout=20) as pool:
        await pool.call(work.pid)
        (runner,) = booted(pool)
        environ = pathlib.Path(f"/proc/{runner.handle.proc.pid}/environ").read_bytes()
        readable = b"PATH=" in environ  # what another process of the same user reads there
        found = b"FLAME_RUNNER_KEYS" in environ or runner.handle.spec.keys.encode().encode() in environ
        assert readable and not found


def memory_of(pid: int) -> list[bytes]:
    """Every readable mapping of process ``pid``, as another process of its user reads it."""
    regions = []
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in maps:
            span, perms, *rest = line.split()
            if not perms.startswith("r") or (rest and rest[-1].startswith(("[vvar", "[vsyscall"))):
                continue
            start, end = (int(address, 16) for address in span.split("-"))
            try:
                mem.seek(start)
                regions.append(mem.read(end - start))
            except OSError:  # a mapping that went away, or one the kernel will not read out
                continue
    return regions


def holds(regions: list[bytes], keys: RunnerKeys) -> bool:
    """Whether any of ``keys`` lies in ``regions``: as sent (base64) or decoded."""
    secrets = [keys.encode().encode(), keys.to_runner, keys.to_parent, keys.upgrade]
    return any(secret in region for region in regions for secret in secrets)


async def test_a_forked_runner_and_its_fork_server_hold_no_other_runners_keys(tmp_path: pathlib.Path) -> None:
    # Runner A is forked; B is forked after it (from the spare the fork server made once A was
    # answered). A process that reads B's memory (B's own code, or anyone who can read B)
    # must not find A's keys there, nor anyone's in the fork server every runner is forked from.
    async with FlamePool("heap", backend=ProcessBackend(fork=True), max=2, max_concurrency=1,
                         boot_timeout=20) as pool:
        (held,) = await in_flight(pool, tmp_path, 1)  # A's only slot
        try:
            await pool.call(work.pid)  # needs B
            first, second = booted(pool)
            forkserver = pool.backend._forkserver  # type: ignore[attr-defined]
            assert forkserver is not None and forkserver.alive  # both were forked
            template = memory_of(forkserver._proc.pid)
            on_b = memory_of(second.handle.proc.pid)
            assert holds(on_b, second.handle.spec.keys)  # the scan finds keys where they are
            found = {"A's keys on B": holds(on_b, first.handle.spec.keys),
                     "A's keys on the fork server": holds(template, first.handle.spec.keys),
                     "B's keys on the fork server": holds(template, second.handle.spec.keys)}
            assert not any(found.values()), found
        finally:
            held.cancel()
            await asyncio.gather(held, return_exceptions=True)


# == 5. one runner's keys on another runner ======================================================================
async def _door(url: str, token: str, frames: list[bytes]) -> str:
    """Knock with ``token``, send ``frames``; how the runner answered."""
    return await knock(url, frames, token, wait=5)


@pytest.fixture
async def two_runners(tmp_path: pathlib.Path) -> AsyncIterator[tuple[GatedBackend, asyncio.Task[Any]]]:
    """Runner A attached and busy; runner B booted, its parent held at B's door."""
    backend = GatedBackend(gated=2)
    async with FlamePool("pair", backend=backend, max=2, max_concurrency=1, boot_timeout=30) as pool:
        (held,) = await in_flight(pool, tmp_path, 1)  # A's only slot
        second = asyncio.ensure_future(pool.call(work.pid))  # needs B
        try:
            await backend.wait_up(2)
            yield backend, second
        finally:
            backend.gate.set()
            held.cancel()
            second.cancel()
            await asyncio.gather(held, second, return_exceptions=True)


async def test_one_runners_keys_open_nothing_on_another(two_runners: tuple[GatedBackend, asyncio.Task[Any]],
                                                        tmp_path: pathlib.Path) -> None:
    backend, second = two_runners
    a, b = backend.handles
    keys_a = RunnerKeys.derive(channel_secret().encode(), a.spec.runner_id)  # what a compromised A holds
    keys_b = RunnerKeys.derive(channel_secret().encode(), b.spec.runner_id)  # the test knows the root
    assert keys_a.encode() == a.spec.keys.encode() and keys_b.encode() == b.spec.keys.encode()
    marker = tmp_path / "pwned"
    evil = pickle.dumps(Evil(str(marker)))
    version = b.spec.info.code_version
    assert b.url is not None

    def sealed_with_a(runner: str) -> list[bytes]:
        sealer = FrameSealer(FrameKey(keys_a.to_runner), "stolen", 1 << 20)
        return [sealer.seal("hello", runner=runner, v=version), sealer.seal("call", 1, evil)]

    # A's door token does not open B's door...
    assert await _door(b.url, keys_a.upgrade_token(), sealed_with_a(b.spec.runner_id)) == "refused 403"
    # ...and behind B's door (a token of B's own), a hello signed with A's keys is refused, naming
    # either runner; nothing of the call is unpickled.
    for named in (b.spec.runner_id, a.spec.runner_id):
        assert (await _door(b.url, keys_b.upgrade_token(), sealed_with_a(named))).startswith("closed")
    # B's channel key, but for the other direction (what B itself signs with), is refused too.
    reflected = FrameSealer(FrameKey(keys_b.to_parent), "reflected", 1 << 20)
    assert (await _door(b.url, keys_b.upgrade_token(),
                        [reflected.seal("hello", runner=b.spec.runner_id, v=version)])).startswith("closed")
    await asyncio.sleep(0.3)
    assert not marker.exists()
    # B is still its parent's: once the parent reaches the door, the waiting call runs there.
    backend.gate.set()
    assert await asyncio.wait_for(second, 20) == b.proc.pid
    assert not marker.exists()
