from __future__ import annotations

import asyncio
import ctypes.util
import glob
import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from flame_asgi import Backend, LocalBackend, ProcessBackend
from tests.apps import procs

BackendFactory = Callable[[], Backend]

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
MEDIA_UNAVAILABLE = 3  # .ci/media.sh's exit code when the tools cannot be installed here


def missing_media() -> list[str]:
    """What .ci/media.sh provides and this machine (or this interpreter) lacks."""
    missing = [tool for tool in ("ffmpeg", "ffprobe") if shutil.which(tool) is None]
    if not os.access(CHROMIUM, os.X_OK):
        missing.append("chromium")
    if not glob.glob("/usr/lib/postgresql/*/bin/initdb"):  # Debian keeps the server off PATH
        missing.append("postgresql")
    if ctypes.util.find_library("atomic") is None:  # playwright's bundled node needs libatomic.so.1
        missing.append("libatomic1")
    if importlib.util.find_spec("playwright") is None:
        missing.append("playwright")
    return missing


@pytest.fixture(scope="session")
def media() -> None:
    """ffmpeg, chromium, PostgreSQL and playwright for the example app's end-to-end and browser
    tests: .ci/media.sh installs whichever is missing, once per session. The tests skip only
    when it says they cannot be installed here (not root, apt or pip failing), with its reason."""
    missing = missing_media()
    if not missing:
        return
    script = REPO / ".ci" / "media.sh"
    try:
        done = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=1800,
                              env={**os.environ, "PYTHON": sys.executable})
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{script} did not install {', '.join(missing)} within {exc.timeout:.0f} s")
    if done.returncode == MEDIA_UNAVAILABLE:
        pytest.skip(f"{', '.join(missing)} cannot be installed here: {done.stderr.strip()[-600:]}")
    assert done.returncode == 0, f"{script} failed installing {', '.join(missing)}:\n{done.stderr}"
    importlib.invalidate_caches()  # a playwright pip just installed must be importable now
    still = missing_media()
    assert not still, f"{script} succeeded but {', '.join(still)} is still missing:\n{done.stderr}"


@pytest.fixture(params=["local", "process"])
def backend(request: pytest.FixtureRequest) -> BackendFactory:
    """Build a fresh backend of each kind: every pool scenario runs on both."""
    if request.param == "local":
        return lambda: LocalBackend(heartbeat_interval=0.2, heartbeat_timeout=3.0)
    return lambda: ProcessBackend(heartbeat_interval=0.2, heartbeat_timeout=3.0)


def child_pids() -> set[int]:
    """This process's children, unreaped ones included: a zombie is a runner not reaped."""
    return procs.child_pids(os.getpid(), zombies=True)


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    """Every test must reap every runner it started."""
    before = child_pids()
    yield
    deadline = time.monotonic() + 5
    while child_pids() - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert child_pids() - before == set(), "runner processes left behind"


async def until(predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)
