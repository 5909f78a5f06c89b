"""A live page of the app's pools: runners and their state, slots, waiting callers, boot
times, calls per second, recent failures and a chart of runners over time.

    from fastapi import Depends, HTTPException
    from starlette.requests import HTTPConnection
    from flame_asgi.pool_view import pool_view

    def admins_only(conn: HTTPConnection) -> None:      # HTTPConnection: runs for the WebSocket too
        if conn.headers.get("authorization") != f"Bearer {ADMIN_TOKEN}":
            raise HTTPException(403, "admins only")

    app.mount("/pools", pool_view(dependencies=[Depends(admins_only)]))

``pool_view`` returns a small ASGI app (a FastAPI sub-application) that a FastAPI or a
plain Starlette app mounts like any other: ``GET /pools/`` is the page and
``/pools/ws`` the WebSocket that pushes the pools' state to it whenever a runner boots,
stops or is lost, when a call ends, and once a second for the chart.

It is off unless mounted: importing this module subscribes nothing. Creating a view
subscribes one event handler for the whole process (so the page can show boots and
failures that happened before anyone opened it), which makes every call build its small
event record (a few microseconds). It reveals internals (runner URLs, error texts), so
``dependencies`` is required: pass the FastAPI dependencies that let only your operators
in (``dependencies=[]`` leaves it open, for local development only).

The view shows the pools of the app it is mounted in (the pools ``add_flame_pool``
registered), or every running pool of the process when the app has none. Pools are per
process: under ``--workers N`` each worker's page shows that worker's pools (its pid is
on the page).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, params
from fastapi.exception_handlers import http_exception_handler
from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection, Request
from starlette.responses import HTMLResponse, Response
from starlette.websockets import WebSocket, WebSocketDisconnect

from flame_asgi._asgi.extension import SCOPE_KEY
from flame_asgi._asgi.pool_view_page import PAGE
from flame_asgi._observe import telemetry
from flame_asgi._observe.monitor import Monitor, PoolRecord, monitor
from flame_asgi._pool.pool import FlamePool
from flame_asgi._pool.runners import RunnerInfo

TICK = 1.0  # a push at least this often, for ages, rates and the chart
MIN_GAP = 0.25  # at most four pushes a second: a burst of calls is one update
CHART_POINTS = 300  # the newest points of each pool's history sent with a push

__all__ = ["pool_view"]


def pool_view(*, dependencies: Sequence[params.Depends]) -> FastAPI:
    """The live pool page as an ASGI app to mount: ``app.mount("/pools", pool_view(...))``.

    ``dependencies`` (required) guard both the page and its WebSocket, as
    ``dependencies=`` does on a FastAPI route: ``[Depends(admins_only)]``. Write them
    against ``starlette.requests.HTTPConnection`` (not ``Request``) so they also run for
    the WebSocket; raising ``HTTPException(403)`` refuses both.
    """
    if isinstance(dependencies, (str, bytes)) or not isinstance(dependencies, Sequence):
        raise TypeError(f"pool_view(dependencies=...) takes a list of Depends(...), got {dependencies!r}")
    for dependency in dependencies:
        if not isinstance(dependency, params.Depends):
            raise TypeError(f"pool_view(dependencies=[...]) items must be Depends(your_check), got {dependency!r}: "
                            "wrap your function, e.g. dependencies=[Depends(admins_only)]")
    watcher = monitor()  # start recording now: failures before the page opens still show
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    guards = list(dependencies)

    async def page() -> HTMLResponse:
        # The page may be reached with a token in its query string: keep it out of Referer.
        return HTMLResponse(PAGE, headers={"Cache-Control": "no-store", "Referrer-Policy": "no-referrer",
                                           "X-Frame-Options": "DENY"})

    async def live(websocket: WebSocket) -> None:
        await _push(websocket, watcher)

    app.add_exception_handler(HTTPException, _refuse)  # type: ignore[arg-type]
    app.add_api_route("/", page, methods=["GET"], dependencies=guards, include_in_schema=False)
    app.add_api_websocket_route("/ws", live, dependencies=guards)
    return app


async def _refuse(conn: HTTPConnection, exc: HTTPException) -> Response | None:
    """A guard said no: the page gets the usual JSON error; the WebSocket is closed before
    its handshake completes, which the server turns into a plain HTTP 403."""
    if conn.scope["type"] == "websocket":
        assert isinstance(conn, WebSocket)
        await conn.close(1008, str(exc.detail)[:120])
        return None
    assert isinstance(conn, Request)
    return await http_exception_handler(conn, exc)


async def _push(websocket: WebSocket, watcher: Monitor) -> None:
    """Send the pools' state now, then again after every change (coalesced) or tick."""
    await websocket.accept()
    changed = asyncio.Event()
    unwatch = watcher.watch(changed)
    gone = asyncio.ensure_future(_until_closed(websocket))
    try:
        while not gone.done():
            changed.clear()
            await websocket.send_json(_snapshot(_app_pools(websocket.scope), watcher))
            woken = asyncio.ensure_future(changed.wait())
            await asyncio.wait({woken, gone}, timeout=TICK, return_when=asyncio.FIRST_COMPLETED)
            woken.cancel()
            if not gone.done():
                await asyncio.sleep(MIN_GAP)
    except (WebSocketDisconnect, RuntimeError, OSError):
        pass  # the page went away while we were sending
    finally:
        unwatch()
        gone.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await gone


