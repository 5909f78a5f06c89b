"""A plain ``fastapi.FastAPI`` app whose tables are made by ``@app.on_event("startup")``.

The runner only finds its table if the startup hook ran there too. The database file
comes from ``HOOKS_DB`` (the test sets it; runners inherit the environment).
"""

from __future__ import annotations

import os
import sqlite3
from typing import Annotated, Any

import fastapi
from fastapi import Depends, WebSocket

from flame_asgi import FlamePool, FlameRunner, ProcessBackend, add_flame_pool, flame_pool, flame_runner, parent

app = fastapi.FastAPI()
add_flame_pool(app, "sq", backend=ProcessBackend(), max=2, max_concurrency=4, idle_shutdown_after=None)
MODEL: dict[str, Any] = {}


def _db() -> sqlite3.Connection:
    return sqlite3.connect(os.environ["HOOKS_DB"], timeout=10)


@app.on_event("startup")
def create_tables() -> None:
    with _db() as db:
        db.execute("create table if not exists startups (pid integer)")
        db.execute("insert into startups values (?)", (os.getpid(),))


def square(x: int) -> dict[str, Any]:
    with _db() as db:  # "no such table" here if the startup hook did not run on this runner
        startups = [row[0] for row in db.execute("select pid from startups")]
    info = parent()
    return {"square": x * x, "pid": os.getpid(), "startup_ran_here": os.getpid() in startups,
            "runner": info.runner_id if info else None}


def load_model(name: str) -> int:
    MODEL[name] = os.getpid()  # stands in for loading weights once per runner
    return os.getpid()


def use_model(name: str) -> int | None:
    return MODEL.get(name)


@app.get("/square/{x}")
async def route_square(x: int, pool: Annotated[FlamePool, Depends(flame_pool("sq"))]) -> dict[str, Any]:
    return {"web_pid": os.getpid(), "stats_pid": pool.stats().pid, **await pool.call(square, x)}


@app.get("/model/{name}")
async def route_model(name: str, runner: Annotated[FlameRunner, Depends(flame_runner("sq"))]) -> dict[str, Any]:
    loaded = await runner.call(load_model, name)
    used = await runner.call(use_model, name)
    return {"runner": runner.id, "loaded_in": loaded, "used_in": used}


@app.websocket("/ws/model/{name}")
async def ws_model(websocket: WebSocket, name: str,
                   runner: Annotated[FlameRunner, Depends(flame_runner("sq"))]) -> None:
    await websocket.accept()
    await websocket.send_json({"loaded_in": await runner.call(load_model, name)})
    while (text := await websocket.receive_text()) != "bye":
        await websocket.send_json({"step": text, "used_in": await runner.call(use_model, name)})
    await websocket.close()
