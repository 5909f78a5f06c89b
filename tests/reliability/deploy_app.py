"""An app under load when its server is told to stop (tests/reliability/test_deploy.py).

``POST /call`` runs a linked call on a runner and answers with its result;
``POST /cast`` starts ``link=False`` work that leaves a file; ``GET /runners`` lists
the runners' process ids. ``GET /_flame_probe`` answers once the app serves.
"""

from __future__ import annotations

import os

from flame_asgi import FastAPI, ProcessBackend
from tests.reliability import work
from tests.reliability.support import runner_pids

app = FastAPI()
pool = app.add_flame_pool("deploy", backend=ProcessBackend(heartbeat_interval=0.2), max=2, max_concurrency=20,
                          shutdown_timeout=float(os.environ.get("DEPLOY_SHUTDOWN_TIMEOUT", "10")))


@app.get("/_flame_probe")
async def probe() -> dict[str, bool]:
    return {"ok": True}


@app.post("/call")
async def call(seconds: float, path: str, started: str) -> dict[str, str]:
    return {"result": await pool.call(work.touch_after, seconds, path, started, timeout=60)}


@app.post("/cast")
async def cast(seconds: float, path: str, started: str) -> dict[str, bool]:
    pool.cast(work.touch_after, seconds, path, started, link=False)
    return {"ok": True}


@app.get("/runners")
async def runners() -> list[int]:
    return list(runner_pids(pool).values())