async def _until_closed(websocket: WebSocket) -> None:
    while (await websocket.receive())["type"] != "websocket.disconnect":
        pass  # the page sends nothing; anything it does send is ignored


def _app_pools(scope: Mapping[str, Any]) -> list[FlamePool]:
    pools: Mapping[str, FlamePool] = scope.get(SCOPE_KEY) or {}
    if pools:
        return list(pools.values())
    own = [p for p in telemetry.pools() if isinstance(p, FlamePool)]  # an app that opened its own pools
    return sorted(own, key=lambda p: p.name)


def _snapshot(pools: Sequence[FlamePool], watcher: Monitor) -> dict[str, Any]:
    """What one push carries (a JSON object): this process and each of ``pools``."""
    running = set(telemetry.pools())
    return {"now": time.time(), "pid": os.getpid(), "since": watcher.started,
            "pools": [_pool_json(pool, pool in running, watcher.record(pool.name)) for pool in pools]}


def _pool_json(pool: FlamePool, running: bool, record: PoolRecord) -> dict[str, Any]:
    s = pool.stats()
    capacity = 1 if pool.single_use else pool.max_concurrency
    runners = [_runner_json(pool, r, capacity, record) for r in s.runners]
    named = list(record.booting.items())[: s.booting]
    runners += [{"id": rid, "state": "booting", "active": 0, "capacity": capacity, "url": None, "since": since,
                 "boot_time": None} for rid, since in named]
    # Boots begun before this process's first view existed are counted, not named.
    runners += [{"id": None, "state": "booting", "active": 0, "capacity": capacity, "url": None, "since": None,
                 "boot_time": None}] * (s.booting - len(named))
    if running:
        record.sample(len(s.runners), s.booting, s.waiting)
    boots = list(record.boot_times)
    return {
        "name": pool.name, "backend": pool.backend.name, "running": running, "min": pool.min, "max": pool.max,
        "warm": pool.warm, "capacity": capacity, "runners": runners, "booting": s.booting, "waiting": s.waiting,
        "standby": s.standby, "slots_used": sum(r.active for r in s.runners),
        "slots": capacity * sum(1 for r in runners if r["state"] in ("busy", "idle", "warm")),
        "calls_per_second": record.calls_per_second(), "calls_total": record.calls_total,
        "failed_total": record.failed_total, "boot_times": boots[-20:],
        "boot_median": statistics.median(boots) if boots else None,
        "failures": [f.json() for f in reversed(record.failures)],
        "history": list(record.history)[-CHART_POINTS:],
    }


def _runner_json(pool: FlamePool, info: RunnerInfo, capacity: int, record: PoolRecord) -> dict[str, Any]:
    since, boot_time = record.up.get(info.id, (None, None))
    if info.stopping:
        state = "stopping"
    else:
        state = "busy" if info.active else ("warm" if info.warm else "idle")
    return {"id": info.id, "state": state, "active": info.active, "capacity": capacity, "url": info.url,
            "since": since, "boot_time": boot_time}

