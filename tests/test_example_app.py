"""The showcase end to end: a real uvicorn parent, ffmpeg on ProcessBackend runners, the database.

Each test serves example_app with ``python -m uvicorn`` (tests/example_server.py), talks to
it over HTTP and WebSocket as a browser would, and reads the database the runner wrote.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
import websockets.sync.client

from tests.example_server import ExampleServer, make_video, serve_example, uploads
from tests.postgres import postgres_server

# ffmpeg (and PostgreSQL) come from .ci/media.sh, which the media fixture (tests/conftest.py) runs when
# they are missing; that may take minutes on a fresh machine, so the timeout covers the tests only.
pytestmark = [pytest.mark.usefixtures("media"), pytest.mark.timeout(func_only=True)]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ExampleServer]:
    with serve_example(tmp_path / "data") as served:
        yield served


FINAL = ("result", "error", "cancelled")


async def follow(server: ExampleServer, live: str, *, stop_after: int | None = None) -> list[dict[str, Any]]:
    """The messages of a job's WebSocket, up to its final one (or ``stop_after`` messages)."""
    messages: list[dict[str, Any]] = []
    async with asyncio.timeout(60), websockets.connect(server.url.replace("http", "ws", 1) + live) as ws:
        async for raw in ws:
            messages.append(json.loads(raw))
            if any(k in messages[-1] for k in FINAL) or len(messages) == stop_after:
                break
    return messages


