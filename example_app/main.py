"""The showcase web app: upload a video, watch its thumbnails arrive from a FLAME runner.

Run it with ``python -m example_app`` (or the Procfile's ``web:`` line) and open
http://127.0.0.1:8000. A job goes:

1. ``POST /api/jobs`` checks that the upload is a video (before anything boots), saves it to
   ``DATA_DIR/uploads``, records the job and starts it (``jobs.Jobs``): a background task
   places ``make_thumbnails`` on a runner of the ``thumbs`` pool (a copy of this app,
   booted on demand), with or without a page watching;
2. the page follows it on ``/ws/jobs/{id}``: every progress event so far, then the live
   ones; a reloaded page attaches again, and Cancel stops the job on its runner;
3. the runner writes each thumbnail to the database itself; ``GET /api/jobs`` lists them.

``/ws/pool`` pushes the pool's runners (booting ones included) to the page as they
change, and ``/pools/`` is flame_asgi's pool view (loopback clients only, unless
``POOL_VIEW_TOKEN`` is set: then ``/pools/?token=...`` from anywhere).

With ``FLAME_PARENT`` set (in a runner) this same app serves only ``/_flame``: the routes
below answer 404 there, while the lifespan still opens the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, File, Form, HTTPException, Response, UploadFile, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.requests import HTTPConnection

from example_app.config import MAX_UPLOAD_BYTES, Settings
from example_app.db import Job, database, job_json, open_database
from example_app.jobs import FINAL, Jobs
from example_app.media import NotAVideo, check_video
from example_app.tracing import tracing
from flame_asgi import Backend, FastAPI, FlamePool, ProcessBackend, flame_pool, parent, subscribe
from flame_asgi.metrics import mount_metrics
from flame_asgi.pool_view import pool_view

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
    app.state.jobs = jobs = Jobs()
    with tracing("thumbs-runner" if parent() else "thumbs-web"):  # off unless configured
        async with open_database(settings.database_url):
            if parent() and (delay := float(os.environ.get("EXAMPLE_BOOT_DELAY") or 0)):
                await asyncio.sleep(delay)  # a runner that boots like a container (seconds), to watch it boot
            try:
                yield
            finally:
                await jobs.aclose()  # running jobs are cancelled on their runners, and recorded so


def pool_view_guard(conn: HTTPConnection) -> None:
    """Who may see the pool view: anyone with ``POOL_VIEW_TOKEN``, else this machine only."""
    token = os.environ.get("POOL_VIEW_TOKEN")
    if token:
        given = conn.query_params.get("token") or conn.headers.get("authorization", "").removeprefix("Bearer ")
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise HTTPException(403, "the pool view needs ?token=<POOL_VIEW_TOKEN>")
    elif conn.client is None or conn.client.host not in ("127.0.0.1", "::1"):
        raise HTTPException(403, "the pool view answers on this machine only; set POOL_VIEW_TOKEN to open it")


app = FastAPI(title="flame_asgi showcase: video thumbnails", lifespan=lifespan)
app.add_flame_pool("thumbs", backend=thumbs_backend(), max=2, max_concurrency=2, idle_shutdown_after=30)
app.mount("/static", StaticFiles(directory=STATIC), name="static")
app.mount("/pools", pool_view(dependencies=[Depends(pool_view_guard)]))
with contextlib.suppress(ImportError):  # GET /metrics for Prometheus: pip install 'flame_asgi[prometheus]'
    mount_metrics(app)
Thumbs = Annotated[FlamePool, Depends(flame_pool("thumbs"))]


@app.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(STATIC / "index.html")


@app.get("/favicon.ico", include_in_schema=False)
async def favicon() -> FileResponse:
    return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml")


@app.post("/api/jobs", status_code=201)
async def create_job(pool: Thumbs, file: Annotated[UploadFile | None, File()] = None,
                     count: Annotated[int, Form(ge=1, le=60)] = 8) -> dict[str, Any]:
    """Start a job for an uploaded video, or for a sample generated on the runner (no file).

    The upload is checked first: what is not a video is refused (422) before a job is
    recorded or a runner boots, and nothing of it stays on disk.
    """
    job_id = uuid.uuid4().hex
    video_path = None
    filename = "generated sample (testsrc2)"
    if file is not None and file.filename:
        filename = file.filename
        settings: Settings = app.state.settings
        video_path = str(settings.uploads / f"{job_id}{Path(file.filename).suffix[:10]}")
        await save_upload(file, video_path)
        try:
            await check_video(video_path, filename[:80])
        except BaseException as exc:
            os.unlink(video_path)  # refused (or the client went away): keep nothing
            if isinstance(exc, NotAVideo):
                raise HTTPException(422, str(exc)) from None
            raise
    job = Job(id=job_id, filename=filename[:255], video_path=video_path, requested=count)
    await database().add_job(job)
    jobs: Jobs = app.state.jobs
    jobs.start(pool, job)  # runs without a page: a reload, or none at all, changes nothing
    return {"id": job_id, "live": f"/ws/jobs/{job_id}"}


async def save_upload(file: UploadFile, path: str) -> None:
    # The runner reads it from DATA_DIR (same machine); flame_asgi.Upload could stream it instead.
    size = 0
    try:
        with open(path, "wb") as out:
            while chunk := await file.read(1024 * 1024):
                size += len(chunk)
                if size > MAX_UPLOAD_BYTES:
                    raise HTTPException(413, f"uploads are limited to {MAX_UPLOAD_BYTES // 2**20} MiB")
                await asyncio.to_thread(out.write, chunk)
    except BaseException:  # too large, or the client went away: keep nothing
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise


@app.get("/api/jobs")
async def list_jobs() -> list[dict[str, Any]]:
    return [job_json(job) for job in await database().recent_jobs()]


@app.get("/api/jobs/{job_id}")
async def get_job(job_id: str) -> dict[str, Any]:
    job = await database().job(job_id)
    if job is None:
        raise HTTPException(404, "no such job")
    return job_json(job)


@app.get("/api/thumbnails/{thumb_id}.jpg")
async def thumbnail(thumb_id: int) -> Response:
    image = await database().thumbnail_image(thumb_id)
    if image is None:
        raise HTTPException(404, "no such thumbnail")
    return Response(image, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=31536000"})


def stats_json(pool: FlamePool) -> dict[str, Any]:
    s = pool.stats()
    return {"runners": [{"id": r.id, "url": r.url, "active": r.active} for r in s.runners],
            "booting": s.booting, "waiting": s.waiting}


@app.get("/api/stats")
async def stats(pool: Thumbs) -> dict[str, Any]:
    return stats_json(pool)


@app.websocket("/ws/jobs/{job_id}")
async def job_live(ws: WebSocket, job_id: str) -> None:
    """Follow a job: its messages so far, then live ones (see ``jobs``); "cancel" stops it.

    Leaving the page leaves the job running.
    """
    await ws.accept()
    jobs: Jobs = app.state.jobs
    commands = asyncio.ensure_future(_page_gone(ws, on_cancel=lambda: jobs.cancel(job_id)))
    try:
        async for message in _until(jobs.messages(job_id), commands):
            await ws.send_json(message)
            if any(k in message for k in FINAL):
                await ws.close(1000)
                break
    except WebSocketDisconnect:
        pass  # the page left; the job goes on
    finally:
        commands.cancel()


async def _page_gone(ws: WebSocket, on_cancel: Callable[[], object] | None = None) -> None:
    """Read the page's messages until it leaves; "cancel" calls ``on_cancel``."""
    while True:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            return
        if on_cancel is not None and (message.get("text") or "").strip().strip('"').lower() == "cancel":
            on_cancel()


