"""Jobs run on their own: started when the upload is saved, followed by any number of pages.

``Jobs.start`` places ``make_thumbnails`` on a runner from a background task of the web
process, so a job uploaded with curl starts at once and a page that reloads (or closes)
changes nothing. Every message a job produced is kept while it runs: a WebSocket that
attaches late gets them all first (``attach``), then the live ones; ``cancel`` stops it
on its runner. A job this process is not running (finished, or run by another server
worker) is replayed from the database instead, and followed there until it ends.

Messages: ``{"event": e}`` (the runner's progress: ``stage``, ``started``, ``thumbnail``),
then one of ``{"result": r}``, ``{"error": {"type", "message"}}`` or ``{"cancelled": true}``.
An error's message never holds a server path, an address or a tool's output: the full
detail goes to the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi.encoders import jsonable_encoder

from example_app.db import Job, database, thumbnail_json
from example_app.thumbs import JobFailed, make_thumbnails
from flame_asgi import BootError, CallTimeout, ChildHandle, FlamePool, RunnerLost

log = logging.getLogger("example_app.jobs")
FINAL = ("result", "error", "cancelled")
POLL = 0.5  # how often a job run elsewhere is read back from the database


def public_error(exc: BaseException) -> str:
    """What the browser is told about a failed job."""
    if isinstance(exc, JobFailed):
        return str(exc)
    if isinstance(exc, BootError):
        return "no runner could be started for this job; the server log says why"
    if isinstance(exc, CallTimeout):
        return "every runner stayed busy for too long; try again in a moment"
    if isinstance(exc, RunnerLost):
        return "the runner doing this job stopped unexpectedly (it crashed or was killed)"
    return f"the job failed ({type(exc).__name__}); the server log has the details"


class LiveJob:
    """One job this process runs: its messages so far, and the queues of the pages following it."""

    def __init__(self, job_id: str) -> None:
        self.id = job_id
        self.messages: list[dict[str, Any]] = []
        self.followers: set[asyncio.Queue[dict[str, Any]]] = set()
        self.handle: ChildHandle | None = None
        self.task: asyncio.Task[None] | None = None

    def publish(self, message: dict[str, Any]) -> None:
        self.messages.append(message)
        for queue in self.followers:
            queue.put_nowait(message)

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()  # stops it on its runner, which records "cancelled"
        elif self.task is not None:
            self.task.cancel()  # still waiting for a runner

    @contextlib.contextmanager
    def follow(self) -> Iterator[tuple[list[dict[str, Any]], asyncio.Queue[dict[str, Any]]]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.followers.add(queue)
        try:
            yield list(self.messages), queue
        finally:
            self.followers.discard(queue)


class Jobs:
    """The jobs this web process runs (``app.state.jobs``); ``aclose`` cancels them."""

    def __init__(self) -> None:
        self.live: dict[str, LiveJob] = {}

    def start(self, pool: FlamePool, job: Job) -> LiveJob:
        live = self.live[job.id] = LiveJob(job.id)
        live.task = asyncio.get_running_loop().create_task(self._run(pool, live, job.video_path, job.requested))
        return live

    async def _run(self, pool: FlamePool, live: LiveJob, video: str | None, count: int) -> None:
        db = database()
        try:
            if await db.claim_job(live.id) is None:  # someone else started it
                live.publish({"error": {"type": "NotFound", "message": "this job was already started"}})
                return
            live.handle = await pool.place_child(make_thumbnails, live.id, video, count)
            async for event in live.handle:
                live.publish({"event": jsonable_encoder(event)})
            result = await live.handle
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # cancelled here: shutting down, or before placement
                await asyncio.shield(db.settle_job(live.id, "cancelled"))
                live.publish({"cancelled": True})
                raise
            live.publish({"cancelled": True})  # its runner stopped it (Cancel) and recorded so
        except Exception as exc:
            log.warning("job %s failed: %s: %s", live.id, type(exc).__name__, exc)
            message = public_error(exc)
            await db.settle_job(live.id, "failed", message)  # if the runner could not
            live.publish({"error": {"type": type(exc).__name__, "message": message}})
        else:
            live.publish({"result": jsonable_encoder(result)})
        finally:
            self.live.pop(live.id, None)
            if video is not None:
                with contextlib.suppress(OSError):
                    os.unlink(video)  # the runner removes it; not if it died or never got it

    def cancel(self, job_id: str) -> None:
        """Cancel a job this process runs (one it does not run is left alone)."""
        live = self.live.get(job_id)
        if live is not None:
            live.cancel()

    async def aclose(self) -> None:
        tasks = [live.task for live in self.live.values() if live.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def messages(self, job_id: str) -> AsyncIterator[dict[str, Any]]:
        """Every message of the job, from the first: kept ones, then live ones, up to the final one."""
        live = self.live.get(job_id)
        if live is None:
            async for message in _from_database(job_id):
                yield message
            return
        with live.follow() as (backlog, queue):
            for message in backlog:
                yield message
                if any(k in message for k in FINAL):
                    return
            while True:
                message = await queue.get()
                yield message
                if any(k in message for k in FINAL):
                    return


async def _from_database(job_id: str) -> AsyncIterator[dict[str, Any]]:
    """A job this process does not run, as the runner recorded it, until it ends."""
    db = database()
    sent = 0
    started = False
    while True:
        job = await db.job(job_id)
        if job is None:
            yield {"error": {"type": "NotFound", "message": "no such job"}}
            return
        if job.duration is not None and not started:
            started = True
            yield {"event": {"started": {"runner": job.runner_id, "duration": job.duration, "total": job.requested}}}
        for thumbnail in job.thumbnails[sent:]:
            yield {"event": {"thumbnail": thumbnail_json(thumbnail), "index": thumbnail.index, "total": job.requested}}
        sent = len(job.thumbnails)
        if job.status == "done":
            seconds = (job.finished_at - job.created_at).total_seconds() if job.finished_at else 0.0
            yield {"result": {"job_id": job.id, "thumbnails": sent, "runner": job.runner_id, "seconds": seconds}}
            return
        if job.status == "failed":
            yield {"error": {"type": "JobFailed", "message": job.error or "the job failed"}}
            return
        if job.status == "cancelled":
            yield {"cancelled": True}
            return
        await asyncio.sleep(POLL)
