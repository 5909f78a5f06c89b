"""FlyBackend against a fake Fly Machines API whose machines are local processes."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from flame_asgi import BootError, FlamePool, FlyBackend, RunnerLost
from flame_asgi._base.parent import ParentInfo
from flame_asgi.backends._base import RunnerSpec
from flame_asgi.backends.fly import describe_machine

try:
    from .fly_fake import FakeFly
except ImportError:  # tests/ is not a package: pytest put this folder on sys.path
    from fly_fake import FakeFly  # type: ignore[no-redef]

pytestmark = pytest.mark.fly

IMAGE = "registry.fly.io/flame-test:deployment-01J0000000000000000000000"


@pytest.fixture(autouse=True)
def named_build(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Name the build as a deploy would: runners only match if the backend forwards the name."""
    monkeypatch.setenv("FLAME_CODE_VERSION", "fly-test-build")
    yield


@pytest.fixture
def fake() -> Iterator[FakeFly]:
    with FakeFly() as fake:
        yield fake


def fly(fake: FakeFly, **options: Any) -> FlyBackend:
    options = {"token": fake.token, "fly_app": fake.app, "image": IMAGE, "api_url": fake.url,
               "runner_host": fake.reachable_host, "port": _free_port(), **options}
    return FlyBackend(**options)


def _free_port() -> int:
    # Free on every address: each machine listens on its own 127.0.0.N with this port.
    with socket.socket() as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def assert_no_machine_left(fake: FakeFly) -> None:
    for machine in fake.machines():
        assert machine["state"] == "destroyed", machine["id"]
        if machine["pid"] is not None:
            assert machine["returncode"] is not None
            with pytest.raises(ProcessLookupError):
                os.kill(machine["pid"], 0)  # exited and reaped: not even a zombie


def _environ() -> dict[str, str]:
    return dict(os.environ)


def _machine_id() -> str:
    return os.environ["FLY_MACHINE_ID"]


def _count(n: int) -> Iterator[int]:
    yield from range(n)


def _slow_machine_id(seconds: float) -> str:
    time.sleep(seconds)
    return os.environ["FLY_MACHINE_ID"]


def _die() -> None:
    os._exit(3)


