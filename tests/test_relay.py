"""relay(): a child's progress and result reach a browser; a browser leaving stops the work."""

from __future__ import annotations

import asyncio
import pathlib
import time
from typing import Annotated, Any

import pytest
from fastapi import Depends, WebSocket
from fastapi.testclient import TestClient

from flame_asgi import FastAPI, FlamePool, LocalBackend, ProcessBackend, flame_pool, relay
from tests import remote


async def steps(n: int, delay: float, done: str) -> str:
    from flame_asgi import report

    for i in range(n):
        await report({"step": i})
        await asyncio.sleep(delay)
    pathlib.Path(done).touch()
    return f"{n} steps"


def make_app(done: pathlib.Path, n: int, delay: float) -> tuple[FastAPI, dict[str, Any]]:
    app = FastAPI()
    app.add_flame_pool("work", backend=LocalBackend(), max_concurrency=2)
    seen: dict[str, Any] = {}

    @app.websocket("/ws")
    async def live(ws: WebSocket, pool: Annotated[FlamePool, Depends(flame_pool("work"))]) -> None:
        await ws.accept()
        handle = await pool.place_child(steps, n, delay, str(done))
        seen["pool"] = pool
        seen["result"] = await relay(ws, handle)

    @app.websocket("/ws/stream")
    async def items(ws: WebSocket, pool: Annotated[FlamePool, Depends(flame_pool("work"))]) -> None:
        await ws.accept()
        await relay(ws, pool.stream(remote.count_with_progress, 3))

    @app.websocket("/ws/fail")
    async def fail(ws: WebSocket, pool: Annotated[FlamePool, Depends(flame_pool("work"))]) -> None:
        await ws.accept()
        with pytest.raises(ValueError):
            await relay(ws, await pool.place_child(remote.raise_value_error))

    return app, seen


def test_events_then_result_reach_the_browser(tmp_path: pathlib.Path) -> None:
    app, seen = make_app(tmp_path / "done", 5, 0.0)
    with TestClient(app) as client, client.websocket_connect("/ws") as ws:
        messages = [ws.receive_json() for _ in range(6)]
        assert messages == [{"event": {"step": i}} for i in range(5)] + [{"result": "5 steps"}]
    assert seen["result"] == "5 steps"


def test_stream_items_and_errors_reach_the_browser(tmp_path: pathlib.Path) -> None:
    app, _ = make_app(tmp_path / "done", 1, 0.0)
    with TestClient(app) as client:
        with client.websocket_connect("/ws/stream") as ws:
            assert [ws.receive_json() for _ in range(7)] == [
                {"event": "making 0"}, {"item": 0}, {"event": "making 1"}, {"item": 1},
                {"event": "making 2"}, {"item": 2}, {"done": True}]
        with client.websocket_connect("/ws/fail") as ws:
            assert ws.receive_json() == {"error": {"type": "ValueError", "message": "remote boom"}}


def test_browser_leaving_cancels_the_remote_work(tmp_path: pathlib.Path) -> None:
    done = tmp_path / "done"
    app, seen = make_app(done, 30, 0.01)  # would finish by itself in ~0.3 s
    with TestClient(app) as client:
        with client.websocket_connect("/ws") as ws:
            assert ws.receive_json() == {"event": {"step": 0}}
        # The browser has gone: the child is stopped on the runner and its slot freed.
        deadline = time.monotonic() + 10
        while sum(r.active for r in seen["pool"].stats().runners) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sum(r.active for r in seen["pool"].stats().runners) == 0
    time.sleep(1.0)
    assert not done.exists()


async def ticks(n: int, delay: float, marker: str) -> Any:
    try:
        for i in range(n):
            yield i
            await asyncio.sleep(delay)
    except asyncio.CancelledError:
        pathlib.Path(marker + ".cancelled").touch()
        raise
    pathlib.Path(marker + ".finished").touch()


def test_browser_leaving_cancels_an_unlinked_stream_on_its_runner(tmp_path: pathlib.Path) -> None:
    # link=False keeps work running when its *caller* goes away; a relayed stream's consumer
    # is the browser, so the browser leaving ends the generator on the runner all the same.
    marker = str(tmp_path / "ticks")
    app = FastAPI()
    app.add_flame_pool("ticks", backend=ProcessBackend())

    @app.websocket("/ws")
    async def live(ws: WebSocket, pool: Annotated[FlamePool, Depends(flame_pool("ticks"))]) -> None:
        await ws.accept()
        await relay(ws, pool.stream(ticks, 50, 0.02, marker, link=False))  # ~1 s if left alone

    with TestClient(app) as client:
        with client.websocket_connect("/ws") as ws:
            assert ws.receive_json() == {"item": 0}
        deadline = time.monotonic() + 10
        while not pathlib.Path(marker + ".cancelled").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(1.5)  # long enough for the generator to have finished, had it run on
    assert pathlib.Path(marker + ".cancelled").exists()
    assert not pathlib.Path(marker + ".finished").exists()
