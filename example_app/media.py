"""Is an upload a video? Checked in the web process, before a job is recorded or a runner boots.

``ffprobe`` (installed with ffmpeg) reads the saved file and must find a video stream with a
duration; where the web process has no ffprobe, the file's first bytes must be those of a
known video container. An empty file is refused without looking further.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil

log = logging.getLogger("example_app.media")

# The first bytes of video containers ffmpeg reads (offset, signature).
SIGNATURES = (
    (4, b"ftyp"),  # MP4, MOV, 3GP, M4V
    (0, b"\x1a\x45\xdf\xa3"),  # Matroska, WebM
    (0, b"RIFF"),  # AVI
    (0, b"OggS"),  # Ogg (Theora)
    (0, b"FLV"),
    (0, b"\x00\x00\x01\xba"),  # MPEG program stream
    (0, b"\x30\x26\xb2\x75"),  # ASF, WMV
    (0, b"\x47"),  # MPEG transport stream (a sync byte every 188 bytes)
)


class NotAVideo(ValueError):
    """What the browser is told; the reason behind it goes to the log."""


async def check_video(path: str, filename: str) -> float:
    """The video's duration in seconds, or ``NotAVideo`` saying what is wrong with it."""
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        raise NotAVideo(f"{filename!r} is empty: choose a video file")
    if shutil.which("ffprobe") is None:
        if not any(head[offset:offset + len(magic)] == magic for offset, magic in SIGNATURES):
            raise NotAVideo(f"{filename!r} is not a video file we can read (MP4, MOV, WebM, MKV, AVI...)")
        return 0.0
    proc = await asyncio.create_subprocess_exec(
        "ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries",
        "stream=codec_type:format=duration", "-of", "json", path,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    try:
        data = json.loads(out or b"{}")
        duration = float(data.get("format", {}).get("duration") or 0)
    except ValueError:
        data, duration = {}, 0.0
    if proc.returncode != 0 or not data.get("streams") or duration <= 0:
        # The tool's own words stay in the log: they name server paths.
        log.warning("upload %r refused: ffprobe exit %s: %s", filename, proc.returncode,
                 err.decode(errors="replace").strip()[-500:] or "no video stream or no duration")
        raise NotAVideo(f"{filename!r} is not a video ffmpeg can read: choose an MP4, MOV, WebM or MKV file")
    return duration
