"""An app whose runners die during boot, after logging why."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from flame_asgi import FastAPI, parent


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    if parent() is not None:
        logging.getLogger("obs.boot").warning("cannot open the database at %s", "db:5432")
        os._exit(3)  # dies at once: no traceback after the record
    yield


app = FastAPI(lifespan=lifespan)
