"""``flame_asgi.FastAPI``: ``fastapi.FastAPI`` with ``add_flame_pool`` and runner mode built in.

A thin convenience over ``add_flame_pool(app, ...)`` (see ``_extension``): the constructor
passes every argument to FastAPI untouched, so ``lifespan=`` of any form, ``on_startup``,
``on_shutdown`` and ``@app.on_event`` behave exactly as they do in FastAPI.
"""

from __future__ import annotations

from typing import Any

import fastapi

from flame_asgi._asgi.extension import install
from flame_asgi._pool.pool import FlamePool


class FastAPI(fastapi.FastAPI):
    """``fastapi.FastAPI`` plus ``add_flame_pool`` / ``flame_pools`` and runner mode."""

    flame_pools: dict[str, FlamePool]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        install(self)

    def add_flame_pool(self, name: str, **pool_options: Any) -> FlamePool:
        """Register a pool that starts and stops with this app; see ``FlamePool`` for options."""
        return install(self).add(name, pool_options)
