"""A small flame_asgi app the end-to-end tests serve with a real uvicorn."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends

from flame_asgi import FastAPI, FlamePool, ProcessBackend, flame_pool, parent

STATE: dict[str, Any] = {}


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # Stands in for opening a database pool: it must happen on runners too.
    STATE["db"] = f"opened in {os.getpid()}"
    yield
    STATE.clear()


app = FastAPI(lifespan=lifespan)
app.add_flame_pool("work", backend=ProcessBackend(), max=2, idle_shutdown_after=None)


def describe(x: int) -> dict[str, Any]:
    info = parent()
    return {"square": x * x, "pid": os.getpid(), "db": STATE.get("db"),
            "runner": info.runner_id if info else None, "pool": info.pool if info else None}


@app.get("/square/{x}")
async def square(x: int, pool: Annotated[FlamePool, Depends(flame_pool("work"))]) -> dict[str, Any]:
    return await pool.call(describe, x)


@app.get("/hello")
async def hello() -> dict[str, str]:
    return {"hello": "world"}
