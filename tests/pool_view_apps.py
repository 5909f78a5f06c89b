"""The same small app twice, FastAPI and plain Starlette, each mounting the pool view at
``/pools`` behind a token guard (tests/test_pool_view.py serves them with uvicorn)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator

from fastapi import Depends, FastAPI, HTTPException
from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from flame_asgi import FlamePool, ProcessBackend, add_flame_pool, flame_pool, parent
from flame_asgi.pool_view import pool_view

TOKEN = "operators-only"


def operators(conn: HTTPConnection) -> None:
    """The view's guard: the token in the query string or as a bearer token (page and WebSocket)."""
    if conn.query_params.get("token") != TOKEN and conn.headers.get("authorization") != f"Bearer {TOKEN}":
        raise HTTPException(403, "operators only")


def runner_pid() -> int:
    return os.getpid()


async def nap(seconds: float) -> int:
    await asyncio.sleep(seconds)
    return os.getpid()


def refuse() -> None:
    raise ValueError("refused on purpose")


def add_pool(app: FastAPI | Starlette) -> None:
    add_flame_pool(app, "work", backend=ProcessBackend(), max=2, max_concurrency=2, idle_shutdown_after=None)


async def _pid(request: Request) -> JSONResponse:
    pool: FlamePool = flame_pool("work")(request)
    seconds = float(request.query_params.get("nap", "0"))
    pid = await (pool.call(nap, seconds) if seconds else pool.call(runner_pid))
    return JSONResponse({"pid": pid})


async def _refuse(request: Request) -> JSONResponse:
    try:
        await flame_pool("work")(request).call(refuse)
    except ValueError as exc:
        return JSONResponse({"error": str(exc)}, status_code=500)
    return JSONResponse({})


async def _ping(request: Request) -> JSONResponse:
    return JSONResponse({"pid": os.getpid()})


ROUTES = [Route("/pid", _pid), Route("/refuse", _refuse), Route("/ping", _ping)]

fastapi_app = FastAPI()
add_pool(fastapi_app)
for route in ROUTES:
    fastapi_app.add_route(route.path, route.endpoint)
fastapi_app.mount("/pools", pool_view(dependencies=[Depends(operators)]))

starlette_app = Starlette(routes=[*ROUTES, Mount("/pools", app=pool_view(dependencies=[Depends(operators)]))])
add_pool(starlette_app)


@contextlib.asynccontextmanager
async def slow_to_stop(app: FastAPI) -> AsyncIterator[None]:
    yield
    if parent():  # a runner: its shutdown takes two seconds, so it is seen stopping
        await asyncio.sleep(2)


# Runners that stop after one idle second and take two seconds to do it.
stopping_app = FastAPI(lifespan=slow_to_stop)
add_flame_pool(stopping_app, "work", backend=ProcessBackend(), max=1, idle_shutdown_after=1)
stopping_app.add_route("/pid", _pid)
stopping_app.mount("/pools", pool_view(dependencies=[]))
