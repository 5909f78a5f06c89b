"""flame_asgi.FastAPI: pools in the lifespan, the dependency, runner mode, through uvicorn."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Annotated

import httpx
import pytest
from fastapi import Depends
from fastapi.testclient import TestClient

from flame_asgi import FastAPI, FlamePool, LocalBackend, PoolClosed, flame_pool
from tests import remote
from tests.runner_env import become_runner


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@contextmanager
def served_app() -> Iterator[tuple[str, int]]:
    """The demo app under a real uvicorn process (the parent), stopped with SIGTERM."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "tests.apps.demo_app:app", "--host", "127.0.0.1",
                             "--port", str(port), "--log-level", "warning"])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(url + "/hello", timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.05)
        yield url, proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_route_with_pool_dependency_runs_on_a_runner_through_uvicorn() -> None:
    with served_app() as (url, web_pid):
        first = httpx.get(url + "/square/7", timeout=30).json()
        assert first["pid"] != web_pid  # it ran in a runner process, not in the web process
        assert first["square"] == 49
        assert first["pool"] == "work" and first["runner"].startswith("work-")
        assert first["db"] == f"opened in {first['pid']}"  # the runner ran the app's own lifespan
        again = httpx.get(url + "/square/8", timeout=30).json()
        assert again["pid"] == first["pid"]  # the warm runner is reused
        assert httpx.get(url + "/hello").json() == {"hello": "world"}
        runner_pid = first["pid"]
        assert _alive(runner_pid)
    # uvicorn stopped gracefully: its lifespan closed the pool, which stopped the runner.
    deadline = time.monotonic() + 10
    while _alive(runner_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(runner_pid)


def _runner_env(monkeypatch: pytest.MonkeyPatch) -> None:
    become_runner(monkeypatch, "p-1", "tests.test_app:app")


def test_runner_mode_serves_only_internal_endpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    app = FastAPI()

    @app.get("/hello")
    async def hello() -> dict[str, str]:
        return {"hello": "world"}

    assert TestClient(app).get("/hello").status_code == 200
    _runner_env(monkeypatch)
    client = TestClient(app)
    assert client.get("/hello").status_code == 404
    assert client.get("/docs").status_code == 404
    health = client.get("/_flame/health").json()
    assert health == {"status": "ok", "runner_id": "p-1", "pool": "p"}  # nothing to time an attack by


def test_runner_mode_still_runs_the_user_lifespan(monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, str]]:
        events.append("start")
        yield {"db": "open"}
        events.append("stop")

    _runner_env(monkeypatch)
    app = FastAPI(lifespan=lifespan)
    pool = app.add_flame_pool("inner", min=1)
    with TestClient(app):
        assert events == ["start"]
        assert pool.stats().runners == []  # a runner's own pools start with min=0
    assert events == ["start", "stop"]


async def test_add_flame_pool_lifespan_and_dependency_in_process() -> None:
    events: list[str] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        events.append(f"user start, pool running: {app.flame_pools['sq'].stats().runners != []}")
        yield
        # The pools close after the user's teardown, which can still use them.
        events.append(f"user stop, pool answers: {await app.flame_pools['sq'].call(remote.square, 2)}")

    app = FastAPI(lifespan=lifespan)
    pool = app.add_flame_pool("sq", backend=LocalBackend(), min=1)
    assert app.flame_pools["sq"] is pool
    with pytest.raises(ValueError, match="already registered"):
        app.add_flame_pool("sq")

    @app.get("/sq/{x}")
    async def sq(x: int, pool: Annotated[FlamePool, Depends(flame_pool("sq"))]) -> int:
        return await pool.call(remote.square, x)

    @app.get("/missing")
    async def missing(pool: Annotated[FlamePool, Depends(flame_pool("nope"))]) -> None:
        return None

    with TestClient(app) as client:
        assert client.get("/sq/9").json() == 81
        with pytest.raises(RuntimeError, match=r"no flame pool named 'nope'.*registered: sq"):
            client.get("/missing")
    assert events == ["user start, pool running: True", "user stop, pool answers: 4"]
    with pytest.raises(PoolClosed):  # and then they are closed
        await pool.call(remote.square, 1)
    with TestClient(app) as client:  # a second lifespan (one per test, say) starts the pools again
        assert client.get("/sq/3").json() == 9
    assert os.environ.get("FLAME_PARENT") is None
