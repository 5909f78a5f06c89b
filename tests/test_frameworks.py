"""FlameApp on Litestar, Quart and Django, for real: each example of docs/frameworks.md served
by uvicorn, its pool booting ProcessBackend runners that ran the app's own startup, with
every runner gone when the server stops; and each framework's app in runner mode, where
the framework never sees a request."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import httpx
import pytest

from tests.servers import serve
from tests.test_docs_pages import CLEAN_ENV, write_files

SITES = ["litestar_site", "quart_site", "django_site"]


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    folder = tmp_path_factory.mktemp("frameworks")
    assert write_files("frameworks.md", folder) == [f"{site}.py" for site in SITES]
    return folder


@pytest.mark.parametrize("site", SITES)
def test_calls_run_on_runners_that_ran_the_frameworks_own_startup(sites: pathlib.Path, site: str) -> None:
    with serve(f"{site}:application", env=CLEAN_ENV, cwd=str(sites)) as (url, _proc, watched):
        got = httpx.get(url + "/where", timeout=60).json()
        runner = got["runner"]
        watched.add(runner["pid"])
        assert runner["pid"] != got["web"]
        if site == "django_site":
            # Django's startup (settings, apps, ready()) runs on import, in the runner's lineage.
            assert runner["django_ready"] is True and runner["ready_in"] and runner["sqlite"]
        else:
            assert runner["started_in"] == [runner["pid"]]  # the framework's startup ran on the runner
        again = httpx.get(url + "/where", timeout=60).json()["runner"]
        assert again["pid"] == runner["pid"]  # the pool's one runner, kept warm between calls
    # serve() has checked that the web process and the runner are gone after SIGTERM.


def _runner_mode_probe(site: str) -> str:
    """Serve ``site`` in-process as a runner (FLAME_PARENT set) and report what answered."""
    return f"""
import os, sys
from starlette.testclient import TestClient
from flame_asgi import ParentInfo
from flame_asgi.backends import RunnerSpec

info = ParentInfo(pool="work", runner_id="work-1", parent_address="h:1", backend="process",
                  code_version="v", app="{site}:application")
spec = RunnerSpec(pool="work", runner_id="work-1", info=info, app=info.app, boot_timeout=None, secret="s")
os.environ.update(spec.env)
import {site} as site
with TestClient(site.application) as client:
    started = getattr(site, "STARTED_IN", None) or getattr(site, "READY_IN")
    status, runner_id = client.get("/where").status_code, client.get("/_flame/health").json()["runner_id"]
    # One write to stderr (a runner sends its stdout there), whole among the client's log lines.
    os.write(2, ("\\nprobe: %s %s %s\\n" % (status, runner_id, started == [os.getpid()])).encode())
"""


@pytest.mark.parametrize("site", SITES)
def test_in_runner_mode_the_framework_never_sees_a_request(sites: pathlib.Path, site: str) -> None:
    done = subprocess.run([sys.executable, "-c", _runner_mode_probe(site)], cwd=sites, env=CLEAN_ENV,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    probe = [line for line in done.stderr.splitlines() if line.startswith("probe: ")]
    assert probe, done.stderr
    status, runner_id, started = probe[-1].split()[1:]
    assert (status, runner_id) == ("404", "work-1")
    assert started == "True"  # the app's own startup ran in runner mode, in this process


def test_the_library_depends_on_no_framework() -> None:
    # The frameworks are test-only dependencies: importing flame_asgi loads none of them.
    code = "import sys, flame_asgi; print(sorted({'litestar', 'quart', 'django'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], env=CLEAN_ENV, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "[]", done.stderr