async def _until(messages: AsyncIterator[dict[str, Any]], gone: asyncio.Future[Any]) -> AsyncIterator[dict[str, Any]]:
    """``messages`` until ``gone`` completes (the page left)."""
    iterator = aiter(messages)
    while True:
        step: asyncio.Future[Any] = asyncio.ensure_future(anext(iterator))
        await asyncio.wait({step, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not step.done():
            step.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await step
            return
        try:
            yield step.result()
        except StopAsyncIteration:
            return


@app.websocket("/ws/pool")
async def pool_live(ws: WebSocket, pool: Thumbs) -> None:
    """The pool's runners, booting ones included, pushed whenever they change."""
    await ws.accept()
    changed = asyncio.Event()
    unsubscribe = subscribe(lambda name, fields: changed.set() if fields.get("pool") == pool.name else None)
    gone = asyncio.ensure_future(_page_gone(ws))
    sent = None
    try:
        while not gone.done():
            changed.clear()
            now = stats_json(pool)
            if now != sent:
                await ws.send_json(now)
                sent = now
            woken = asyncio.ensure_future(changed.wait())
            await asyncio.wait({woken, gone}, timeout=2.0, return_when=asyncio.FIRST_COMPLETED)
            woken.cancel()
    except WebSocketDisconnect:
        pass
    finally:
        unsubscribe()
        gone.cancel()
