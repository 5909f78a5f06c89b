"""The showcase in a real browser: Debian's chromium driven by playwright.

Chromium and playwright come from .ci/media.sh, which the ``media`` fixture (tests/conftest.py)
runs when they are missing (``playwright install`` cannot download browsers here, so the
tests launch /usr/bin/chromium).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CHROMIUM
from tests.example_server import ExampleServer, make_video, serve_example

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
    assert page.locator("#no-jobs").is_visible()

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
