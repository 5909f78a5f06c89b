"""The showcase web app: upload a video, watch its thumbnails arrive from a FLAME runner.

Run it with ``python -m example_app`` (or the Procfile's ``web:`` line) and open
http://127.0.0.1:8000. A job goes:

1. ``POST /api/jobs`` saves the upload to ``DATA_DIR/uploads`` and records a pending job;
2. the page opens ``/ws/jobs/{id}``; the route places ``make_thumbnails`` on a runner of
   the ``thumbs`` pool (a copy of this app, booted on demand) and relays its progress
   events to the browser as they come;
3. the runner writes each thumbnail to the database itself; ``GET /api/jobs`` lists them.

With ``FLAME_PARENT`` set (in a runner) this same app serves only ``/_flame``: the routes
below answer 404 there, while the lifespan still opens the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, File, Form, HTTPException, Response, UploadFile, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from example_app.config import MAX_UPLOAD_BYTES, Settings
from example_app.db import Job, database, job_json, open_database
from example_app.thumbs import make_thumbnails
from example_app.tracing import tracing
from flame_asgi import Backend, FastAPI, FlameError, FlamePool, ProcessBackend, flame_pool, parent, relay
from flame_asgi.metrics import mount_metrics

STATIC = Path(__file__).parent / "static"
log = logging.getLogger("example_app")
RUNNER_ENV = ("DATA_DIR", "DATABASE_URL")  # the settings runners need, for backends that do not copy the env


def thumbs_backend() -> Backend | None:
    """``ProcessBackend`` unless ``FLAME_BACKEND`` names one (``None``: the pool builds that one)."""
    name = os.environ.get("FLAME_BACKEND", "").strip().lower()
    if not name:
        return ProcessBackend()
    if name == "docker":
        from flame_asgi.backends.docker import DockerBackend

        # Containers do not inherit this process's environment: hand them the app's settings.
        backend = DockerBackend.from_env()
        backend.env.update({k: os.environ[k] for k in RUNNER_ENV if k in os.environ})
        return backend
    return None


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # Runs in the web process and in every runner: both need the database.
    settings = Settings.from_env()
    settings.uploads.mkdir(parents=True, exist_ok=True)
    app.state.settings = settings
    with tracing("thumbs-runner" if parent() else "thumbs-web"):  # off unless configured
        async with open_database(settings.database_url):
            yield


app = FastAPI(title="flame_asgi showcase: video thumbnails", lifespan=lifespan)
app.add_flame_pool("thumbs", backend=thumbs_backend(), max=2, max_concurrency=2, idle_shutdown_after=30)
app.mount("/static", StaticFiles(directory=STATIC), name="static")
with contextlib.suppress(ImportError):  # GET /metrics for Prometheus: pip install 'flame_asgi[prometheus]'
    mount_metrics(app)
Thumbs = Annotated[FlamePool, Depends(flame_pool("thumbs"))]


@app.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(STATIC / "index.html")


@app.post("/api/jobs", status_code=201)
async def create_job(file: Annotated[UploadFile | None, File()] = None,
                     count: Annotated[int, Form(ge=1, le=60)] = 8) -> dict[str, Any]:
    """Record a job for an uploaded video, or for a sample generated on the runner (no file)."""
    job_id = uuid.uuid4().hex
    video_path = None
    if file is not None and file.filename:
        settings: Settings = app.state.settings
        video_path = str(settings.uploads / f"{job_id}{Path(file.filename).suffix[:10]}")
        await save_upload(file, video_path)
    filename = file.filename if file is not None and file.filename else "generated sample (testsrc2)"
    await database().add_job(Job(id=job_id, filename=filename[:255], video_path=video_path, requested=count))
    return {"id": job_id, "live": f"/ws/jobs/{job_id}"}


async def save_upload(file: UploadFile, path: str) -> None:
    # The runner reads it from DATA_DIR (same machine); flame_asgi.Upload could stream it instead.
    size = 0
    with open(path, "wb") as out:
        while chunk := await file.read(1024 * 1024):
            size += len(chunk)
            if size > MAX_UPLOAD_BYTES:
                out.close()
                os.unlink(path)
                raise HTTPException(413, f"uploads are limited to {MAX_UPLOAD_BYTES // 2**20} MiB")
            await asyncio.to_thread(out.write, chunk)


@app.get("/api/jobs")
async def list_jobs() -> list[dict[str, Any]]:
    return [job_json(job) for job in await database().recent_jobs()]


@app.get("/api/thumbnails/{thumb_id}.jpg")
async def thumbnail(thumb_id: int) -> Response:
    image = await database().thumbnail_image(thumb_id)
    if image is None:
        raise HTTPException(404, "no such thumbnail")
    return Response(image, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=31536000"})


@app.get("/api/stats")
async def stats(pool: Thumbs) -> dict[str, Any]:
    s = pool.stats()
    return {"runners": [{"id": r.id, "url": r.url, "active": r.active} for r in s.runners],
            "booting": s.booting, "waiting": s.waiting}


@app.websocket("/ws/jobs/{job_id}")
async def job_live(ws: WebSocket, job_id: str, pool: Thumbs) -> None:
    """Run a pending job on a runner and forward its progress to the browser as it happens."""
    await ws.accept()
    job = await database().claim_job(job_id)
    if job is None:
        await ws.send_json({"error": {"type": "NotFound", "message": f"no pending job {job_id}"}})
        await ws.close()
        return
    try:
        handle = await pool.place_child(make_thumbnails, job.id, job.video_path, job.requested)
    except FlameError as exc:  # no runner could boot, or none was free in time
        await database().fail_job(job.id, f"{type(exc).__name__}: {exc}")
        await ws.send_json({"error": {"type": type(exc).__name__, "message": str(exc)}})
        await ws.close()
        return
    try:
        await relay(ws, handle)  # events, then the result or error; cancels the job if the browser leaves
    except WebSocketDisconnect:  # the browser left while an event was on its way to it
        handle.cancel()
    except Exception as exc:  # the browser has been told; the runner recorded it, unless it died
        log.info("job %s failed: %s: %s", job.id, type(exc).__name__, exc)
        await database().fail_job(job.id, f"{type(exc).__name__}: {exc}")
