"""An app served by multi-process servers: each worker process has its own pool."""

from __future__ import annotations

import asyncio
import os
from typing import Annotated, Any

from fastapi import Depends

from flame_asgi import FastAPI, FlamePool, ProcessBackend, flame_pool

app = FastAPI()
app.add_flame_pool("w", backend=ProcessBackend(), max=1, idle_shutdown_after=None)


def runner_pid() -> int:
    return os.getpid()


@app.get("/where")
async def where(pool: Annotated[FlamePool, Depends(flame_pool("w"))]) -> dict[str, Any]:
    runner = await pool.call(runner_pid)
    await asyncio.sleep(0.05)  # keep this worker busy a moment, so others take new connections
    stats = pool.stats()
    return {"worker": os.getpid(), "stats_pid": stats.pid, "runner": runner, "runners": len(stats.runners)}
