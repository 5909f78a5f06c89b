"""A plain Starlette app (no flame_asgi class) given a pool by ``add_flame_pool``.

Its middleware accepts only ``Host: localhost``: runners are reached at 127.0.0.1, so
they work only because runner mode answers before any user middleware.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from flame_asgi import ProcessBackend, add_flame_pool, flame_pool, parent
from tests.apps.procs import child_pids

HOOKS: list[str] = []


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    HOOKS.append(f"lifespan ran in {os.getpid()}")
    yield


def where() -> dict[str, Any]:
    info = parent()
    return {"pid": os.getpid(), "hooks": list(HOOKS), "runner": info.runner_id if info else None,
            "children": sorted(child_pids(os.getpid()))}


async def work(request: Request) -> JSONResponse:
    pool = flame_pool("work")(request)
    result = await pool.call(where)
    return JSONResponse({"web_pid": os.getpid(), "stats_pid": pool.stats().pid, "web_hooks": list(HOOKS), **result})


app = Starlette(routes=[Route("/work", work)], lifespan=lifespan,
                middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=["localhost"])])
add_flame_pool(app, "work", backend=ProcessBackend(), max=1, idle_shutdown_after=None)