async def test_missing_settings_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("FLY_API_TOKEN", "FLY_APP_NAME", "FLY_IMAGE_REF"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(BootError, match=r"FLY_API_TOKEN \(or token=\.\.\.\)") as info:
        async with FlamePool("fly", backend=FlyBackend(fly_app="flame-test", image=IMAGE)):
            pass
    assert info.value.reason == "missing FLY_API_TOKEN"
    with pytest.raises(BootError, match=r"FLY_APP_NAME.*FLY_IMAGE_REF"):
        async with FlamePool("fly", backend=FlyBackend(token="t")):
            pass
    monkeypatch.setenv("FLY_APP_NAME", "from-env")
    assert FlyBackend().fly_app == "from-env"
    with pytest.raises(ValueError, match="memory_mb"):
        FlyBackend(memory_mb=1000)
    with pytest.raises(ValueError, match="unknown field"):
        FlyBackend(runner_host="{machine_id}.vm.internal")


async def test_a_wrong_token_is_a_clear_boot_error(fake: FakeFly) -> None:
    with pytest.raises(BootError, match="refused the token"):
        async with FlamePool("fly", backend=fly(fake, token="wrong"), min=1):
            pass
    with pytest.raises(BootError, match="Fly app 'nope' not found"):
        async with FlamePool("fly", backend=fly(fake, fly_app="nope"), min=1):
            pass


async def test_call_and_stream_run_on_a_machine(fake: FakeFly) -> None:
    async with FlamePool("fly", backend=fly(fake, region="ams", cpus=2, memory_mb=4096), boot_timeout=10) as pool:
        machine_id = await pool.call(_machine_id)
        assert [x async for x in pool.stream(_count, 4)] == [0, 1, 2, 3]
        [runner] = pool.stats().runners
        assert runner.url is not None and runner.url.startswith("http://127.0.")
    [machine] = fake.machines()
    assert machine["id"] == machine_id
    body = fake.bodies[0]
    assert body["region"] == "ams"
    config = body["config"]
    assert config["image"] == IMAGE
    assert config["auto_destroy"] is True
    assert config["restart"] == {"policy": "no"}
    assert config["guest"] == {"cpu_kind": "performance", "cpus": 2, "memory_mb": 4096}
    assert config["init"]["cmd"][:4] == ["python", "-m", "flame_asgi.backends._serve", "flame_asgi._bare:app"]
    assert config["init"]["cmd"][4:6] == ["--host", "::"]
    assert_no_machine_left(fake)


async def test_runner_gets_flame_env_not_the_parents(fake: FakeFly, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARENT_ONLY_SECRET", "do-not-leak")
    async with FlamePool("fly", backend=fly(fake, env={"EXTRA": "1"})) as pool:
        env = await pool.call(_environ)
    # The machine's config carries the runner's own keys, never the parent's secret; the runner
    # removed them from its environment as it read them.
    config_env = fake.bodies[0]["config"]["env"]
    assert config_env["FLAME_RUNNER_KEYS"] and "FLAME_SECRET" not in config_env
    assert env["FLAME_PARENT"] and "FLAME_RUNNER_KEYS" not in env and "FLAME_SECRET" not in env
    assert env["EXTRA"] == "1"
    assert env["FLY_MACHINE_ID"] == fake.machines()[0]["id"]
    assert "PARENT_ONLY_SECRET" not in env
    assert_no_machine_left(fake)


async def test_grows_to_max_two_then_idles_down(fake: FakeFly) -> None:
    async with FlamePool("fly", backend=fly(fake), max=2, max_concurrency=1, idle_shutdown_after=0.5) as pool:
        ids = await asyncio.gather(*(pool.call(_slow_machine_id, 0.5) for _ in range(3)))
        assert len(set(ids)) == 2 and len(fake.machines()) == 2
        for _ in range(100):
            if not pool.stats().runners and all(m["state"] == "destroyed" for m in fake.machines()):
                break
            await asyncio.sleep(0.05)
        assert pool.stats().runners == []
        assert_no_machine_left(fake)


async def test_creates_are_retried_on_429_and_409(fake: FakeFly) -> None:
    fake.fail_next("create", 429, times=2, error="rate limit exceeded", retry_after="0")
    fake.fail_next("create", 409, error="insufficient resources available to fulfill request")
    async with FlamePool("fly", backend=fly(fake)) as pool:
        assert await pool.call(sum, [1, 2]) == 3
    assert fake.count("POST") == 4
    assert_no_machine_left(fake)


async def test_a_persistent_422_is_a_boot_error_with_the_api_message(fake: FakeFly) -> None:
    fake.fail_next("create", 422, times=10, error="insufficient CPUs available in region ams")
    with pytest.raises(BootError, match="HTTP 422 after 3 attempts: insufficient CPUs available in region ams"):
        async with FlamePool("fly", backend=fly(fake, max_retries=2), min=1):
            pass
    assert fake.count("POST") == 3
    assert fake.machines() == []


async def test_a_runner_that_dies_while_booting_is_reported_not_timed_out(fake: FakeFly) -> None:
    backend = fly(fake, cmd=["python", "-c", "import sys; sys.exit(3)"])
    started = time.monotonic()
    with pytest.raises(BootError, match="exited with code 3"):
        async with FlamePool("fly", backend=backend, min=1, boot_timeout=20):
            pass
    assert time.monotonic() - started < 5
    assert_no_machine_left(fake)


async def test_a_runner_lost_mid_call_fails_the_call_and_is_replaced(fake: FakeFly) -> None:
    async with FlamePool("fly", backend=fly(fake)) as pool:
        with pytest.raises(RunnerLost, match=r"Fly machine \w+ (exited with code 3|is still started)"):
            await pool.call(_die)
        assert await pool.call(sum, [2, 3]) == 5
    assert len(fake.machines()) == 2
    assert_no_machine_left(fake)


async def test_an_out_of_memory_kill_is_named(fake: FakeFly) -> None:
    async with FlamePool("fly", backend=fly(fake)) as pool:
        machine_id = await pool.call(_machine_id)
        call = asyncio.ensure_future(pool.call(time.sleep, 5))
        await asyncio.sleep(0.2)
        fake.oom_kill(machine_id)
        with pytest.raises(RunnerLost, match=r"(out of memory|is still started)"):
            await call
    [machine] = fake.machines()
    assert str(describe_machine(machine)) == f"Fly machine {machine_id} was killed: out of memory (raise memory_mb)"
    assert_no_machine_left(fake)


def _spec(max_payload: int = 1024) -> RunnerSpec:
    info = ParentInfo(pool="thumbs", runner_id="thumbs-1-abc123", parent_address="p", backend="fly",
                      code_version="v", app="app:app", max_payload=max_payload)
    return RunnerSpec(pool="thumbs", runner_id="thumbs-1-abc123", info=info, app="app:app", boot_timeout=30,
                      secret="s3cret")


def test_machine_request_and_runner_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLAME_CODE_VERSION", "git-abc")
    monkeypatch.setenv("PARENT_ONLY_SECRET", "x")
    backend = FlyBackend(token="t", fly_app="my-app", image="img", gpu_kind="a100-pcie-40gb", memory_mb=8192,
                         app_import="app:app")
    body = backend.machine_request(_spec())
    assert body["name"] == "flame-thumbs-1-abc123"
    env = body["config"]["env"]
    assert env["FLAME_CODE_VERSION"] == "git-abc" and "FLAME_PARENT" in env
    assert env["FLAME_RUNNER_KEYS"] == _spec().keys.encode() and "FLAME_SECRET" not in env
    assert "s3cret" not in json.dumps(body)  # the root secret is not sent to Fly at all
    assert "PARENT_ONLY_SECRET" not in env
    assert body["config"]["guest"]["gpu_kind"] == "a100-pcie-40gb" and body["config"]["guest"]["gpus"] == 1
    machine = {"id": "3d8d413b29d089", "private_ip": "fdaa:0:1:a7b:1::2"}
    assert backend.runner_url(machine) == "http://[fdaa:0:1:a7b:1::2]:8080"
    internal = FlyBackend(token="t", fly_app="my-app", image="img", runner_host="{id}.vm.{app}.internal", port=9000)
    assert internal.runner_url(machine) == "http://3d8d413b29d089.vm.my-app.internal:9000"
    assert "token" not in repr(backend) and "'t'" not in repr(backend)


def test_app_keyword_still_names_the_fly_app_with_a_deprecation_warning() -> None:
    with pytest.warns(DeprecationWarning, match="pass fly_app= instead"):
        backend = FlyBackend(token="t", app="old-style", image="img")
    assert backend.fly_app == "old-style"
    assert backend.app_import() == "flame_asgi._bare:app"  # the import string is app_import=, untouched


# -- standby: machines prepared ahead, reused after their runner ---------------------------
async def _until(check: Any, what: str, budget: float = 20.0) -> None:
    deadline = time.monotonic() + budget
    while not check():
        assert time.monotonic() < deadline, f"never happened: {what}"
        await asyncio.sleep(0.05)


def _states(fake: FakeFly) -> list[str]:
    return sorted(m["state"] for m in fake.machines())


async def test_standby_machines_are_created_without_launch_and_a_boot_starts_one(fake: FakeFly) -> None:
    async with FlamePool("fly-standby", backend=fly(fake, standby=2), max=2, max_concurrency=1,
                         boot_timeout=20) as pool:
        await _until(lambda: pool.stats().standby == 2, "two machines prepared")
        assert _states(fake) == ["created", "created"] and pool.stats().runners == []  # nothing runs yet
        assert all(body["skip_launch"] is True and body["config"]["auto_destroy"] is False for body in fake.bodies)
        prepared = {m["id"] for m in fake.machines()}
        ran_on = await pool.call(_machine_id)
        assert ran_on in prepared  # the boot started a prepared machine ...
        assert fake.count("POST", f"/{ran_on}/start") == 1
        await _until(lambda: pool.stats().standby == 2, "another prepared behind it")
        assert _states(fake) == ["created", "created", "started"]
    assert_no_machine_left(fake)  # closing destroys the runner's and the prepared machines


async def test_a_stopped_runners_machine_is_reused_for_a_later_runner(fake: FakeFly) -> None:
    async with FlamePool("fly-reuse", backend=fly(fake, standby=1), max=1, max_concurrency=1,
                         idle_shutdown_after=0.3, boot_timeout=20) as pool:
        first = await pool.call(_machine_id)
        await _until(lambda: not pool.stats().runners, "the first runner idles away")
        machine = next(m for m in fake.machines() if m["id"] == first)
        assert machine["state"] == "stopped"  # kept, not destroyed
        # The next top-up (after the next boot) updates the kept machine for a new runner.
        second = await pool.call(_machine_id)
        await _until(lambda: pool.stats().standby == 1, "a machine prepared again")
        # The second runner started the machine prepared while the first ran; the first's
        # machine, stopped, was updated (not created anew) to be the next one prepared.
        assert second != first
        updates = [path for method, path, _ in fake.requests if method == "POST" and path.endswith(f"/{first}")]
        assert updates == [f"/v1/apps/{fake.app}/machines/{first}"]
        assert fake.count("POST") == 2  # two creates in all: the third runner's machine is the first's
        reused = next(m for m in fake.machines() if m["id"] == first)
        assert reused["config"]["metadata"]["flame_runner_id"] != machine["config"]["metadata"]["flame_runner_id"]
        assert reused["instance_id"] != machine["instance_id"]
    assert_no_machine_left(fake)


async def test_machines_of_a_parent_that_is_gone_are_destroyed_by_the_next(fake: FakeFly,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # The first parent is "machine-a", which no longer exists: a parent killed with its machine.
    monkeypatch.setenv("FLY_MACHINE_ID", "machine-a")
    gone = fly(fake, standby=2)
    pool = FlamePool("fly-orphans", backend=gone, max=1, boot_timeout=20)
    await pool.start()
    await _until(lambda: pool.stats().standby == 2, "two machines prepared")
    left = [m["id"] for m in fake.machines()]
    assert all(m["config"]["metadata"]["flame_parent_machine"] == "machine-a" for m in fake.machines())
    await gone.api.aclose()  # the parent dies: no close, no destroy
    # The next parent ("machine-b") destroys them when its pool starts; its own are kept.
    monkeypatch.setenv("FLY_MACHINE_ID", "machine-b")
    async with FlamePool("fly-sweeper", backend=fly(fake, standby=1), max=1, boot_timeout=20) as sweeper:
        await _until(lambda: sweeper.stats().standby == 1, "its own machine prepared")
        states = {m["id"]: m["state"] for m in fake.machines()}
        assert all(states[mid] == "destroyed" for mid in left)
        assert sorted(states.values()).count("created") == 1
    await pool.aclose()  # the abandoned pool's tasks (its machines are gone already)
    assert_no_machine_left(fake)


def test_standby_is_checked_and_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="standby >= 0"):
        FlyBackend(token="t", fly_app="a", image=IMAGE, standby=-1)
    monkeypatch.setenv("FLAME_FLY_STANDBY", "2")
    assert FlyBackend(token="t", fly_app="a", image=IMAGE).standby == 2
