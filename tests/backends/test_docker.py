"""DockerBackend against a real Docker Engine (started by .ci/docker.sh when needed).

Runners boot from ``local/empty:1``, an empty image, with the host's system, Python and
this repository bind-mounted read-only: no registry is needed. Functions sent to runners
live in this module, which the runner imports from the mounted repository.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from flame_asgi import BootError, FlamePool, RunnerLost, parent

aiodocker = pytest.importorskip("aiodocker", reason="DockerBackend needs aiodocker: pip install 'flame_asgi[docker]'")

from flame_asgi.backends.docker import LABEL_BACKEND, LABEL_PARENT, DockerBackend, parent_id  # noqa: E402

pytestmark = pytest.mark.docker
REPO = Path(__file__).resolve().parents[2]
IMAGE = "local/empty:1"
ENGINE_DOWN = 3  # .ci/docker.sh's exit code when dockerd cannot be installed or started


# -- functions run on runners -------------------------------------------------------------
def where() -> tuple[bool, str]:
    info = parent()
    assert info is not None
    return os.path.exists("/.dockerenv"), info.runner_id


def count(n: int) -> Iterator[int]:
    yield from range(n)


async def nap(seconds: float) -> str:
    await asyncio.sleep(seconds)
    info = parent()
    assert info is not None
    return info.runner_id


def hog(mib: int) -> int:
    return len(b"\x01" * (mib << 20))  # touches every page, unlike bytearray(n)


# -- fixtures -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine() -> None:
    """A running Docker Engine with the test image; skip only if the engine cannot start."""
    try:
        done = subprocess.run(["bash", str(REPO / ".ci" / "docker.sh")], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"Docker Engine cannot start here: {exc}")
    if done.returncode == ENGINE_DOWN:
        pytest.skip(f"Docker Engine cannot start here: {done.stderr.strip()[-600:]}")
    assert done.returncode == 0, f".ci/docker.sh failed:\n{done.stderr}"


def _binds() -> list[str]:
    dirs = ["/usr", "/lib", "/lib64", "/bin", "/etc", sys.base_prefix, sys.prefix, str(REPO)]
    unique = [d for i, d in enumerate(dirs) if os.path.isdir(d) and d not in dirs[:i]]
    return [f"{d}:{d}:ro" for d in unique if not any(d.startswith(o + "/") for o in unique)]


@pytest.fixture
async def docker(engine: None) -> AsyncIterator[aiodocker.Docker]:
    """An Engine client for the test's own checks; afterwards no runner of ours may remain."""
    client = aiodocker.Docker(url=os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock")
    try:
        yield client
        assert await _ours(client) == [], "runner containers were left behind"
    finally:
        await client.close()


@pytest.fixture
def backend(engine: None) -> Callable[..., DockerBackend]:
    def make(**options: object) -> DockerBackend:
        # The test module is imported by pytest through an entry it put on sys.path.
        paths = [str(REPO), *(p for p in sys.path if p.startswith(str(REPO)))]
        return DockerBackend(IMAGE, python=sys.executable, binds=_binds(), working_dir=str(REPO),
                             env={"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}, **options)  # type: ignore[arg-type]
    return make


async def _ours(docker: aiodocker.Docker, backend: DockerBackend | None = None) -> list[dict[str, object]]:
    label = f"{LABEL_BACKEND}={backend.id}" if backend else f"{LABEL_PARENT}={parent_id()}"
    return [c._container for c in await docker.containers.list(all=True, filters={"label": [label]})]


async def _eventually(check: Callable[[], object], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not await check():  # type: ignore[misc]
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


# -- tests --------------------------------------------------------------------------------
async def test_call_and_stream_run_in_a_limited_container(docker: aiodocker.Docker, backend: Callable[..., DockerBackend]) -> None:
    b = backend(cpus=0.5, memory="256m", labels={"team": "media"})
    async with FlamePool("dk-call", backend=b, boot_timeout=20) as pool:
        started = time.perf_counter()
        in_container, rid = await pool.call(where)
        print(f"cold call through DockerBackend: {time.perf_counter() - started:.2f} s")
        assert in_container
        assert [item async for item in pool.stream(count, 5)] == [0, 1, 2, 3, 4]
        [runner] = pool.stats().runners
        assert runner.id == rid and runner.url is not None and runner.url.startswith("http://127.0.0.1:")
        [container] = await _ours(docker, b)
        info = await docker.containers.container(str(container["Id"])).show()
        assert info["HostConfig"]["AutoRemove"] and info["HostConfig"]["Memory"] == 256 << 20
        assert info["HostConfig"]["NanoCpus"] == 500_000_000
        assert info["Config"]["Labels"]["team"] == "media"
        assert info["Config"]["Labels"]["flame_asgi.pool"] == "dk-call"
        assert {"FLAME_PARENT", "FLAME_SECRET", "PYTHONPATH"} <= {e.partition("=")[0] for e in info["Config"]["Env"]}
        assert "HOME" not in {e.partition("=")[0] for e in info["Config"]["Env"]}  # not the parent's env
        for binding in info["HostConfig"]["PortBindings"].values():
            assert binding[0]["HostIp"] == "127.0.0.1"


async def test_grows_to_max_and_idle_runners_are_removed(docker: aiodocker.Docker, backend: Callable[..., DockerBackend]) -> None:
    b = backend()
    async with FlamePool("dk-grow", backend=b, max=2, max_concurrency=1, idle_shutdown_after=0.5,
                         boot_timeout=20) as pool:
        ids = await asyncio.gather(*(pool.call(nap, 0.5) for _ in range(3)))
        assert len(set(ids)) == 2
        assert len(await _ours(docker, b)) <= 2
        await _eventually(lambda: _gone(docker, b))
        assert pool.stats().runners == []


async def _gone(docker: aiodocker.Docker, b: DockerBackend) -> bool:
    return await _ours(docker, b) == []


async def test_killed_container_fails_the_call_with_runner_lost(docker: aiodocker.Docker, backend: Callable[..., DockerBackend]) -> None:
    b = backend()
    async with FlamePool("dk-kill", backend=b, boot_timeout=20) as pool:
        await pool.call(where)
        call = asyncio.create_task(pool.call(nap, 30))
        await asyncio.sleep(0.2)
        [container] = await _ours(docker, b)
        killed = time.perf_counter()
        await docker.containers.container(str(container["Id"])).kill()
        with pytest.raises(RunnerLost, match="SIGKILL"):
            await call
        assert time.perf_counter() - killed < 3.0
        assert (await pool.call(where))[0]


async def test_out_of_memory_is_reported(docker: aiodocker.Docker, backend: Callable[..., DockerBackend]) -> None:
    b = backend(memory="160m")
    async with FlamePool("dk-oom", backend=b, boot_timeout=20) as pool:
        with pytest.raises(RunnerLost, match="out of memory"):
            await pool.call(hog, 400)
        assert await pool.call(hog, 8) == 8 << 20


async def test_a_runner_that_exits_during_boot_is_a_boot_error(docker: aiodocker.Docker, backend: Callable[..., DockerBackend]) -> None:
    b = backend(command=[sys.executable, "-c", "import sys; print('no app here', file=sys.stderr); sys.exit(3)"])
    async with FlamePool("dk-exit", backend=b, boot_timeout=20) as pool:
        with pytest.raises(BootError, match=r"(?s)exited with code 3.*no app here"):
            await pool.call(where, timeout=10)


async def test_engine_errors_are_boot_errors(docker: aiodocker.Docker, backend: Callable[..., DockerBackend]) -> None:
    async with FlamePool("dk-noimage", backend=backend().__class__("local/missing:0"), boot_timeout=5) as pool:
        with pytest.raises(BootError, match="local/missing:0"):
            await pool.call(where, timeout=3)
    unreachable = DockerBackend(IMAGE, docker_url="unix:///nonexistent/docker.sock")
    async with FlamePool("dk-noengine", backend=unreachable, boot_timeout=5) as pool:
        with pytest.raises(BootError, match="is dockerd running"):
            await pool.call(where, timeout=3)
