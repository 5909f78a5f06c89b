"""The fork server (backends/_fork_parent.py, _fork_template.py) with real processes."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import AsyncIterator, Iterator

import pytest

from flame_asgi import FlamePool, ProcessBackend, RunnerLost
from flame_asgi.backends import _fork_parent as _fork
from flame_asgi.backends._apps import BARE_APP
from flame_asgi.backends._fork_parent import ForkedProcess, ForkServer, ForkUnavailable
from tests.apps import procs
from tests.conftest import child_pids, until


def children_of(pid: int) -> set[int]:
    return procs.child_pids(pid, zombies=True)  # unreaped children count: reaping is what is tested


@pytest.fixture
async def server() -> AsyncIterator[tuple[ForkServer, int]]:
    """A started fork server of the bare app, and its pid."""
    before = child_pids()
    fork_server = ForkServer(BARE_APP, dict(os.environ))
    await fork_server.start()
    (pid,) = child_pids() - before
    try:
        yield fork_server, pid
    finally:
        for child in children_of(pid):  # whatever a failed test left behind
            os.kill(child, signal.SIGKILL)
        await fork_server.aclose()


@pytest.fixture
def listening() -> Iterator[socket.socket]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock
    sock.close()


def spawn(server: ForkServer, sock: socket.socket) -> asyncio.Task[ForkedProcess]:
    return asyncio.ensure_future(server.spawn(env={}, listen=sock, log_level="warning", ws_max_size=1 << 20,
                                              graceful=1))


async def test_a_fork_whose_boot_was_cancelled_is_killed_and_the_server_keeps_forking(
        server: tuple[ForkServer, int], listening: socket.socket) -> None:
    fork_server, server_pid = server
    request = spawn(fork_server, listening)
    await asyncio.sleep(0)  # the request is sent; its reply cannot have been read yet
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    forked = await spawn(fork_server, listening)  # later boots are still forks
    assert fork_server.alive
    # The fork server forked the first one anyway (before this one) and said so: nobody will
    # run it, so it must not live on.
    await until(lambda: children_of(server_pid) == {forked.pid}, what="the unclaimed fork to be killed and reaped")
    os.killpg(forked.pid, signal.SIGTERM)
    assert await forked.wait() == -signal.SIGTERM


async def test_a_fork_server_that_does_not_answer_in_time_is_a_fallback_and_its_late_fork_is_killed(
        server: tuple[ForkServer, int], listening: socket.socket, monkeypatch: pytest.MonkeyPatch) -> None:
    fork_server, server_pid = server
    monkeypatch.setattr(_fork, "SPAWN_TIMEOUT", 0.2)
    os.kill(server_pid, signal.SIGSTOP)  # stuck: it cannot answer
    try:
        with pytest.raises(ForkUnavailable, match="did not answer"):  # the boot falls back to a fresh interpreter
            await spawn(fork_server, listening)
    finally:
        os.kill(server_pid, signal.SIGCONT)  # it forks the request it was sent, and answers late
    forked = await spawn(fork_server, listening)
    await until(lambda: children_of(server_pid) == {forked.pid}, what="the late fork to be killed and reaped")
    os.killpg(forked.pid, signal.SIGTERM)
    assert await forked.wait() == -signal.SIGTERM


async def test_a_runner_that_ends_after_its_fork_server_died_is_not_called_oom_killed() -> None:
    async with FlamePool("orphaned", backend=ProcessBackend()) as pool:
        server_pid = await pool.call(os.getppid)  # a forked runner's parent is the fork server
        assert server_pid != os.getpid()
        os.kill(server_pid, signal.SIGKILL)
        with pytest.raises(RunnerLost) as lost:
            await pool.call(os._exit, 3)
    message = str(lost.value)
    assert "exit status was lost with the fork server" in message
    assert "SIGKILL" not in message and "out of memory" not in message


async def test_many_boots_at_once_queue_for_the_fork_server_instead_of_falling_back(
        caplog: pytest.LogCaptureFixture) -> None:
    # With hundreds of boots at once the fork server's socket fills (EAGAIN): boots must wait
    # their turn, not boot fresh interpreters, whose start starves the fork server until the
    # rest time out too (before: 250 boots took 31 s, most as fresh interpreters; now ~4 s).
    with caplog.at_level("WARNING", logger="flame_asgi.backends.process"):
        async with FlamePool("many", backend=ProcessBackend(), min=250, max=250, max_concurrency=1,
                             idle_shutdown_after=None) as pool:
            parents = await asyncio.gather(*(pool.call(os.getppid) for _ in range(250)))
            assert len(pool.stats().runners) == 250
    assert len(set(parents)) == 1 and parents[0] != os.getpid()  # every runner forked by the one server
    assert not [r for r in caplog.records if "fresh interpreter" in r.getMessage()]


def voluntary_switches(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    raise AssertionError(f"no voluntary_ctxt_switches for {pid}")


async def test_an_idle_fork_server_sleeps_and_a_childs_exit_wakes_it(server: tuple[ForkServer, int],
                                                                     listening: socket.socket) -> None:
    fork_server, server_pid = server
    forked = await spawn(fork_server, listening)
    await asyncio.sleep(0.3)  # the fork's own start-up reports settle
    before = voluntary_switches(server_pid)
    await asyncio.sleep(1.0)
    # It sleeps in select() until a request or a SIGCHLD: no timer (it woke 20 times a second).
    assert voluntary_switches(server_pid) - before <= 1
    os.killpg(forked.pid, signal.SIGTERM)
    # The exit is reported without a tick to wait for, and the child is reaped.
    assert await asyncio.wait_for(forked.wait(), 10.0) == -signal.SIGTERM
    await until(lambda: not children_of(server_pid), what="the fork to be reaped")
    forked_again = await spawn(fork_server, listening)  # and it still forks
    os.killpg(forked_again.pid, signal.SIGKILL)
    assert await forked_again.wait() == -signal.SIGKILL


def test_the_template_imports_what_uvicorn_starts_with_before_it_forks() -> None:
    import subprocess
    import sys

    probe = ("import sys; from flame_asgi.backends import _fork_template as t; "
             "t._import_what_uvicorn_starts_with(); "
             "print(' '.join(m for m in ('uvloop', 'uvicorn.lifespan.on', 'uvicorn.protocols.http.auto', "
             "'uvicorn.loops.auto', 'concurrent.futures.thread') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    # uvloop is what uvicorn's "auto" loop picks (uvicorn[standard]); a fork that imported it
    # itself spent ~5 ms of its start-up on it.
    assert out == ["uvloop", "uvicorn.lifespan.on", "uvicorn.protocols.http.auto", "uvicorn.loops.auto",
                   "concurrent.futures.thread"]
