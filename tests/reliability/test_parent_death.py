"""A parent that dies (kill -9) or hangs leaves no runner behind; a parent that shuts
down gracefully stops its runners, letting ``link=False`` work finish and cancelling
linked work."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from flame_asgi import FlamePool, ProcessBackend, RunnerLost
from tests.reliability import work
from tests.reliability.support import alive, kill, runner_pids, until


class Orphanage:
    """A parent process (``parent_script.py``) under a subreaper (``reaper.py``) that
    records when each process of the family is reaped: orphaned runners included."""

    def __init__(self, tmp: pathlib.Path, runners: int, heartbeat_timeout: float) -> None:
        self.info = tmp / "parent.json"
        self.log = tmp / "reaper.log"
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.reliability.reaper", sys.executable, "-m",
                 "tests.reliability.parent_script", str(self.info), str(runners), str(heartbeat_timeout)],
                stdout=out)

    async def started(self) -> tuple[int, list[int]]:
        await until(lambda: self.info.exists() or self.proc.poll() is not None, 60,
                    "the parent to boot its runners")
        assert self.info.exists(), "the parent process failed to start its pool"
        data = json.loads(self.info.read_text())
        return data["parent"], data["runners"]

    def reaped(self) -> dict[int, float]:
        """pid -> time.monotonic() when it was reaped."""
        out = {}
        for line in self.log.read_text().splitlines():
            if line.startswith("reaped "):
                _, pid, _, at = line.split()
                out[int(pid)] = float(at)
        return out

    async def close(self) -> None:
        """Tell the subreaper to kill whatever is left of the family (all started by this test)."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            await asyncio.to_thread(self.proc.wait, 10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def test_runners_exit_at_once_when_their_parent_is_killed(tmp_path: pathlib.Path) -> None:
    # The heartbeat timeout is long (10 s): the runners must react to the closed TCP
    # connection, which the kernel closes the moment the parent dies.
    family = Orphanage(tmp_path, runners=3, heartbeat_timeout=10.0)
    try:
        parent, runners = await family.started()
        assert len(runners) == 3 and all(alive(p) for p in runners)
        killed_at = time.monotonic()
        kill(parent, signal.SIGKILL)
        took = await until(lambda: not any(alive(p) for p in runners), 5, "the orphaned runners to exit")
        print(f"\nparent kill -9 -> all 3 runners exited in {took * 1000:.0f} ms")
        await asyncio.to_thread(family.proc.wait, 10)  # the subreaper ends when every runner is reaped
        reaped = family.reaped()
        assert set(runners) <= set(reaped)
        assert max(reaped[p] for p in runners) - killed_at < 5
    finally:
        await family.close()


async def test_runners_exit_after_the_heartbeat_timeout_when_their_parent_hangs(tmp_path: pathlib.Path) -> None:
    # A frozen parent keeps its TCP connections open: only the missing heartbeat tells.
    family = Orphanage(tmp_path, runners=2, heartbeat_timeout=1.5)
    try:
        parent, runners = await family.started()
        kill(parent, signal.SIGSTOP)
        took = await until(lambda: not any(alive(p) for p in runners), 10, "the runners of a hung parent to exit")
        print(f"\nparent SIGSTOP -> runners exited in {took:.2f} s (heartbeat_timeout=1.5 s)")
        assert took >= 1.0  # they waited for the heartbeat, they did not guess
    finally:
        kill(parent, signal.SIGKILL)
        await family.close()


async def test_pool_aclose_finishes_unlinked_work_and_cancels_linked_work(tmp_path: pathlib.Path) -> None:
    linked, unlinked = tmp_path / "linked", tmp_path / "unlinked"
    pool = FlamePool("graceful", backend=ProcessBackend(heartbeat_interval=0.2), shutdown_timeout=10)
    await pool.start()
    try:
        # Linked work would need 3 s, unlinked work 1 s: closing waits for the latter only.
        calls = [asyncio.create_task(pool.call(work.touch_after, seconds, str(path), str(path) + ".started",
                                               link=path is linked, timeout=10))
                 for path, seconds in ((linked, 3.0), (unlinked, 1.0))]
        await until(lambda: all(pathlib.Path(f"{p}.started").exists() for p in (linked, unlinked)), 20,
                    "both calls to start")
        pids = list(runner_pids(pool).values())
        started = time.monotonic()
    finally:
        await pool.aclose()
    took = time.monotonic() - started
    assert unlinked.exists()  # aclose waited for the unlinked call...
    assert await calls[1] == "touched"  # ...and its caller got the result
    with pytest.raises(RunnerLost, match="stopped"):
        await calls[0]  # the linked call was cancelled by the shutdown
    assert not any(alive(p) for p in pids)
    assert took < 2.5
    await asyncio.sleep(3.2 - took)
    assert not linked.exists()  # the linked work really stopped on the runner


async def test_sigterm_to_a_uvicorn_served_app_drains_unlinked_work_then_stops_runners(
        tmp_path: pathlib.Path) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    env = {**os.environ, "GRACEFUL_WORK_SECONDS": "1.5", "GRACEFUL_SHUTDOWN_TIMEOUT": "10"}
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "tests.reliability.graceful_app:app", "--fd", str(sock.fileno()),
         "--lifespan", "on", "--log-level", "warning", "--timeout-graceful-shutdown", "20"],
        pass_fds=(sock.fileno(),), env=env)
    sock.close()
    linked, unlinked, started = tmp_path / "linked", tmp_path / "unlinked", tmp_path / "started"
    try:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            response = await client.post("/start", params={"linked": str(linked), "unlinked": str(unlinked),
                                                           "started": str(started)})
            assert response.status_code == 200
            await until(lambda: all(pathlib.Path(f"{started}.{k}").exists() for k in ("linked", "unlinked")),
                        20, "both casts to start on the runner")
            pids = (await client.get("/runners")).json()
        assert len(pids) == 1 and alive(pids[0])
        signalled = time.monotonic()
        server.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(server.wait, 20)
        took = time.monotonic() - signalled
        print(f"\nSIGTERM -> parent exited in {took:.2f} s (unlinked work had ~1.5 s left)")
        assert code in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after a graceful shutdown
        assert unlinked.exists()  # the shutdown waited for the unlinked work
        assert not alive(pids[0])  # and stopped the runner (ProcessBackend reaps it)
        await asyncio.sleep(max(0.0, 2.0 - took))
        assert not linked.exists()  # the linked cast was cancelled, on the runner too
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
