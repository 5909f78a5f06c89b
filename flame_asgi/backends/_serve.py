"""``python -m flame_asgi.backends._serve APP FD [options]``: uvicorn on an inherited socket.

Why not ``python -m uvicorn APP --fd FD``: uvicorn wraps an inherited descriptor as an
AF_UNIX socket, so asyncio never sets TCP_NODELAY on its TCP connections and small
replies wait on Nagle's algorithm (tens of ms per message under some timings). Here the
socket is rebuilt with its real family and handed to ``uvicorn.Server`` directly.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from typing import Any

import uvicorn

from flame_asgi._base.settings import RUNNER_KEYS


def serve(app: str, fd: int, *, log_level: str, ws_max_size: int, graceful: int) -> int:
    """Serve ``app`` on the listening socket ``fd``; return uvicorn's exit status."""
    sock = socket.socket(fileno=fd)  # family and type read from the descriptor itself
    # Inherited from the backend, so inheritable: under uvloop (uvicorn[standard]) every
    # subprocess the app starts (ffmpeg, say) would get the runner's listening socket.
    sock.set_inheritable(False)
    config = uvicorn.Config(app, lifespan="on", log_level=log_level, access_log=False, ws_max_size=ws_max_size,
                            ws_per_message_deflate=False, timeout_graceful_shutdown=graceful)
    server = uvicorn.Server(config)
    server.run(sockets=[sock])
    return 0 if server.started else 3  # uvicorn's own code for a failed startup


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flame_asgi.backends._serve")
    parser.add_argument("app")
    parser.add_argument("fd", type=int)
    parser.add_argument("--log-level", default="warning")
    parser.add_argument("--ws-max-size", type=int, default=16 * 1024 * 1024)
    parser.add_argument("--graceful", type=int, default=5)
    parser.add_argument("--keys-fd", type=int, default=None)
    args: Any = parser.parse_args(argv)
    if args.keys_fd is not None:
        # Set after exec, so never in /proc/<pid>/environ; the runner pops it as it reads it.
        with os.fdopen(args.keys_fd, "rb") as keys:
            os.environ[RUNNER_KEYS.name] = keys.read().decode()
    return serve(args.app, args.fd, log_level=args.log_level, ws_max_size=args.ws_max_size, graceful=args.graceful)


if __name__ == "__main__":
    sys.exit(main())
