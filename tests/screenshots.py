"""The docs' screenshots of the showcase and of its pool view, taken from the real thing.

    python -m tests.screenshots            # writes docs/img/showcase.png and docs/img/pool-view.png

It serves example_app with uvicorn (ProcessBackend runners, runners booting in one second
as containers would), runs a job on an uploaded video, kills the runner so the pool view
has a loss to show, starts a second job and photographs both pages while it runs.
``tests/test_browser.py`` runs it into a temporary folder, so it keeps working.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from tests.conftest import CHROMIUM, REPO
from tests.example_server import make_video, runner_pid, serve_example

OUT = REPO / "docs" / "img"
NAMES = ("showcase.png", "pool-view.png")


def take(browser: Any, out: Path) -> list[Path]:
    """Photograph the showcase and its pool view into ``out``; return the files written."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="flame-shots-") as tmp, \
            serve_example(Path(tmp) / "data", EXAMPLE_BOOT_DELAY="1") as server:
        video = make_video(Path(tmp) / "beach-holiday.mp4", seconds=8, size="640x360")
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(server.url)
        page.set_input_files("#file", str(video))
        page.fill("#count", "6")
        page.click("#upload")
        page.locator("#status[data-state=done]").wait_for(timeout=45_000)
        page.wait_for_function("[...document.querySelectorAll('img')].every(i => i.complete && i.naturalWidth)")

        os.kill(runner_pid(server), signal.SIGKILL)  # a loss, with its reason, for the pool view
        page.locator("#pool .runner[data-state=none]").wait_for(timeout=15_000)

        page.fill("#count", "30")
        page.click("#sample")  # boots a new runner: the chart shows the gap and the boot
        page.wait_for_function("document.querySelectorAll('#grid figure').length >= 4", timeout=45_000)
        pools = browser.new_page(viewport={"width": 1100, "height": 900})
        pools.goto(server.url + "/pools/")
        pools.locator("section.pool tr.runner[data-state=busy]").wait_for(timeout=15_000)
        pools.locator("li.failure[data-reason=crash]").wait_for(timeout=15_000)
        pools.screenshot(path=str(out / NAMES[1]), full_page=True, animations="disabled")

        page.wait_for_function("document.querySelectorAll('#grid figure').length >= 12", timeout=45_000)
        page.wait_for_function("[...document.querySelectorAll('img')].every(i => i.complete && i.naturalWidth)")
        page.screenshot(path=str(out / NAMES[0]), animations="disabled")  # the first screenful
        page.click("#cancel")  # done: leave nothing running
        page.locator("#status[data-state=cancelled]").wait_for(timeout=30_000)
    return [out / name for name in NAMES]


def main() -> None:
    from playwright import sync_api

    out = Path(sys.argv[1]) if len(sys.argv) > 1 else OUT
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            for path in take(browser, out):
                print(path)
        finally:
            browser.close()


if __name__ == "__main__":
    main()
