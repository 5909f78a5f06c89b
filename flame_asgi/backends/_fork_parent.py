"""The parent's side of the fork server (see ``_fork_template``): start it, ask it for runners.

``ForkServer.spawn`` returns a ``ForkedProcess`` with the surface ProcessRunnerHandle
uses of an ``asyncio.subprocess.Process`` (pid, returncode, wait(), stderr), so a forked
runner and a fresh-interpreter runner are handled alike.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import socket
import sys
from collections.abc import Mapping
from typing import Any

from flame_asgi._base.exceptions import FlameError
from flame_asgi._base.settings import RUNNER_KEYS

MAX_MESSAGE = 1 << 20
SPAWN_TIMEOUT = 10.0  # a fork takes milliseconds: past this the fork server is stuck


class ForkUnavailable(FlameError):
    """The fork server could not start or died: boot a fresh interpreter instead."""


class ForkedProcess:
    # The returncode of a runner that ended after its fork server died: nobody reaped it
    # for us, so how it ended is unknown. Neither an exit code (0..255) nor -signal.
    STATUS_LOST = -(1 << 16)

    def __init__(self, pid: int, exited: asyncio.Future[int], stderr: asyncio.StreamReader,
                 server: ForkServer, pipe: asyncio.BaseTransport | None = None) -> None:
        self.pid = pid
        self._exited = exited
        self.stderr = stderr
        self._server = server
        self._pipe = pipe

    def close_stderr(self) -> None:
        if self._pipe is not None:
            self._pipe.close()

    @property
    def returncode(self) -> int | None:
        return self._exited.result() if self._exited.done() else None

    async def wait(self) -> int:
        if not self._exited.done() and not self._server.gone.is_set():
            # The fork server reports every exit: wait for that, or for the server to go. No
            # polling while it is up: an idle pool of hundreds of runners must cost nothing.
            gone: asyncio.Future[Any] = asyncio.ensure_future(self._server.gone.wait())
            try:
                await asyncio.wait({self._exited, gone}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                gone.cancel()
        while not self._exited.done():
            if _ended(self.pid):  # the fork server is gone, nobody will report it: watch the pid ourselves
                self._exited.set_result(self.STATUS_LOST)
                break
            try:
                await asyncio.wait_for(asyncio.shield(self._exited), 0.1)
            except TimeoutError:
                continue
        return self._exited.result()


def _ended(pid: int) -> bool:
    """Whether a process that is not our child has ended."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:  # a zombie still answers kill(0), and its new parent (a container's pid 1) may never reap it
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:  # no /proc here, or it was reaped meanwhile (the next look says so)
        return False


