"""An app served by a real uvicorn in the graceful-shutdown test.

``POST /start?linked=...&unlinked=...&started=...`` casts two pieces of work that each
leave a file after ``GRACEFUL_WORK_SECONDS``: one ``link=True``, one ``link=False``.
``GET /runners`` lists the runners' process ids.
"""

from __future__ import annotations

import os

from flame_asgi import FastAPI, ProcessBackend
from tests.reliability import work
from tests.reliability.support import runner_pids

SECONDS = float(os.environ.get("GRACEFUL_WORK_SECONDS", "1.5"))

app = FastAPI()
pool = app.add_flame_pool("graceful", backend=ProcessBackend(heartbeat_interval=0.2), max=1,
                          shutdown_timeout=float(os.environ.get("GRACEFUL_SHUTDOWN_TIMEOUT", "10")))


@app.post("/start")
async def start(linked: str, unlinked: str, started: str) -> dict[str, int]:
    pool.cast(work.touch_after, SECONDS, linked, started + ".linked", link=True)
    pool.cast(work.touch_after, SECONDS, unlinked, started + ".unlinked", link=False)
    return {"ok": 1}


@app.get("/runners")
async def runners() -> list[int]:
    return list(runner_pids(pool).values())
