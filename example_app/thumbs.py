"""The remote work: ffmpeg thumbnails, made on a runner and written to the database there.

``make_thumbnails`` runs on a runner of the ``thumbs`` pool, a copy of this app whose
lifespan has opened the database. It grabs one frame per timestamp (one short ffmpeg
call each, so thumbnails come out one by one), stores each row itself, and reports it
with ``flame_asgi.report`` so the web process can push it to the browser at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from example_app.db import Thumbnail, database, thumbnail_json
from example_app.tracing import span
from flame_asgi import parent, report

log = logging.getLogger("example_app.thumbs")
THUMB_WIDTH = 320
SAMPLE = "testsrc2=duration=10:size=640x360:rate=25"  # what "use a generated sample" makes


async def make_thumbnails(job_id: str, video: str | None, count: int) -> dict[str, Any]:
    """Make ``count`` thumbnails of ``video`` (``None``: generate a sample here first).

    ``video`` is a path on the runner's filesystem: the web process saved the upload to
    ``DATA_DIR/uploads``, which runners of the same machine (``ProcessBackend``) share.
    The upload is deleted once its thumbnails are made.
    """
    info = parent()
    runner_id = info.runner_id if info else "in-process"
    db = database()
    started = time.monotonic()
    upload = video
    try:
        with tempfile.TemporaryDirectory(prefix="thumbs-") as tmp:
            if video is None:
                await report({"stage": "generating a sample video", "runner": runner_id})
                video = await make_sample(Path(tmp) / "sample.mp4")
            elif not os.path.exists(video):
                log.warning("job %s: %s is not on runner %s", job_id, video, runner_id)
                raise JobFailed("the upload is not on the runner: runners on other machines must mount the "
                                "web process's DATA_DIR (see the tutorial)")
            probe = await probe_video(video)
            await db.start_job(job_id, runner_id, probe.duration)
            await report({"started": {"runner": runner_id, "duration": probe.duration, "total": count}})
            width, height = probe.thumbnail_size(THUMB_WIDTH)
            for index in range(count):
                timestamp = probe.duration * (index + 0.5) / count  # the middle of each slice
                jpeg = await grab_frame(video, timestamp, width, height)
                row = await db.add_thumbnail(Thumbnail(
                    job_id=job_id, index=index, timestamp=timestamp, width=width, height=height,
                    size=len(jpeg), image=jpeg))
                # Awaited: if the web process is slow, the runner waits instead of piling up events.
                await report({"thumbnail": thumbnail_json(row), "index": index, "total": count})
    except asyncio.CancelledError:  # Cancel was pressed, or the web process is shutting down
        # Shielded: a second cancellation (a runner shutting down) must not lose the status.
        await asyncio.shield(db.finish_job(job_id, "cancelled"))
        raise
    except Exception as exc:
        # The full story (paths, ffmpeg's output) goes to the log, which a ProcessBackend
        # runner forwards to the web process; the page gets a sentence without them.
        log.warning("job %s failed on runner %s: %s: %s", job_id, runner_id, type(exc).__name__, exc)
        failure = exc if isinstance(exc, JobFailed) else JobFailed(
            f"the runner could not make the thumbnails ({type(exc).__name__}); the server log has the details")
        await db.finish_job(job_id, "failed", str(failure))
        raise failure from None
    finally:
        if upload is not None:
            with contextlib.suppress(OSError):
                os.unlink(upload)
    await db.finish_job(job_id, "done")
    return {"job_id": job_id, "thumbnails": count, "runner": runner_id, "pid": os.getpid(),
            "seconds": round(time.monotonic() - started, 3)}


class JobFailed(Exception):
    """A job's failure in words fit for the browser: no paths, addresses or tool output."""


@dataclasses.dataclass(frozen=True)
class Probe:
    duration: float
    width: int
    height: int

    def thumbnail_size(self, max_width: int) -> tuple[int, int]:
        width = min(max_width, self.width) // 2 * 2
        return width, max(2, round(self.height * width / self.width / 2) * 2)


async def probe_video(path: str) -> Probe:
    try:
        out = await run("ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries",
                        "stream=width,height,duration:format=duration", "-of", "json", path)
    except ToolFailed as exc:
        log.warning("ffprobe %s: %s", path, exc)
        raise JobFailed("the file is not a video ffmpeg can read") from None
    data = json.loads(out)
    if not data.get("streams"):
        raise JobFailed("the file has no video stream ffmpeg can read")
    stream = data["streams"][0]
    duration = stream.get("duration") or data.get("format", {}).get("duration")
    if not duration or float(duration) <= 0:
        raise JobFailed("ffmpeg could not read the video's duration")
    return Probe(float(duration), int(stream["width"]), int(stream["height"]))


async def grab_frame(path: str, timestamp: float, width: int, height: int) -> bytes:
    """One JPEG frame at ``timestamp`` (seeking before ``-i`` makes this quick)."""
    with span("ffmpeg frame", timestamp=timestamp):
        try:
            jpeg, said = await run_tool("ffmpeg", "-nostdin", "-v", "error", "-ss", f"{timestamp:.3f}", "-i", path,
                                        "-frames:v", "1", "-vf", f"scale={width}:{height}", "-q:v", "4",
                                        "-f", "image2pipe", "-c:v", "mjpeg", "pipe:1")
        except ToolFailed as exc:
            jpeg, said = b"", str(exc)
    if not jpeg:
        log.warning("ffmpeg found no frame at %.3f s of %s: %s", timestamp, path, said[-500:] or "(it said nothing)")
        raise JobFailed(f"ffmpeg could not read a frame at {timestamp:.1f} s: the video may be damaged or cut short")
    return jpeg


async def make_sample(path: Path) -> str:
    await run("ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi", "-i", SAMPLE,
              "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-y", str(path))
    return str(path)


async def run(*cmd: str) -> bytes:
    """Run a command, return its stdout; kill it if the work is cancelled meanwhile."""
    out, _ = await run_tool(*cmd)
    return out


async def run_tool(*cmd: str) -> tuple[bytes, str]:
    """``run``, also returning what the tool wrote on stderr (for the log: never for a page)."""
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    said = err.decode(errors="replace").strip()
    if proc.returncode != 0:
        raise ToolFailed(f"{cmd[0]} failed (exit {proc.returncode}): {said[-500:]}")
    return out, said


class ToolFailed(RuntimeError):
    """ffmpeg or ffprobe exited with an error: its message holds the tool's own output (log it only)."""
