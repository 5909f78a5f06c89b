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
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from example_app.db import Thumbnail, database, thumbnail_json
from example_app.tracing import span
from flame_asgi import parent, report

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
                raise FileNotFoundError(
                    f"{video} is not on this runner: uploads are shared through DATA_DIR, which "
                    "runners on other machines must mount (see docs/tutorial.md)")
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
                # Awaited: if the browser is slow, the runner waits instead of piling up events.
                await report({"thumbnail": thumbnail_json(row), "index": index, "total": count})
    except asyncio.CancelledError:  # the browser left or pressed Cancel
        # Shielded: a second cancellation (a runner shutting down) must not lose the status.
        await asyncio.shield(db.finish_job(job_id, "cancelled"))
        raise
    except Exception as exc:
        await db.finish_job(job_id, "failed", f"{type(exc).__name__}: {exc}")
        raise
    finally:
        if upload is not None:
            with contextlib.suppress(OSError):
                os.unlink(upload)
    await db.finish_job(job_id, "done")
    return {"job_id": job_id, "thumbnails": count, "runner": runner_id, "pid": os.getpid(),
            "seconds": round(time.monotonic() - started, 3)}


@dataclasses.dataclass(frozen=True)
class Probe:
    duration: float
    width: int
    height: int

    def thumbnail_size(self, max_width: int) -> tuple[int, int]:
        width = min(max_width, self.width) // 2 * 2
        return width, max(2, round(self.height * width / self.width / 2) * 2)


async def probe_video(path: str) -> Probe:
    out = await run("ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries",
                    "stream=width,height,duration:format=duration", "-of", "json", path)
    data = json.loads(out)
    if not data.get("streams"):
        raise ValueError("no video stream found: is this a video file?")
    stream = data["streams"][0]
    duration = stream.get("duration") or data.get("format", {}).get("duration")
    if not duration or float(duration) <= 0:
        raise ValueError("ffprobe could not read the video's duration")
    return Probe(float(duration), int(stream["width"]), int(stream["height"]))


async def grab_frame(path: str, timestamp: float, width: int, height: int) -> bytes:
    """One JPEG frame at ``timestamp`` (seeking before ``-i`` makes this quick)."""
    with span("ffmpeg frame", timestamp=timestamp):
        jpeg = await run("ffmpeg", "-nostdin", "-v", "error", "-ss", f"{timestamp:.3f}", "-i", path,
                         "-frames:v", "1", "-vf", f"scale={width}:{height}", "-q:v", "4",
                         "-f", "image2pipe", "-c:v", "mjpeg", "pipe:1")
    if not jpeg:
        raise RuntimeError(f"ffmpeg found no frame at {timestamp:.3f} s")
    return jpeg


async def make_sample(path: Path) -> str:
    await run("ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi", "-i", SAMPLE,
              "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-y", str(path))
    return str(path)


async def run(*cmd: str) -> bytes:
    """Run a command, return its stdout; kill it if the work is cancelled meanwhile."""
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed (exit {proc.returncode}): {err.decode(errors='replace').strip()[-500:]}")
    return out
