"""The showcase in a real browser: Debian's chromium driven by playwright.

Chromium and playwright come from .ci/media.sh, which the ``media`` fixture (tests/conftest.py)
runs when they are missing (``playwright install`` cannot download browsers here, so the
tests launch /usr/bin/chromium).
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import CHROMIUM
from tests.example_server import ExampleServer, make_video, runner_pid, serve_example, uploads
from tests.pool_view_apps import TOKEN
from tests.servers import serve

POOL_VIEW_APPS = ["tests.pool_view_apps:fastapi_app", "tests.pool_view_apps:starlette_app"]

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]

# The first test's setup may install the tools (minutes on a fresh machine): time the tests only.
pytestmark = [pytest.mark.browser, pytest.mark.usefixtures("media"), pytest.mark.timeout(func_only=True)]


@pytest.fixture
def browser() -> Iterator[Any]:
    from playwright import sync_api  # the media fixture installs it if it is missing

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ExampleServer]:
    with serve_example(tmp_path / "data") as served:
        yield served


def test_thumbnails_appear_live_then_are_listed_from_the_database(
        browser: Any, server: ExampleServer, tmp_path: Path) -> None:
    video = make_video(tmp_path / "clip.mp4", seconds=5)
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    page_errors: list[str] = []
    page.on("pageerror", lambda error: page_errors.append(str(error)))
    page.goto(server.url)
    # The page shows "No jobs yet." once its fetch of /api/jobs answers, which may be after "load".
    page.locator("#no-jobs").wait_for(timeout=15_000)

    page.set_input_files("#file", str(video))
    page.fill("#count", "5")
    page.click("#upload")

    # They arrive one by one: the first, then the rest, each a separate live message.
    grid = page.locator("#grid figure")
    grid.first.wait_for(timeout=30_000)
    first_seen = grid.count()
    page.wait_for_function("document.querySelectorAll('#grid figure').length === 5", timeout=30_000)
    figures = grid.evaluate_all("fs => fs.map(f => [Number(f.dataset.index), Number(f.dataset.arrived)])")
    assert [index for index, _ in figures] == [0, 1, 2, 3, 4]
    arrivals = [arrived for _, arrived in figures]
    assert arrivals == sorted(arrivals) and len(set(arrivals)) == 5, arrivals
    assert arrivals[-1] - arrivals[0] > 20, f"all thumbnails arrived at once: {arrivals} (first seen: {first_seen})"
    page.locator("#status[data-state=done]").wait_for(timeout=30_000)
    assert "Done: 5 thumbnails" in page.locator("#status").inner_text()
    page.wait_for_function("[...document.querySelectorAll('#grid img')].every(i => i.complete && i.naturalWidth)")
    page.screenshot(path=str(tmp_path / "live.png"), full_page=True, animations="disabled")

    # After a reload the job comes back from the database, images and all.
    page.reload()
    job = page.locator("#jobs li.job")
    job.first.wait_for()
    assert job.count() == 1
    assert job.first.get_attribute("data-status") == "done"
    assert "clip.mp4" in job.first.inner_text() and "5/5 thumbnails on thumbs-" in job.first.inner_text()
    page.wait_for_function(
        "[...document.querySelectorAll('#jobs img')].filter(i => i.complete && i.naturalWidth === 320).length === 5")
    assert page.locator("#live").is_hidden()
    page.screenshot(path=str(tmp_path / "after-reload.png"), full_page=True, animations="disabled")
    print(f"screenshots: {tmp_path / 'live.png'} {tmp_path / 'after-reload.png'}")
    assert page_errors == []


def open_page(browser: Any, server: ExampleServer, width: int = 1100) -> tuple[Any, list[str]]:
    """The showcase in a new page; the list collects its script errors and failed requests."""
    page = browser.new_page(viewport={"width": width, "height": 900})
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.on("response", lambda r: problems.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    page.goto(server.url)
    page.locator("#pool[data-state=live]").wait_for(timeout=15_000)
    return page, problems


def test_a_file_that_is_not_a_video_is_refused_and_nothing_boots(
        browser: Any, server: ExampleServer, tmp_path: Path) -> None:
    notes = tmp_path / "notes.mp4"
    notes.write_text("a shopping list, renamed\n")
    page, problems = open_page(browser, server)
    page.set_input_files("#file", str(notes))
    page.click("#upload")
    status = page.locator("#status[data-state=error]")
    status.wait_for(timeout=15_000)
    assert status.inner_text() == ("Upload refused: 'notes.mp4' is not a video ffmpeg can read: "
                                   "choose an MP4, MOV, WebM or MKV file")
    assert page.locator("#progress").is_hidden()
    assert page.locator("#pool").inner_text() == "none (scaled to zero)"
    assert not page.locator("#upload").is_disabled()  # ready for the next try
    assert page.locator("#jobs li").count() == 0 and uploads(server) == []
    assert problems == [f"422 {server.url}/api/jobs"]


def test_after_a_runner_dies_the_progress_bar_stops_and_says_so(browser: Any, server: ExampleServer) -> None:
    page, problems = open_page(browser, server)
    page.fill("#count", "60")
    page.click("#sample")
    page.wait_for_function("document.querySelectorAll('#grid figure').length >= 2", timeout=30_000)
    os.kill(runner_pid(server), signal.SIGKILL)

    page.locator("#status[data-state=error]").wait_for(timeout=30_000)
    status = page.locator("#status").inner_text()
    assert status == "Failed: the runner doing this job stopped unexpectedly (it crashed or was killed)"
    made = page.locator("#grid figure").count()
    bar = page.locator("#progress")
    assert bar.get_attribute("data-state") == "error" and bar.evaluate("b => [b.value, b.max]") == [made, 60]
    assert bar.evaluate("b => b.matches(':indeterminate')") is False  # it no longer moves
    assert page.locator("#progress-note").inner_text() == f"Stopped at {made} of 60 thumbnails."
    assert page.locator("#cancel").is_hidden() and not page.locator("#sample").is_disabled()
    job = page.locator("#jobs li.job[data-status=failed]")
    job.wait_for(timeout=10_000)
    shown = job.locator("p.error").inner_text()
    assert shown == "the runner doing this job stopped unexpectedly (it crashed or was killed)"
    assert "runner thumbs-" in server.log.read_text()  # the detail went to the log
    assert problems == []


def test_a_reloaded_page_attaches_to_its_job_and_cancel_still_cancels(browser: Any, server: ExampleServer) -> None:
    page, problems = open_page(browser, server)
    page.fill("#count", "60")
    page.click("#sample")
    page.wait_for_function("document.querySelectorAll('#grid figure').length >= 2", timeout=30_000)
    job_id = page.locator("#live").get_attribute("data-job")
    assert page.evaluate("location.hash") == f"#job={job_id}"

    page.reload()
    page.locator("#live").wait_for(timeout=10_000)
    page.wait_for_function("document.querySelectorAll('#grid figure').length >= 3", timeout=30_000)
    assert page.locator("#live").get_attribute("data-job") == job_id
    indexes = page.locator("#grid figure").evaluate_all("fs => fs.map(f => Number(f.dataset.index))")
    assert indexes == list(range(len(indexes)))  # replayed from the first, then live
    assert page.locator("#progress").evaluate("b => b.max") == 60

    page.click("#cancel")
    page.locator("#status[data-state=cancelled]").wait_for(timeout=30_000)
    assert page.locator("#status").inner_text() == "Cancelled: the runner stopped the job."
    assert page.locator("#progress").get_attribute("data-state") == "cancelled"
    deadline = time.monotonic() + 20
    while server.sqlite("SELECT status FROM jobs WHERE id = ?", job_id) != [("cancelled",)]:
        assert time.monotonic() < deadline, "the job was not cancelled"
        time.sleep(0.05)
    page.reload()  # the job is over: the page starts fresh, the job is listed
    page.locator(f"#jobs li.job[data-job='{job_id}'][data-status=cancelled]").wait_for(timeout=10_000)
    assert page.locator("#live").is_hidden()
    assert problems == []


def test_the_runner_panel_shows_a_booting_runner_live(browser: Any, tmp_path: Path) -> None:
    # Runners that take two seconds to come up, as containers do: long enough to be seen booting.
    with serve_example(tmp_path / "data", EXAMPLE_BOOT_DELAY="2") as server:
        page, problems = open_page(browser, server)
        panel = page.locator("#pool")
        assert panel.inner_text() == "none (scaled to zero)"
        page.fill("#count", "3")
        page.click("#sample")
        panel.locator(".runner[data-state=booting]").wait_for(timeout=15_000)
        assert panel.locator(".runner").all_inner_texts() == ["booting…", "1 waiting"]  # the job waits for it
        panel.locator(".runner[data-state=busy]").wait_for(timeout=30_000)
        (busy,) = panel.locator(".runner").all_inner_texts()
        assert re.fullmatch(r"thumbs-1-\w+ · 1 active", busy)
        page.locator("#status[data-state=done]").wait_for(timeout=30_000)
        panel.locator(".runner[data-state=idle]").wait_for(timeout=10_000)
        assert problems == []


def test_the_layout_holds_on_a_phone_and_with_a_long_strip(
        browser: Any, server: ExampleServer, tmp_path: Path) -> None:
    video = make_video(tmp_path / "a-long-holiday-video-name-straight-from-the-phone-2026-07-14.mp4", seconds=4)
    page, problems = open_page(browser, server)
    page.set_input_files("#file", str(video))
    page.fill("#count", "20")  # a strip of 20 thumbnails (140 px each): far wider than the page
    page.click("#upload")
    page.locator("#status[data-state=done]").wait_for(timeout=45_000)
    page.locator("#jobs li.job .strip figure >> nth=19").wait_for(timeout=10_000)
    for width in (1100, 375):
        page.set_viewport_size({"width": width, "height": 800})
        assert page.evaluate("document.documentElement.scrollWidth") <= width
        strip = page.locator("#jobs li.job .strip").first
        assert strip.evaluate("s => s.scrollWidth > s.clientWidth")  # it scrolls inside its card
        for selector in (".job-head", ".job-head .name", ".job-head .muted", "#live h2"):
            box = page.locator(selector).first.bounding_box()
            assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= width, (width, selector, box)
    icon = page.evaluate("fetch(document.querySelector('link[rel=icon]').href)"
                         ".then(r => [r.status, r.headers.get('content-type')])")
    assert icon == [200, "image/svg+xml"]
    assert httpx.get(server.url + "/favicon.ico", timeout=10).status_code == 200
    assert problems == []


def test_the_docs_screenshots_are_taken_from_the_running_app(browser: Any, tmp_path: Path) -> None:
    from tests.screenshots import take  # `python -m tests.screenshots` writes them to docs/img

    for path in take(browser, tmp_path):
        png = path.read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(png[16:20], "big") == 1100, path


@pytest.mark.parametrize("app", POOL_VIEW_APPS, ids=["fastapi", "starlette"])
def test_the_pool_view_shows_a_runner_appear_then_its_crash_with_the_reason(browser: Any, app: str) -> None:
    """flame_asgi.pool_view in a FastAPI and in a Starlette app (tests/pool_view_apps.py)."""
    with serve(app, probe="/ping") as (url, _proc, watched):
        page = browser.new_page(viewport={"width": 1000, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(f"{url}/pools/?token={TOKEN}")
        page.locator("#conn[data-state=live]").wait_for(timeout=15_000)
        pool = page.locator("section.pool[data-pool=work]")
        pool.get_by_text("No runners: scaled to zero.").wait_for(timeout=15_000)

        # Nothing reloads the page: every change below arrives over its WebSocket.
        pid = httpx.get(url + "/pid", timeout=30).json()["pid"]
        watched.add(pid)
        row = pool.locator("tr.runner[data-state=idle]")
        row.wait_for(timeout=15_000)
        runner_id = row.get_attribute("data-runner")
        assert runner_id and runner_id.startswith("work-")
        assert pool.locator(".tile[data-key=runners] b").inner_text() == "1 / 2"
        assert pool.locator("svg.chart path").count() >= 4

        os.kill(pid, signal.SIGKILL)
        failure = pool.locator("li.failure[data-reason=crash]")
        failure.wait_for(timeout=15_000)
        text = failure.inner_text()
        assert "runner lost" in text and runner_id in text and "SIGKILL" in text
        pool.get_by_text("No runners: scaled to zero.").wait_for(timeout=15_000)
        assert errors == []
