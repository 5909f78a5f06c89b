"""``python -m flame_asgi.backends._serve APP (FD | --host H --port P) [options]``: a runner's uvicorn.

ProcessBackend hands it a socket it bound (``FD``); container and machine runners
(Docker, Kubernetes, Fly) give ``--host``/``--port`` and it binds there itself.

Why not ``python -m uvicorn APP --fd FD``: uvicorn wraps an inherited descriptor as an
AF_UNIX socket, so asyncio never sets TCP_NODELAY on its TCP connections and small
replies wait on Nagle's algorithm (tens of ms per message under some timings). Here the
socket is rebuilt with its real family and handed to ``uvicorn.Server`` directly.

The server is ``QuietServer``: uvicorn's main loop wakes ten times a second to see whether
it should exit, which an idle runner pays for all its life (and a machine with hundreds of
runners pays hundreds of times); this one wakes once a minute, only to refresh the Date
header of a runner's own replies (its WebSocket upgrade, its refusals: a runner serves no
web routes), and at once when a signal asks it to exit. Each wake costs an idle runner
about as much as its heartbeat tick.

Its HTTP protocol is uvicorn's own (``auto``), wrapped so that the parent's data
connections (``_runner.dataport``) share the port.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import sys
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from flame_asgi._base.settings import RUNNER_KEYS
from flame_asgi._runner import dataport

TICK = 60.0  # seconds between the main loop's wakes: how old the Date header of a runner's replies may be


class QuietServer(uvicorn.Server):
    """``uvicorn.Server`` whose main loop sleeps until a signal, or ``TICK``."""

    _wakeup: asyncio.Event | None = None
    _loop: asyncio.AbstractEventLoop | None = None

    async def main_loop(self) -> None:
        self._loop, self._wakeup = asyncio.get_running_loop(), asyncio.Event()
        counter = 0
        should_exit = await self.on_tick(counter)
        while not should_exit:
            # on_tick counts tenths of a second, and updates the Date header on every tenth
            counter = (counter + round(TICK * 10)) % 864000
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TICK):
                    await self._wakeup.wait()
            should_exit = await self.on_tick(counter)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        # A signal handler runs between two bytecodes of the main thread, which may be the
        # loop's own: hand the wake-up to the loop, as another thread would.
        if self._loop is not None and self._wakeup is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wakeup.set)


def take_keys(fd: int) -> None:
    """Set the runner's keys from the pipe ``fd`` (closed once read). Read after exec, they
    are never in /proc/<pid>/environ; read after a fork, never in the fork server's memory
    (which every later runner inherits). The runner pops them from os.environ as it reads them."""
    with os.fdopen(fd, "rb") as pipe:
        keys = pipe.read()
    if keys:
        os.environ[RUNNER_KEYS.name] = keys.decode()


def prepare(app: str, *, log_level: str, ws_max_size: int, graceful: int) -> uvicorn.Config:
    """uvicorn's configuration for ``app``, loaded (logging set up, the app and uvicorn's
    classes looked up): what a fork server's spare does before it has a runner to be."""
    # uvicorn's own HTTP protocol, behind one that also takes the parent's data connections
    # on this port (large payloads beside the WebSocket: _runner.dataport).
    dataport.serving = True
    config = uvicorn.Config(app, lifespan="on", log_level=log_level, access_log=False, ws_max_size=ws_max_size,
                            ws_per_message_deflate=False, timeout_graceful_shutdown=graceful,
                            http=dataport.sniffing(AutoHTTPProtocol))  # type: ignore[arg-type]
    config.load()
    return config


def serve(app: str, fd: int, *, log_level: str, ws_max_size: int, graceful: int,
          config: uvicorn.Config | None = None) -> int:
    """Serve ``app`` on the listening socket ``fd`` (with ``config`` if it was prepared
    already); return uvicorn's exit status."""
    sock = socket.socket(fileno=fd)  # family and type read from the descriptor itself
    # Inherited from the backend, so inheritable: under uvloop (uvicorn[standard]) every
    # subprocess the app starts (ffmpeg, say) would get the runner's listening socket.
    sock.set_inheritable(False)
    if config is None:
        config = prepare(app, log_level=log_level, ws_max_size=ws_max_size, graceful=graceful)
    server = QuietServer(config)
    server.run(sockets=[sock])
    return 0 if server.started else 3  # uvicorn's own code for a failed startup


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flame_asgi.backends._serve")
    parser.add_argument("app")
    parser.add_argument("fd", type=int, nargs="?", help="an inherited listening socket")
    parser.add_argument("--host", default="0.0.0.0", help="without FD: the address to listen on")
    parser.add_argument("--port", type=int, default=None, help="without FD: the port to listen on")
    parser.add_argument("--log-level", default="warning")
    parser.add_argument("--ws-max-size", type=int, default=16 * 1024 * 1024)
    parser.add_argument("--graceful", type=int, default=5)
    parser.add_argument("--keys-fd", type=int, default=None)
    args: Any = parser.parse_args(argv)
    if args.keys_fd is not None:
        take_keys(args.keys_fd)
    if (args.fd is None) == (args.port is None):
        parser.error("give either FD or --port")
    fd = args.fd if args.fd is not None else bound(args.host, args.port).detach()
    return serve(args.app, fd, log_level=args.log_level, ws_max_size=args.ws_max_size, graceful=args.graceful)


def bound(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` as uvicorn's ``--host``/``--port`` binds it, and
    not listening yet: uvicorn listens on it once the app's lifespan has started, so, as
    before, a connection is refused until the runner is ready, never left queued."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # As asyncio's create_server(host=...) does: "::" is IPv6 only (Fly's private
            # network), whatever the host's net.ipv6.bindv6only says.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


if __name__ == "__main__":
    sys.exit(main())
