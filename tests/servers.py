"""Start real ASGI servers (uvicorn, gunicorn, hypercorn) on 127.0.0.1 for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import httpx

from tests.apps.procs import alive, descendants


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def command(server: str, app: str, port: int, workers: int = 1) -> list[str]:
    bind = f"127.0.0.1:{port}"
    if server == "uvicorn":
        return [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port),
                "--log-level", "warning", *(["--workers", str(workers)] if workers > 1 else [])]
    if server == "gunicorn":
        return [sys.executable, "-m", "gunicorn", app, "-k", "uvicorn.workers.UvicornWorker", "-w", str(workers),
                "-b", bind, "--graceful-timeout", "20", "--log-level", "warning"]
    if server == "hypercorn":
        return [sys.executable, "-m", "hypercorn", app, "-w", str(workers), "-b", bind, "--graceful-timeout", "20",
                "--log-level", "warning"]
    raise ValueError(server)


@contextmanager
def serve(app: str, *, server: str = "uvicorn", workers: int = 1, probe: str = "/_flame_probe",
          env: Mapping[str, str] | None = None,
          cwd: str | None = None) -> Iterator[tuple[str, subprocess.Popen[bytes], set[int]]]:
    """Serve ``app``; yield its URL, the server process and a set the test may add pids to.

    On exit the server gets SIGTERM, and every process it had below it (workers, fork
    servers, runners), plus every pid the test added, must be gone within 15 s.
    """
    port = free_port()
    proc = subprocess.Popen(command(server, app, port, workers), env={**os.environ, **(env or {})}, cwd=cwd)
    url = f"http://127.0.0.1:{port}"
    watched: set[int] = set()
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(url + probe, timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.05)
        yield url, proc, watched
        watched |= descendants(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"{server} did not stop within 40 s of SIGTERM") from None
    deadline = time.monotonic() + 15
    while (left := {pid for pid in watched if alive(pid)}) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, f"processes left behind after {server} stopped: {sorted(left)}"
