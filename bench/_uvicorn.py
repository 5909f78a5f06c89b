"""Start ``python -m uvicorn <app>`` on a socket bound here, and stop it again.

As ProcessBackend does, the parent binds the port and passes the descriptor, so the
first request waits in the backlog until the app is up: no polling, no port race.
``bench._serve`` (not ``uvicorn --fd``) receives it, so that TCP_NODELAY is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator

MAX_WS = 256 * 1024 * 1024


async def start(app: str) -> tuple[asyncio.subprocess.Process, str]:
    """Launch uvicorn serving ``app``; returns the process and its ``http://`` base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(256)
        port = sock.getsockname()[1]
        cmd = [sys.executable, "-m", "bench._serve", app, str(sock.fileno()), str(MAX_WS)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
        proc = await asyncio.create_subprocess_exec(*cmd, pass_fds=(sock.fileno(),), env=env,
                                                    stdin=asyncio.subprocess.DEVNULL, start_new_session=True)
    finally:
        sock.close()
    return proc, f"http://127.0.0.1:{port}"


async def stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 5.0)
        except TimeoutError:
            proc.kill()
    await proc.wait()


@contextlib.asynccontextmanager
async def serving(app: str) -> AsyncIterator[str]:
    proc, url = await start(app)
    try:
        yield url
    finally:
        await stop(proc)
