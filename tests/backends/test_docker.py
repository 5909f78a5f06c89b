"""DockerBackend against a real Docker Engine (installed and started by .ci/docker.sh).

Runners boot from ``local/empty:1``, an empty image, with the host's system, Python and
this repository bind-mounted read-only: no registry is needed. Functions sent to runners
live in this module, which runners import from the mounted repository.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from flame_asgi import BootError, FlamePool, RunnerLost, parent, subscribe

aiodocker = pytest.importorskip("aiodocker", reason="DockerBackend needs aiodocker: pip install 'flame_asgi[docker]'")

from flame_asgi.backends.docker import (  # noqa: E402
    LABEL_BACKEND,
    LABEL_PARENT,
    LABEL_RUNNER,
    DockerBackend,
    container_id_in,
    parent_id,
)

pytestmark = pytest.mark.docker

REPO = Path(__file__).resolve().parents[2]
DOCKER_SH = REPO / ".ci" / "docker.sh"
STATE_DIR = Path(os.environ.get("FLAME_DOCKER_STATE", "/tmp/flame-dockerd"))  # where docker.sh keeps dockerd
STARTED_BY_TESTS = "started-by-tests"  # in STATE_DIR: the pid of a dockerd that a test session started
IMAGE = "local/empty:1"
ENGINE_DOWN = 3  # .ci/docker.sh's exit code when dockerd cannot be installed or started
Docker = Any  # aiodocker.Docker (imported above only when installed)
Factory = Callable[..., DockerBackend]


# -- functions run on runners -------------------------------------------------------------
def where() -> tuple[bool, str]:
    info = parent()
    assert info is not None
    return os.path.exists("/.dockerenv"), info.runner_id


def count(n: int) -> Iterator[int]:
    yield from range(n)


async def nap(seconds: float) -> str:
    await asyncio.sleep(seconds)
    return where()[1]


def echo(data: bytes) -> tuple[bytes, bool]:
    return data, os.path.exists("/.dockerenv")


def hog(mib: int) -> int:
    return len(b"\x01" * (mib << 20))  # touches every page, unlike bytearray(n)


# -- fixtures -----------------------------------------------------------------------------
def engine_answers() -> bool:
    """Whether a Docker Engine answers on ``DOCKER_HOST`` (a unix socket)."""
    host = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    if not host.startswith("unix://"):
        return True  # a remote engine: never ours to start or stop
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5.0)
        try:
            sock.connect(host.removeprefix("unix://"))
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            return sock.recv(64).split(b" ")[1:2] == [b"200"]
        except OSError:
            return False


def running(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie does not (dockerd is detached: pid 1 may never reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


@pytest.fixture(scope="session")
def engine() -> Iterator[None]:
    """A running Docker Engine with the test image; skip only if the engine cannot start.

    A dockerd that .ci/docker.sh starts for the tests is stopped when the test session ends
    (the last one, when several use it at once); one that was already running is left alone.
    """
    # Every session using the engine holds this lock shared; only one that can take it
    # alone may stop the engine, and a session arriving meanwhile waits for that to end.
    with open(f"{STATE_DIR}.users", "a") as users:
        fcntl.flock(users, fcntl.LOCK_SH)
        answered = engine_answers()
        try:
            done = subprocess.run(["bash", str(DOCKER_SH)], capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as exc:
            pytest.skip(f"Docker Engine cannot start here: {exc}")
        if done.returncode == ENGINE_DOWN:
            pytest.skip(f"Docker Engine cannot start here: {done.stderr.strip()[-600:]}")
        assert done.returncode == 0, f".ci/docker.sh failed:\n{done.stderr}"
        pidfile = STATE_DIR / "dockerd.pid"
        if not answered and pidfile.exists():
            # A mark beside it, not a fixture variable: whichever session leaves last stops it.
            (STATE_DIR / STARTED_BY_TESTS).write_text(pidfile.read_text())
        yield
        try:
            fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # another session still uses it
        stop_engine_started_by_tests()


def stop_engine_started_by_tests() -> None:
    try:
        pid = int((STATE_DIR / STARTED_BY_TESTS).read_text())
        current = int((STATE_DIR / "dockerd.pid").read_text())
    except (OSError, ValueError):
        return  # none was started by a test session
    (STATE_DIR / STARTED_BY_TESTS).unlink()
    if pid != current or not running(pid):
        return  # it ended, and whatever runs now was started by someone else
    os.kill(pid, signal.SIGTERM)  # dockerd stops its containers and containerd, then exits
    deadline = time.monotonic() + 30
    while running(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if running(pid):
        os.kill(pid, signal.SIGKILL)


def binds() -> list[str]:
    dirs = ["/usr", "/lib", "/lib64", "/bin", "/etc", sys.base_prefix, sys.prefix, str(REPO)]
    unique = [d for i, d in enumerate(dirs) if os.path.isdir(d) and d not in dirs[:i]]
    return [f"{d}:{d}:ro" for d in unique if not any(d.startswith(o + "/") for o in unique)]


def pythonpath() -> str:
    # pytest imported this module through an entry it put on sys.path: runners need it too.
    return os.pathsep.join(dict.fromkeys([str(REPO), *(p for p in sys.path if p.startswith(str(REPO)))]))


@pytest.fixture
async def docker(engine: None) -> AsyncIterator[Docker]:
    """An Engine client for the tests' own checks; afterwards no runner of ours may remain."""
    client = aiodocker.Docker(url=os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock")
    try:
        yield client
        assert await labelled(client, f"{LABEL_PARENT}={parent_id()}") == [], "runner containers left behind"
    finally:
        await client.close()


@pytest.fixture
def backend(engine: None) -> Factory:
    def make(**options: Any) -> DockerBackend:
        return DockerBackend(IMAGE, python=sys.executable, binds=binds(), working_dir=str(REPO),
                             env={"PYTHONPATH": pythonpath()}, **options)
    return make


async def labelled(docker: Docker, label: str) -> list[str]:
    return [c.id for c in await docker.containers.list(all=True, filters={"label": [label]})]


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


# -- tests --------------------------------------------------------------------------------
async def test_call_and_stream_run_in_a_limited_container(docker: Docker, backend: Factory) -> None:
    b = backend(cpus=0.5, memory="256m", labels={"team": "media"})
    async with FlamePool("dk-call", backend=b, boot_timeout=20) as pool:
        in_container, rid = await pool.call(where)
        assert in_container
        assert [item async for item in pool.stream(count, 5)] == [0, 1, 2, 3, 4]
        [runner] = pool.stats().runners
        assert runner.id == rid and runner.url is not None and runner.url.startswith("http://127.0.0.1:")
        [cid] = await labelled(docker, f"{LABEL_BACKEND}={b.id}")
        info = await docker.containers.container(cid).show()
        assert info["HostConfig"]["AutoRemove"] and info["HostConfig"]["Memory"] == 256 << 20
        assert info["HostConfig"]["NanoCpus"] == 500_000_000
        assert all(p[0]["HostIp"] == "127.0.0.1" for p in info["HostConfig"]["PortBindings"].values())
        labels = info["Config"]["Labels"]
        assert labels["team"] == "media" and labels["flame_asgi.pool"] == "dk-call"
        assert labels["flame_asgi.runner"] == rid
        env = {e.partition("=")[0] for e in info["Config"]["Env"]}
        assert {"FLAME_PARENT", "FLAME_RUNNER_KEYS", "PYTHONPATH"} <= env and "HOME" not in env  # not the parent's env
        assert "FLAME_SECRET" not in env  # the runner's own keys, never the parent's root secret


async def test_large_payloads_take_the_data_plane_through_the_published_port(docker: Docker,
                                                                            backend: Factory) -> None:
    # The container's memory is not the parent's: large payloads cross on a TCP connection
    # of their own to the runner's published port, beside the WebSocket (_wire.dataplane).
    async with FlamePool("dk-data", backend=backend(), boot_timeout=20, timeout=60) as pool:
        await pool.call(where)
        (runner,) = pool._runners
        data_client = runner.conn._data
        assert data_client is not None
        await eventually(lambda: asyncio.sleep(0, data_client.ready))
        data = os.urandom(3 << 20)
        before = data_client._counter
        back, in_container = await pool.call(echo, data)
        assert back == data and in_container
        assert data_client._counter == before + 2  # one push, one pull


async def test_runners_share_the_parents_limits_and_get_their_whole_grace_period(
        docker: Docker, backend: Factory, monkeypatch: pytest.MonkeyPatch) -> None:
    # The runner must enforce the parent's frame size limit, and a stop_timeout of 1.5 s
    # must give uvicorn 2 s to drain, not 1.
    monkeypatch.setenv("FLAME_MAX_PAYLOAD", str(8 << 20))
    b = backend(stop_timeout=1.5)
    async with FlamePool("dk-env", backend=b, boot_timeout=20) as pool:
        await pool.call(where)
        [cid] = await labelled(docker, f"{LABEL_BACKEND}={b.id}")
        config = (await docker.containers.container(cid).show())["Config"]
        assert f"FLAME_MAX_PAYLOAD={8 << 20}" in config["Env"]
        cmd = config["Cmd"]
        assert cmd[cmd.index("--graceful") + 1] == "2"


async def test_grows_to_max_and_idle_runners_are_removed(docker: Docker, backend: Factory) -> None:
    b = backend()
    async with FlamePool("dk-grow", backend=b, max=2, max_concurrency=1, idle_shutdown_after=0.5,
                         boot_timeout=20) as pool:
        ids = await asyncio.gather(*(pool.call(nap, 0.5) for _ in range(3)))
        assert len(set(ids)) == 2
        assert len(await labelled(docker, f"{LABEL_BACKEND}={b.id}")) <= 2

        async def all_removed() -> bool:
            return await labelled(docker, f"{LABEL_BACKEND}={b.id}") == []
        await eventually(all_removed)
        assert pool.stats().runners == []


async def test_killed_container_fails_the_call_at_once(docker: Docker, backend: Factory) -> None:
    b = backend()
    async with FlamePool("dk-kill", backend=b, boot_timeout=20) as pool:
        await pool.call(where)
        call = asyncio.create_task(pool.call(nap, 30))
        await asyncio.sleep(0.2)
        [cid] = await labelled(docker, f"{LABEL_BACKEND}={b.id}")
        killed = time.perf_counter()
        await docker.containers.container(cid).kill()
        with pytest.raises(RunnerLost, match="SIGKILL"):
            await call
        assert time.perf_counter() - killed < 3.0
        assert (await pool.call(where))[0]


async def test_out_of_memory_is_reported(docker: Docker, backend: Factory) -> None:
    async with FlamePool("dk-oom", backend=backend(memory="160m"), boot_timeout=20) as pool:
        with pytest.raises(RunnerLost, match="out of memory"):
            await pool.call(hog, 400)
        assert await pool.call(hog, 8) == 8 << 20


async def test_a_runner_that_exits_during_boot_is_a_boot_error(docker: Docker, backend: Factory) -> None:
    b = backend(command=[sys.executable, "-c", "import sys; print('no app here', file=sys.stderr); sys.exit(3)"])
    async with FlamePool("dk-exit", backend=b, boot_timeout=20) as pool:
        with pytest.raises(BootError, match=r"(?s)exited with code 3.*no app here"):
            await pool.call(where, timeout=3)


@pytest.mark.parametrize(("options", "error"), [
    ({"image": "local/missing:0"}, "local/missing:0"),
    ({"image": None}, "pass image="),  # the tests do not run in a container: no own image
    ({"image": IMAGE, "docker_url": "unix:///nonexistent/docker.sock"}, "is dockerd running"),
])
async def test_engine_errors_are_boot_errors(docker: Docker, options: dict[str, str], error: str) -> None:
    async with FlamePool("dk-errors", backend=DockerBackend(**options), boot_timeout=5) as pool:  # type: ignore[arg-type]
        with pytest.raises(BootError, match=error):
            await pool.call(where, timeout=1)


async def containers(docker: Docker, label: str) -> dict[str, str]:
    """``runner id -> state`` of the containers with ``label`` (``created``, ``running``...)."""
    found = await docker.containers.list(all=True, filters={"label": [label]})
    return {c._container["Labels"][LABEL_RUNNER]: c._container["State"] for c in found}


async def test_standby_containers_are_created_ahead_and_a_boot_only_starts_one(docker: Docker,
                                                                               backend: Factory) -> None:
    events: list[tuple[str, dict[str, Any]]] = []
    unsubscribe = subscribe(lambda name, fields: events.append((name, fields)))
    b = backend(standby=2)
    label = f"{LABEL_BACKEND}={b.id}"
    try:
        async with FlamePool("dk-standby", backend=b, max=3, max_concurrency=1, boot_timeout=20) as pool:
            # Opening the pool prepares two containers: created, never started, no runner yet.
            async def prepared(n: int) -> bool:
                return pool.stats().standby == n and list((await containers(docker, label)).values()).count(
                    "created") == n
            await eventually(prepared_two := lambda: prepared(2), within=20)
            assert pool.stats().runners == []
            standby = set(await containers(docker, label))
            # A call boots one of them (its container is started, not created) ...
            rid = (await pool.call(where))[1]
            assert rid in standby
            [boot] = [f for name, f in events if name == "runner.boot.start"]
            assert boot["runner"] == rid and boot["prepared"] is True
            # ... and another is prepared behind it: one running, two created.
            await eventually(prepared_two, within=20)
            states = await containers(docker, label)
            assert states[rid] == "running" and sorted(states.values()) == ["created", "created", "running"]
            # Three long calls at once: two wait for boots, which start the two prepared containers.
            ids = await asyncio.gather(*(pool.call(nap, 4.0) for _ in range(3)))
            assert len(set(ids)) == 3
        # Closing the pool removes the prepared containers with the runners.
        assert await labelled(docker, label) == []
    finally:
        unsubscribe()


def test_standby_is_checked_and_read_from_the_environment() -> None:
    with pytest.raises(ValueError, match="standby must be >= 0"):
        DockerBackend(IMAGE, standby=-1)
    assert DockerBackend.from_env({"FLAME_DOCKER_STANDBY": "3"}).standby == 3


STANDBY_PARENT = """
import asyncio, sys
from flame_asgi import FlamePool
from flame_asgi.backends.docker import DockerBackend, parent_id

async def main():
    backend = DockerBackend({image!r}, python=sys.executable, binds={binds!r}, working_dir={repo!r},
                            env={{"PYTHONPATH": {path!r}}}, standby=2)
    pool = FlamePool("dk-standby-orphan", backend=backend, boot_timeout=20)
    await pool.start()
    while pool.stats().standby < 2:
        await asyncio.sleep(0.05)
    print(parent_id(), flush=True)
    await asyncio.sleep(60)  # killed here: nothing removes its standby containers

asyncio.run(main())
"""


async def test_standby_containers_of_a_killed_parent_are_removed_by_the_next_backend(
        docker: Docker, backend: Factory) -> None:
    script = STANDBY_PARENT.format(image=IMAGE, binds=binds(), repo=str(REPO), path=pythonpath())
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE,
                                                env={**os.environ, "PYTHONPATH": pythonpath()})
    try:
        assert proc.stdout is not None
        label = f"{LABEL_PARENT}=" + (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().strip()
        proc.kill()
        await proc.wait()
        await asyncio.sleep(1.0)
        assert list((await containers(docker, label)).values()) == ["created", "created"]  # nothing exits by itself
        # The next backend on this Engine sees their parent is gone and removes them.
        async with FlamePool("dk-sweeper", backend=backend(), boot_timeout=20) as pool:
            await pool.call(where)

            async def swept() -> bool:
                return await labelled(docker, label) == []
            await eventually(swept, within=15)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        for cid in await labelled(docker, label):  # a failed check must not leave them to the next test
            await docker.containers.container(cid).delete(force=True)


PARENT = """
import asyncio, sys
from flame_asgi import FlamePool
from flame_asgi.backends.docker import DockerBackend, parent_id
from {module} import where

async def main():
    backend = DockerBackend({image!r}, python=sys.executable, binds={binds!r}, working_dir={repo!r},
                            env={{"PYTHONPATH": {path!r}}})
    pool = FlamePool("dk-orphan", backend=backend, boot_timeout=20)
    await pool.start()
    await pool.call(where)
    print(parent_id(), flush=True)
    await asyncio.sleep(60 if sys.argv[1] == "kill" else 0)  # the pool is never closed

asyncio.run(main())
"""


@pytest.mark.parametrize("death", ["exit", "kill"])
async def test_runners_go_when_their_parent_goes(docker: Docker, engine: None, death: str) -> None:
    script = PARENT.format(module=where.__module__, image=IMAGE, binds=binds(), repo=str(REPO), path=pythonpath())
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", script, death, stdout=asyncio.subprocess.PIPE,
                                                env={**os.environ, "PYTHONPATH": pythonpath()})
    try:
        assert proc.stdout is not None
        label = f"{LABEL_PARENT}=" + (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().strip()

        async def all_removed() -> bool:
            return await labelled(docker, label) == []
        if death == "kill":  # no exit hook runs: the runner's watchdog exits, AutoRemove removes
            assert not await all_removed()
            proc.kill()
        await asyncio.wait_for(proc.wait(), 30)
        if death == "exit":  # the parent's exit hook removed them before the process ended
            assert await all_removed()
        await eventually(all_removed, within=15)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_own_container_id_is_found_in_the_mount_table() -> None:
    cid = "4f" * 32
    line = f"1425 1400 0:80 /var/lib/docker/containers/{cid}/hostname /etc/hostname rw - ext4 /dev/sda1 rw\n"
    assert container_id_in(line) == cid
    assert container_id_in(f"12:memory:/docker/{cid}\n") == cid
    assert container_id_in("0::/\n") is None


def test_without_aiodocker_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "aiodocker", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r"pip install 'flame_asgi\[docker\]'"):
        DockerBackend(IMAGE)


def test_settings_from_the_environment() -> None:
    b = DockerBackend.from_env({"FLAME_DOCKER_IMAGE": "app:7", "FLAME_DOCKER_MEMORY": "1.5g",
                                "FLAME_DOCKER_CPUS": "2", "FLAME_DOCKER_BINDS": "/data:/data:ro, /tmp:/scratch",
                                "FLAME_DOCKER_HOST_IP": "none", "FLAME_DOCKER_APP": "svc.main:app"})
    assert (b.image, b.memory, b.cpus, b.host_ip, b.app_import()) == ("app:7", 3 << 29, 2.0, None, "svc.main:app")
    assert b.binds == ["/data:/data:ro", "/tmp:/scratch"]
    assert DockerBackend.from_env({}).host_ip == "127.0.0.1"