class ForkServer:
    """One template process serving one app import string."""

    def __init__(self, app: str, env: Mapping[str, str]) -> None:
        self.app = app
        self._env = dict(env)
        self._sock: socket.socket | None = None
        self._proc: asyncio.subprocess.Process | None = None
        # Replies name their request: a request whose boot was cancelled or timed out
        # leaves here at once, and its late reply is known for an orphan.
        self._pending: dict[int, asyncio.Future[int]] = {}
        self._request_ids = itertools.count(1)
        self._exits: dict[int, asyncio.Future[int]] = {}
        self._orphans: set[int] = set()  # forks nobody claimed, killed, until reaped
        self._reader: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[None] | None = None
        self.alive = False
        self._send_lock = asyncio.Lock()
        self.gone = asyncio.Event()  # set once the fork server has ended: exits are no longer reported
        self.spare: int | None = None  # the pid of the child the fork server forked ahead of the next boot

    async def start(self, timeout: float = 30.0) -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "flame_asgi.backends._fork_template", self.app, str(theirs.fileno()),
                cwd=os.getcwd(), env=self._env, pass_fds=(theirs.fileno(),), stdin=asyncio.subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            theirs.close()
        ours.setblocking(False)
        self._sock = ours
        self._ready = loop.create_future()
        self._reader = loop.create_task(self._read())
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), timeout)
        except (TimeoutError, ForkUnavailable) as exc:
            await self.aclose()
            raise ForkUnavailable(f"fork server for {self.app} did not start: {exc}") from None
        self.alive = True

    async def _read(self) -> None:
        assert self._sock is not None and self._ready is not None
        loop = asyncio.get_running_loop()
        try:
            while True:
                data = await loop.sock_recv(self._sock, MAX_MESSAGE)
                if not data:
                    break
                message: dict[str, Any] = json.loads(data)
                if "ready" in message:
                    self._ready.set_result(None)
                elif "error" in message:
                    if not self._ready.done():
                        self._ready.set_exception(ForkUnavailable(message["error"]))
                elif "spare" in message:
                    self.spare = message["spare"] or None
                elif "pid" in message:
                    if message["pid"] == self.spare:
                        self.spare = None  # it is this boot's runner now
                    reply = self._pending.pop(message.get("id", 0), None)
                    if reply is None or reply.done():
                        self._abandon(message["pid"])  # its boot gave up waiting: nobody will run it
                    else:
                        reply.set_result(message["pid"])
                elif "exit" in message:
                    self._exited(message["exit"], message["code"])
        except (OSError, ValueError):
            pass
        finally:
            self.alive = False
            self.gone.set()
            if not self._ready.done():
                self._ready.set_exception(ForkUnavailable("the fork server exited"))
            pending, self._pending = self._pending, {}
            for reply in pending.values():
                if not reply.done():
                    reply.set_exception(ForkUnavailable("the fork server exited"))

    def _exited(self, pid: int, code: int) -> None:
        if pid in self._orphans:
            self._orphans.discard(pid)
            return
        fut = self._exits.pop(pid, None)
        if fut is None:  # it ended before spawn() took its reply: keep the status for it
            fut = asyncio.get_running_loop().create_future()
            self._exits[pid] = fut
        if not fut.done():
            fut.set_result(code)

    def _abandon(self, pid: int) -> None:
        """Kill a fork that no boot will claim; the fork server reaps it."""
        ended = self._exits.pop(pid, None)
        if ended is not None and ended.done():
            return  # it ended already, and was reaped
        self._orphans.add(pid)
        try:
            os.killpg(pid, signal.SIGKILL)  # it and whatever it started (its group: see _forkserver)
        except ProcessLookupError:
            pass

    async def spawn(self, *, env: Mapping[str, str], listen: socket.socket, log_level: str, ws_max_size: int,
                    graceful: int) -> ForkedProcess:
        if not self.alive or self._sock is None:
            raise ForkUnavailable("the fork server is not running")
        loop = asyncio.get_running_loop()
        env = dict(env)
        # The keys go in a pipe the child reads after the fork, never through the fork server:
        # what it read would stay in its memory, inherited by every runner it forks later.
        keys = env.pop(RUNNER_KEYS.name, "").encode()
        keys_read, keys_write = os.pipe()
        os.write(keys_write, keys)  # ~130 bytes: far below a pipe's buffer
        os.close(keys_write)
        read_fd, write_fd = os.pipe()
        request_id = next(self._request_ids)
        request = {"id": request_id, "app": self.app, "env": env, "log_level": log_level,
                   "ws_max_size": ws_max_size, "graceful": graceful}
        reply: asyncio.Future[int] = loop.create_future()
        self._pending[request_id] = reply
        try:
            await self._send(json.dumps(request).encode(), [listen.fileno(), write_fd, keys_read])
        except (OSError, TimeoutError) as exc:
            self._pending.pop(request_id, None)
            os.close(read_fd)
            raise ForkUnavailable(f"could not reach the fork server: {exc!r}") from None
        finally:
            os.close(write_fd)
            os.close(keys_read)
        try:
            pid = await asyncio.wait_for(reply, SPAWN_TIMEOUT)
        except BaseException as exc:
            os.close(read_fd)
            self._pending.pop(request_id, None)  # a reply still to come is an orphan's
            if reply.done() and not reply.cancelled() and reply.exception() is None:
                self._abandon(reply.result())  # forked, but this boot is over
            if isinstance(exc, TimeoutError):
                raise ForkUnavailable(f"the fork server did not answer within {SPAWN_TIMEOUT:g} s") from None
            raise
        stderr = asyncio.StreamReader()
        try:
            pipe, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stderr),
                                                   os.fdopen(read_fd, "rb"))
        except BaseException:
            self._abandon(pid)
            raise
        exited = self._exits.pop(pid, None)  # set already if it ended that quickly
        if exited is None:
            exited = loop.create_future()
            self._exits[pid] = exited
        return ForkedProcess(pid, exited, stderr, self, pipe)

    async def _send(self, message: bytes, fds: list[int]) -> None:
        """One request, waiting while the socket's buffer is full: hundreds of boots at once
        queue here instead of failing over to fresh interpreters, which would starve the
        fork server of the CPU it needs to catch up."""
        assert self._sock is not None
        loop = asyncio.get_running_loop()
        # One sender at a time: a descriptor has one writer callback, so waiters take turns.
        async with asyncio.timeout(SPAWN_TIMEOUT), self._send_lock:
            while True:
                try:
                    socket.send_fds(self._sock, [message], fds)
                    return
                except BlockingIOError:
                    writable = loop.create_future()
                    loop.add_writer(self._sock.fileno(), writable.set_result, None)
                    try:
                        await writable
                    finally:
                        loop.remove_writer(self._sock.fileno())

    async def aclose(self) -> None:
        self.alive = False
        self.gone.set()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._reader is not None:
            self._reader.cancel()
        if self._proc is not None and self._proc.returncode is None:
            try:
                self._proc.terminate()
                await asyncio.wait_for(self._proc.wait(), 5.0)
            except (TimeoutError, ProcessLookupError):
                self._proc.kill()
                await self._proc.wait()
