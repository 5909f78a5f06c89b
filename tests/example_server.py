"""Serve example_app with a real uvicorn (process backend) for the end-to-end and browser tests."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from tests.apps.procs import descendants
from tests.reliability.support import listening_addresses

REPO = Path(__file__).resolve().parent.parent

@dataclasses.dataclass
class ExampleServer:
    url: str
    pid: int
    data_dir: Path
    log: Path

    def sqlite(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        """Read the app's default SQLite database directly, as another client would."""
        with contextlib.closing(sqlite3.connect(self.data_dir / "thumbnails.db")) as db:
            return db.execute(query, params).fetchall()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve_example(data_dir: Path, **env: str) -> Iterator[ExampleServer]:
    """``python -m uvicorn example_app.main:app`` on a free port, stopped (and its runners) on exit."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    environ = {k: v for k, v in os.environ.items()
               if k not in ("FLAME_BACKEND", "FLAME_PARENT", "FLAME_SECRET", "FLAME_RUNNER_KEYS", "DATABASE_URL")}
    environ.update(DATA_DIR=str(data_dir), PYTHONUNBUFFERED="1", **env)
    log = data_dir / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "example_app.main:app", "--host", "127.0.0.1",
             "--port", str(port), "--no-access-log"],
            cwd=REPO, env=environ, stdout=out, stderr=subprocess.STDOUT)
    server = ExampleServer(f"http://127.0.0.1:{port}", proc.pid, data_dir, log)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the example app exited with {proc.returncode}:\n{log.read_text()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(server.url + "/api/jobs", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the example app did not answer within 30 s:\n{log.read_text()}")
            time.sleep(0.1)
        yield server
    except BaseException:
        print(f"--- {log} ---\n{log.read_text()}")  # shown with the failing test's output
        raise
    finally:
        proc.send_signal(signal.SIGTERM)  # graceful: the app's pools stop their runners
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    # Reached only when the test passed: errors the app logged (runner output included) fail it.
    if "Traceback" in log.read_text():
        raise AssertionError(f"the example app logged an error:\n{log.read_text()}")


def make_video(path: Path, seconds: int = 5, size: str = "320x240", *, cut: float | None = None) -> Path:
    """A test-pattern MP4; ``cut``: keep only that fraction of its bytes (its index is at the
    front, so ffprobe still reads it, but frames past the cut are gone)."""
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi",
                    "-i", f"testsrc=duration={seconds}:size={size}:rate=10", "-pix_fmt", "yuv420p",
                    "-movflags", "+faststart", "-y", str(path)], check=True)
    if cut is not None:
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * cut)])
    return path


def uploads(server: ExampleServer) -> list[Path]:
    """What is left in the app's upload folder."""
    folder = server.data_dir / "uploads"
    return sorted(folder.iterdir()) if folder.exists() else []


def runner_pid(server: ExampleServer) -> int:
    """The process of the pool's one runner: the server's Python descendant listening on its
    port (the ffmpeg it runs holds that socket too)."""
    (runner,) = httpx.get(server.url + "/api/stats", timeout=10).json()["runners"]
    port = int(runner["url"].rsplit(":", 1)[1])
    (pid,) = [p for p in descendants(server.pid)
              if ("127.0.0.1", port) in listening_addresses(p) and b"python" in Path(f"/proc/{p}/cmdline").read_bytes()]
    return pid
