"""A runner app that profiles itself: ``ProcessBackend(app="bench.profiled_app:app")``.

With ``BENCH_PROFILE_DIR`` set, the runner's lifespan starts pyinstrument on its event
loop thread and, at shutdown, writes ``runner-<pid>.txt`` (call tree) and
``runner-<pid>-flat.txt`` (functions by own time) there. Used by ``bench.profile``.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
from collections.abc import AsyncIterator
from typing import Any

from flame_asgi import FastAPI


@contextlib.asynccontextmanager
async def _lifespan(app: Any) -> AsyncIterator[None]:
    target = os.environ.get("BENCH_PROFILE_DIR")
    if not target:
        yield
        return
    from pyinstrument import Profiler

    profiler = Profiler(interval=float(os.environ.get("BENCH_PROFILE_INTERVAL", "0.0002")), async_mode="disabled")
    profiler.start()
    try:
        yield
    finally:
        profiler.stop()
        out = pathlib.Path(target)
        out.mkdir(parents=True, exist_ok=True)
        pid = os.getpid()
        (out / f"runner-{pid}.txt").write_text(profiler.output_text(show_all=False))
        (out / f"runner-{pid}-flat.txt").write_text(profiler.output_text(flat=True))


app = FastAPI(lifespan=_lifespan, openapi_url=None, docs_url=None, redoc_url=None)
