"""Example: a FastAPI app whose CPU-heavy endpoint runs in a copy of itself.

Run it with ``python -m example_app`` (or ``uvicorn example_app.main:app``), open
http://127.0.0.1:8000 and press the button: the prime count is computed on a runner
booted by the ``primes`` pool (a uvicorn process serving this same app in runner mode),
while the web process stays responsive. Progress events stream back over a WebSocket.
"""

from __future__ import annotations

import os
from typing import Annotated, Any

from fastapi import Depends, WebSocket, WebSocketDisconnect
from fastapi.responses import HTMLResponse

from flame_asgi import FastAPI, FlamePool, ProcessBackend, flame_pool, parent, report

app = FastAPI(title="flame_asgi example")
app.add_flame_pool(
    "primes",
    # FLAME_BACKEND picks the backend when set; otherwise runners are local processes.
    backend=None if os.environ.get("FLAME_BACKEND") else ProcessBackend(),
    min=0,
    max=2,
    max_concurrency=4,
    idle_shutdown_after=30,
    timeout=120,
)


def count_primes(limit: int) -> dict[str, Any]:
    """Deliberately CPU-bound: a plain sieve, reporting progress every tenth."""
    sieve = bytearray([1]) * (limit + 1)
    sieve[0:2] = b"\x00\x00"
    step = max(1, int(limit**0.5) // 10)
    for i in range(2, int(limit**0.5) + 1):
        if sieve[i]:
            sieve[i * i :: i] = bytes(len(range(i * i, limit + 1, i)))
        if i % step == 0:
            report({"progress": round(i / limit**0.5, 2)})
    info = parent()
    return {"limit": limit, "primes": sum(sieve), "runner": info.runner_id if info else None, "pid": os.getpid()}


@app.get("/primes")
async def primes(n: int, pool: Annotated[FlamePool, Depends(flame_pool("primes"))]) -> dict[str, Any]:
    if not 2 <= n <= 50_000_000:
        return {"error": "n must be between 2 and 50,000,000"}
    return await pool.call(count_primes, n)


@app.websocket("/ws/primes")
async def primes_live(ws: WebSocket, pool: Annotated[FlamePool, Depends(flame_pool("primes"))]) -> None:
    await ws.accept()
    n = int(await ws.receive_text())
    try:
        result = await pool.call(count_primes, n, on_progress=ws.send_json)
        await ws.send_json({"result": result})
        await ws.close()
    except WebSocketDisconnect:
        pass  # the browser left: the linked remote call was cancelled with this handler


@app.get("/stats")
async def stats(pool: Annotated[FlamePool, Depends(flame_pool("primes"))]) -> dict[str, Any]:
    s = pool.stats()
    return {"runners": [vars(r) for r in s.runners], "booting": s.booting, "waiting": s.waiting}


PAGE = """<!doctype html><meta charset=utf-8><title>flame_asgi example</title>
<h1>Count primes on a FLAME runner</h1>
<input id=n value=20000000 size=12> <button id=go>Count</button>
<progress id=bar max=1 value=0></progress><pre id=out></pre>
<script>
go.onclick = () => {
  const ws = new WebSocket(`ws://${location.host}/ws/primes`);
  ws.onopen = () => ws.send(n.value);
  ws.onmessage = (m) => { const d = JSON.parse(m.data);
    if (d.progress !== undefined) bar.value = d.progress;
    if (d.result) { bar.value = 1; out.textContent = JSON.stringify(d.result, null, 2); } };
};
</script>"""


@app.get("/", response_class=HTMLResponse)
async def index() -> str:
    return PAGE
