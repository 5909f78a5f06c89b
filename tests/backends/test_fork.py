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


def runners_of(server: ForkServer, pid: int) -> set[int]:
    """The fork server's children but its spare (which is nobody's runner yet)."""
    return children_of(pid) - {server.spare}


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
        for child in runners_of(fork_server, pid):  # whatever a failed test left behind
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


async def with_a_spare(server: ForkServer, sock: socket.socket) -> tuple[ForkedProcess, int]:
    """A first boot, and the spare the fork server forks once quiet after it."""
    first = await spawn(server, sock)
    await until(lambda: server.spare is not None, what="a spare after the first boot")
    assert server.spare is not None
    return first, server.spare


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
    await until(lambda: runners_of(fork_server, server_pid) == {forked.pid},
                what="the unclaimed fork to be killed and reaped")
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
    await until(lambda: runners_of(fork_server, server_pid) == {forked.pid},
                what="the late fork to be killed and reaped")
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
    await until(lambda: not runners_of(fork_server, server_pid), what="the fork to be reaped")
    forked_again = await spawn(fork_server, listening)  # and it still forks
    os.killpg(forked_again.pid, signal.SIGKILL)
    assert await forked_again.wait() == -signal.SIGKILL


def test_the_template_imports_what_uvicorn_starts_with_before_it_forks() -> None:
    import subprocess
    import sys

    probe = ("import sys; from flame_asgi.backends import _fork_template as t; "
             "t._import_what_uvicorn_starts_with(); "
             "print(' '.join(m for m in ('uvloop', 'uvicorn.lifespan.on', 'uvicorn.protocols.http.auto', "
             "'uvicorn.loops.auto', 'uvicorn.loops.uvloop', 'concurrent.futures.thread') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    # uvloop is what uvicorn's "auto" loop picks (uvicorn[standard]); a fork that imported it
    # itself spent ~5 ms of its start-up on it.
    assert out == ["uvloop", "uvicorn.lifespan.on", "uvicorn.protocols.http.auto", "uvicorn.loops.auto",
                   "uvicorn.loops.uvloop", "concurrent.futures.thread"]


async def test_a_quiet_fork_server_forks_a_spare_that_the_next_boot_takes(server: tuple[ForkServer, int],
                                                                         listening: socket.socket) -> None:
    fork_server, server_pid = server
    assert fork_server.spare is None  # no request yet: nothing to prepare a spare like
    first, spare = await with_a_spare(fork_server, listening)
    assert children_of(server_pid) == {first.pid, spare}
    assert os.getpgid(spare) == spare  # its own process group before it is anyone's runner
    await asyncio.sleep(0.3)
    before = voluntary_switches(spare)
    await asyncio.sleep(1.0)
    assert voluntary_switches(spare) == before  # it sleeps in recv: no CPU while it waits
    second = await spawn(fork_server, listening)
    assert second.pid == spare and fork_server.spare != spare  # taken by that boot
    for forked in (first, second):
        os.killpg(forked.pid, signal.SIGTERM)
        assert await asyncio.wait_for(forked.wait(), 10.0) == -signal.SIGTERM


async def test_a_spare_that_died_is_not_reported_as_a_runner_and_the_next_boot_still_forks(
        server: tuple[ForkServer, int], listening: socket.socket) -> None:
    fork_server, server_pid = server
    first, spare = await with_a_spare(fork_server, listening)
    os.kill(spare, signal.SIGKILL)
    await until(lambda: fork_server.spare is None and spare not in children_of(server_pid),
                what="the dead spare reaped and forgotten")
    assert spare not in fork_server._exits  # nobody's runner: no exit of it reported
    second = await spawn(fork_server, listening)
    assert second.pid != spare
    for forked in (first, second):
        os.killpg(forked.pid, signal.SIGKILL)
        assert await asyncio.wait_for(forked.wait(), 10.0) == -signal.SIGKILL


@pytest.mark.parametrize("how", ["closed", "killed"])
async def test_a_fork_servers_spare_ends_with_it(listening: socket.socket, how: str) -> None:
    fork_server = ForkServer(BARE_APP, dict(os.environ))
    await fork_server.start()
    try:
        forked, spare = await with_a_spare(fork_server, listening)
        os.killpg(forked.pid, signal.SIGKILL)
        await forked.wait()
        if how == "killed":
            assert fork_server._proc is not None
            fork_server._proc.kill()  # no time to reap anything: the spare sees its socket close
    finally:
        await fork_server.aclose()
    await until(lambda: not procs.alive(spare), what=f"the spare of a fork server {how} to exit")


async def test_a_boot_unlike_the_one_a_spare_was_prepared_for_gets_its_own_settings(
        server: tuple[ForkServer, int], listening: socket.socket) -> None:
    # The spare set up uvicorn (its log level among the rest) like the boot before; a boot
    # that asks for other settings must get them, not the spare's.
    fork_server, _ = server
    first, spare = await with_a_spare(fork_server, listening)
    verbose = await fork_server.spawn(env={}, listen=listening, log_level="debug", ws_max_size=1 << 20, graceful=1)
    assert verbose.pid == spare
    await asyncio.sleep(0.5)  # uvicorn has started (and logged it)
    os.killpg(verbose.pid, signal.SIGTERM)
    await asyncio.wait_for(verbose.wait(), 10.0)
    log = (await verbose.stderr.read()).decode()
    assert "Started server process" in log  # uvicorn's info line: the warning level of the spare would drop it
    os.killpg(first.pid, signal.SIGKILL)
    await first.wait()
