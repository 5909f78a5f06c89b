"""``python -m flame_asgi.backends._serve APP --host H --port P``: how container runners
(Docker, Kubernetes, Fly) serve, with a real uvicorn process."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from flame_asgi.backends._serve import bound
from flame_asgi.backends._toolkit import uvicorn_command


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_port_refuses_connections_until_uvicorn_listens_on_it() -> None:
    sock = bound("127.0.0.1", 0)
    try:
        with pytest.raises(ConnectionRefusedError):  # bound, not listening: nothing queues
            socket.create_connection(sock.getsockname(), timeout=2).close()
    finally:
        sock.close()


def test_ipv6_any_is_ipv6_only_as_uvicorn_binds_it() -> None:
    sock = bound("::", 0)
    try:
        assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    finally:
        sock.close()


def test_a_container_runners_command_serves_the_app_on_its_port() -> None:
    port = free_port()
    cmd = uvicorn_command(sys.executable, "flame_asgi._bare:app", host="127.0.0.1", port=port,
                          log_level="warning", max_payload=1 << 20, stop_timeout=1.0)
    assert cmd[1:4] == ["-m", "flame_asgi.backends._serve", "flame_asgi._bare:app"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                # Not in runner mode (no FLAME_PARENT): the bare app has no routes of its own.
                assert httpx.get(f"http://127.0.0.1:{port}/", timeout=2).status_code == 404
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
                assert time.monotonic() < deadline, "the runner never served"
                time.sleep(0.05)
    finally:
        proc.terminate()
        # A graceful stop: uvicorn shuts down, then re-raises the signal it caught.
        assert proc.wait(10) in (0, -signal.SIGTERM)
        if proc.stderr:
            proc.stderr.close()