async def until_status(server: ExampleServer, job_id: str, status: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while server.sqlite("SELECT status FROM jobs WHERE id = ?", job_id) != [(status,)]:
        assert time.monotonic() < deadline, f"job {job_id} is not {status}: {server.sqlite('SELECT * FROM jobs')}"
        await asyncio.sleep(0.05)


async def test_an_uploaded_video_becomes_thumbnails_the_runner_writes_to_sqlite(
        server: ExampleServer, tmp_path: Path) -> None:
    video = make_video(tmp_path / "clip.mp4", seconds=5)
    async with httpx.AsyncClient(base_url=server.url) as http:
        created = await http.post("/api/jobs", data={"count": "5"},
                                  files={"file": ("clip.mp4", video.read_bytes(), "video/mp4")})
        assert created.status_code == 201
        job = created.json()
        messages = await follow(server, job["live"])
        assert len(messages) == 7, messages

        # Live: a start event, then one event per thumbnail, in order, then the result.
        events = [m["event"] for m in messages[:-1]]
        assert events[0]["started"]["total"] == 5 and events[0]["started"]["duration"] == pytest.approx(5.0)
        thumbnails = [e["thumbnail"] for e in events[1:]]
        assert [e["index"] for e in events[1:]] == [0, 1, 2, 3, 4]
        result = messages[-1]["result"]
        assert result["thumbnails"] == 5 and result["runner"].startswith("thumbs-")
        assert result["pid"] != server.pid  # made in another process: a runner

        # The runner wrote the rows itself, into the app's SQLite file.
        rows = server.sqlite('SELECT "index", timestamp, width, height, size, length(image), hex(substr(image, 1, 2)) '
                             'FROM thumbnails WHERE job_id = ? ORDER BY "index"', job["id"])
        assert [r[0] for r in rows] == [0, 1, 2, 3, 4]
        assert [r[1] for r in rows] == pytest.approx([0.5, 1.5, 2.5, 3.5, 4.5])
        assert all((w, h) == (320, 240) and size == length > 1000 and magic == "FFD8"
                   for _, _, w, h, size, length, magic in rows)
        assert server.sqlite("SELECT status, runner_id, duration, error FROM jobs WHERE id = ?", job["id"]) == [
            ("done", result["runner"], 5.0, None)]
        assert not list((server.data_dir / "uploads").iterdir())  # the runner removed the upload

        # The web process lists them from the database and serves the images.
        listed = {j["id"]: j for j in (await http.get("/api/jobs")).json()}[job["id"]]
        assert listed["status"] == "done" and listed["thumbnails"] == thumbnails
        image = await http.get(thumbnails[2]["url"])
        assert image.headers["content-type"] == "image/jpeg" and len(image.content) == rows[2][4]

        # The runner is the same app in runner mode: only /_flame answers there.
        (runner,) = (await http.get("/api/stats")).json()["runners"]
        assert runner["id"] == result["runner"]
        assert (await http.get(runner["url"] + "/api/jobs")).status_code == 404
        assert (await http.get(runner["url"] + "/")).status_code == 404
        assert (await http.get(runner["url"] + "/_flame/health")).json()["runner_id"] == runner["id"]

        # A page that attaches later gets the same story, read back from the database.
        again = await follow(server, job["live"])
        assert again[:-1] == messages[:-1]
        assert again[-1]["result"]["thumbnails"] == 5 and again[-1]["result"]["runner"] == result["runner"]
        assert server.sqlite("SELECT count(*) FROM jobs") == [(1,)]  # attaching starts nothing


@pytest.mark.parametrize("content", [b"just some text, renamed\n", b""], ids=["text-renamed-mp4", "empty"])
async def test_an_upload_that_is_not_a_video_is_refused_before_anything_boots(
        server: ExampleServer, content: bytes) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        refused = await http.post("/api/jobs", data={"count": "3"},
                                  files={"file": ("holiday.mp4", content, "video/mp4")})
        assert refused.status_code == 422
        detail = refused.json()["detail"]
        assert detail.startswith("'holiday.mp4' is ") and ("not a video" if content else "empty") in detail
        assert "/" not in detail.replace("'holiday.mp4'", "")  # no server path
        stats = (await http.get("/api/stats")).json()
    assert (stats["runners"], stats["booting"]) == ([], 0)
    assert server.sqlite("SELECT count(*) FROM jobs") == [(0,)]
    assert uploads(server) == []
    if content:  # what ffprobe said is in the log, not in the answer
        assert "upload 'holiday.mp4' refused: ffprobe" in server.log.read_text()


async def test_a_job_uploaded_with_curl_runs_without_a_page(server: ExampleServer, tmp_path: Path) -> None:
    video = make_video(tmp_path / "clip.mp4", seconds=3)
    done = subprocess.run(["curl", "-sS", "-F", f"file=@{video}", "-F", "count=2", f"{server.url}/api/jobs"],
                          capture_output=True, text=True, timeout=30, check=True)
    job = json.loads(done.stdout)
    await until_status(server, job["id"], "done")  # nobody opened its WebSocket
    assert server.sqlite("SELECT count(*) FROM thumbnails WHERE job_id = ?", job["id"]) == [(2,)]
    assert uploads(server) == []


async def test_a_failure_reaches_the_page_without_paths_addresses_or_tool_output(
        server: ExampleServer, tmp_path: Path) -> None:
    # ffprobe reads the index at its front, so it is accepted; the frames past the cut are gone.
    video = make_video(tmp_path / "cut.mp4", seconds=5, cut=0.3)
    async with httpx.AsyncClient(base_url=server.url) as http:
        created = await http.post("/api/jobs", data={"count": "3"},
                                  files={"file": ("cut.mp4", video.read_bytes(), "video/mp4")})
        assert created.status_code == 201
        job = created.json()
        messages = await follow(server, job["live"])
        listed = {j["id"]: j for j in (await http.get("/api/jobs")).json()}[job["id"]]
    error = messages[-1]["error"]
    assert error["message"].startswith("ffmpeg could not read a frame at ")
    assert listed["status"] == "failed" and listed["error"] == error["message"]
    for shown in (error["message"], listed["error"]):
        assert not re.search(r"/\w|0x[0-9a-f]{4}|NAL|Traceback", shown), shown
    # The full story is in the server's log: the upload's path and what ffmpeg said.
    log = server.log.read_text()
    assert f"job {job['id']} failed on runner thumbs-" in log
    assert str(server.data_dir / "uploads" / job["id"]) in log and "ffmpeg" in log
    assert uploads(server) == []


async def test_a_sample_is_generated_on_the_runner(server: ExampleServer) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        job = (await http.post("/api/jobs", data={"count": "3"})).json()
    messages = await follow(server, job["live"])
    assert messages[0]["event"]["stage"] == "generating a sample video"
    assert messages[1]["event"]["started"]["duration"] == pytest.approx(10.0)
    assert messages[-1]["result"]["thumbnails"] == 3
    assert server.sqlite("SELECT count(*), min(width), min(height) FROM thumbnails WHERE job_id = ?",
                         job["id"]) == [(3, 320, 180)]
    assert server.sqlite("SELECT filename, status FROM jobs") == [("generated sample (testsrc2)", "done")]


async def test_leaving_the_page_leaves_the_job_running_and_a_new_page_catches_up(server: ExampleServer) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        job = (await http.post("/api/jobs", data={"count": "12"})).json()
    first = await follow(server, job["live"], stop_after=3)  # the stage, the start, one thumbnail: then leave
    assert "thumbnail" in first[-1]["event"]
    again = await follow(server, job["live"])  # the reloaded page: everything so far, then live
    assert again[:3] == first
    assert [m["event"]["index"] for m in again[2:-1]] == list(range(12))
    assert again[-1]["result"]["thumbnails"] == 12
    assert server.sqlite("SELECT status FROM jobs WHERE id = ?", job["id"]) == [("done",)]


async def test_cancel_stops_the_job_on_its_runner(server: ExampleServer) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        job = (await http.post("/api/jobs", data={"count": "60"})).json()
        url = server.url.replace("http", "ws", 1) + job["live"]
        async with asyncio.timeout(60), websockets.connect(url) as ws:
            while "thumbnail" not in json.loads(await ws.recv()).get("event", {}):
                pass
            await ws.send("cancel")  # what the page's Cancel button sends
            rest = [json.loads(m) async for m in ws]  # the server closes the socket
        assert rest[-1] == {"cancelled": True} and all("event" in m for m in rest[:-1])
        assert ws.close_code == 1000
        await until_status(server, job["id"], "cancelled")
        (made,) = server.sqlite("SELECT count(*) FROM thumbnails WHERE job_id = ?", job["id"])[0]
        assert 1 <= made < 60
        # Its slot is free again: the runner has stopped the child.
        deadline = time.monotonic() + 20
        while (await http.get("/api/stats")).json()["runners"][0]["active"]:
            assert time.monotonic() < deadline, "the cancelled child still holds its slot"
            await asyncio.sleep(0.05)


async def test_with_database_url_the_runner_writes_to_postgresql(tmp_path: Path, postgres_url: str) -> None:
    import asyncpg  # the dev and example extras install it

    with serve_example(tmp_path / "data", DATABASE_URL=postgres_url) as server:
        async with httpx.AsyncClient(base_url=server.url) as http:
            job = (await http.post("/api/jobs", data={"count": "2"})).json()
            messages = await follow(server, job["live"])
            assert messages[-1]["result"]["thumbnails"] == 2
            listed = (await http.get("/api/jobs")).json()
        assert [len(j["thumbnails"]) for j in listed] == [2]
    assert not (tmp_path / "data" / "thumbnails.db").exists()  # nothing went to SQLite
    conn = await asyncpg.connect(postgres_url)
    try:
        rows = await conn.fetch('SELECT j.status, j.runner_id, t."index", t.size FROM jobs j '
                                'JOIN thumbnails t ON t.job_id = j.id ORDER BY t."index"')
    finally:
        await conn.close()
    assert [(r["status"], r["index"]) for r in rows] == [("done", 0), ("done", 1)]
    assert rows[0]["runner_id"] == messages[-1]["result"]["runner"]


@pytest.fixture
def postgres_url(media: None) -> Iterator[str]:
    with postgres_server() as url:
        yield url


async def test_the_metrics_page_counts_the_job(server: ExampleServer) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        job = (await http.post("/api/jobs", data={"count": "2"})).json()
        await follow(server, job["live"])
        page = (await http.get("/metrics")).text
    # Every series names the web process whose pool it describes (pid: one per server worker).
    assert re.search(r'flame_pool_max_runners\{pid="\d+",pool="thumbs"\} 2.0', page)
    assert re.search(r'flame_pool_runners\{pid="\d+",pool="thumbs"\} 1.0', page)
    assert re.search(r'flame_calls_total\{kind="child",outcome="ok",pid="\d+",pool="thumbs"\} 1.0', page)


def test_a_thumbnail_job_is_one_trace_across_web_process_and_runner(tmp_path: Path) -> None:
    spans_file = tmp_path / "spans.jsonl"
    video = make_video(tmp_path / "clip.mp4", seconds=3)
    with serve_example(tmp_path / "data", FLAME_EXAMPLE_TRACES=str(spans_file)) as server:
        with video.open("rb") as f:
            job = httpx.post(f"{server.url}/api/jobs", files={"file": ("clip.mp4", f, "video/mp4")},
                             data={"count": "2"}, timeout=30).json()
        asyncio.run(follow(server, job["live"]))
    # The server has stopped: every process flushed its spans into the file.
    spans = [json.loads(line) for line in spans_file.read_text().splitlines()]
    by_name: dict[str, list[dict[str, Any]]] = {}
    for s in spans:
        by_name.setdefault(s["name"], []).append(s)
    (call,) = by_name["flame.child make_thumbnails"]
    (run,) = by_name["flame.run make_thumbnails"]
    assert call["resource"]["attributes"]["service.name"] == "thumbs-web"
    assert run["resource"]["attributes"]["service.name"] == "thumbs-runner"
    assert run["context"]["trace_id"] == call["context"]["trace_id"]
    assert run["parent_id"] == call["context"]["span_id"]  # the runner's span is the call's child
    frames = by_name["ffmpeg frame"]
    assert len(frames) == 2 and all(f["parent_id"] == run["context"]["span_id"] for f in frames)


def test_the_pool_view_is_for_this_machine_unless_a_token_is_set(server: ExampleServer, tmp_path: Path) -> None:
    assert httpx.get(server.url + "/pools/", timeout=10).status_code == 200  # from 127.0.0.1, no token set
    with serve_example(tmp_path / "with-token", POOL_VIEW_TOKEN="t0ken") as guarded:
        refused = httpx.get(guarded.url + "/pools/", timeout=10)
        assert refused.status_code == 403 and "POOL_VIEW_TOKEN" in refused.json()["detail"]
        assert httpx.get(guarded.url + "/pools/", params={"token": "t0ken"}, timeout=10).status_code == 200
        with websockets.sync.client.connect(guarded.url.replace("http", "ws", 1) + "/pools/ws?token=t0ken") as ws:
            (pool,) = json.loads(ws.recv(timeout=10))["pools"]
        assert pool["name"] == "thumbs" and pool["max"] == 2
