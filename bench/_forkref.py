"""``python -m bench._forkref``: the reference a fork server could reach.

A template process imports uvicorn, FastAPI, flame_asgi and the app once, holds no
threads, and forks on demand: for each ``fork`` line on stdin the child binds a port,
writes it to stdout and serves the app under uvicorn. The parent (``cold``) times from
the request to the first HTTP response: what scale-from-zero could cost with a
pre-started template, next to a fresh interpreter.
"""

from __future__ import annotations

import os
import socket
import sys

import uvicorn

import flame_asgi  # noqa: F401  (what a runner imports: paid once, in the template)
from bench.fastapi_app import app


def _serve_child() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    sys.stdout.write(f"{sock.getsockname()[1]}\n")
    sys.stdout.flush()
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
    uvicorn.Server(config).run(sockets=[sock])
    os._exit(0)


def main() -> None:
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    for line in sys.stdin:
        if line.strip() != "fork":
            continue
        if os.fork() == 0:
            _serve_child()
    # stdin closed: the parent is done; children are stopped by the parent


if __name__ == "__main__":
    main()
