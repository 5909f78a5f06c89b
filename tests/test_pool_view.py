"""flame_asgi.pool_view: the live pool page, mounted in a FastAPI and in a plain Starlette app
(tests/pool_view_apps.py) served by uvicorn and read over its WebSocket. In chromium:
tests/test_browser.py."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.conftest import REPO
from tests.pool_view_apps import TOKEN
from tests.servers import serve

APPS = ["tests.pool_view_apps:fastapi_app", "tests.pool_view_apps:starlette_app"]


@pytest.fixture(params=APPS, ids=["fastapi", "starlette"])
def served(request: pytest.FixtureRequest) -> Iterator[tuple[str, set[int]]]:
    with serve(request.param, probe="/ping") as (url, _proc, watched):
        yield url, watched


def snapshots(url: str, **headers: str) -> Iterator[dict[str, Any]]:
    with connect(url.replace("http", "ws", 1) + "/pools/ws", additional_headers=headers, open_timeout=10) as ws:
        while True:
            yield json.loads(ws.recv(timeout=10))


def first(url: str, predicate: Any, what: str, **headers: str) -> dict[str, Any]:
    """The first pushed snapshot of pool ``work`` that satisfies ``predicate``."""
    deadline = time.monotonic() + 30
    for snap in snapshots(url, **headers):
        (pool,) = snap["pools"]
        if predicate(pool):
            return pool
        assert time.monotonic() < deadline, f"no snapshot showed {what}; the last: {pool}"
    raise AssertionError("unreachable")


def test_importing_the_view_costs_nothing_until_one_is_created() -> None:
    code = ("from flame_asgi._observe import telemetry as _telemetry\nimport flame_asgi.pool_view as v\n"
            "assert not _telemetry.active(), 'importing subscribed'\n"
            "v.pool_view(dependencies=[])\nassert _telemetry.active(), 'a view records events'\nprint('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "ok", done.stderr


def test_dependencies_are_required_and_must_be_depends() -> None:
    from flame_asgi.pool_view import pool_view

    with pytest.raises(TypeError, match="dependencies"):
        pool_view()  # type: ignore[call-arg]
    with pytest.raises(TypeError, match=r"Depends\(your_check\)"):
        pool_view(dependencies=[lambda: None])  # type: ignore[list-item]


def test_the_guard_refuses_the_page_and_the_websocket(served: tuple[str, set[int]]) -> None:
    url, _ = served
    refused = httpx.get(url + "/pools/", timeout=10)
    assert refused.status_code == 403 and refused.json() == {"detail": "operators only"}
    with pytest.raises(InvalidStatus) as denied:
        next(snapshots(url))
    assert denied.value.response.status_code == 403
    page = httpx.get(url + "/pools/", params={"token": TOKEN}, timeout=10)
    assert page.status_code == 200 and "flame_asgi pools" in page.text
    assert page.headers["cache-control"] == "no-store" and page.headers["referrer-policy"] == "no-referrer"
    (pool,) = next(snapshots(url, Authorization=f"Bearer {TOKEN}"))["pools"]
    assert pool["name"] == "work" and pool["backend"] == "process" and pool["running"]
    assert (pool["runners"], pool["max"], pool["capacity"]) == ([], 2, 2)


def test_boots_calls_failures_and_losses_are_pushed(served: tuple[str, set[int]]) -> None:
    url, watched = served
    auth = {"Authorization": f"Bearer {TOKEN}"}
    pid = httpx.get(url + "/pid", timeout=30).json()["pid"]
    watched.add(pid)
    assert httpx.get(url + "/refuse", timeout=30).status_code == 500
    pool = first(url, lambda p: p["calls_total"] == 2 and p["failures"], "two calls and a failure", **auth)
    (runner,) = pool["runners"]
    assert runner["state"] == "idle" and runner["active"] == 0 and runner["url"].startswith("http://127.0.0.1:")
    assert runner["boot_time"] > 0 and pool["boot_times"] == [runner["boot_time"]]
    assert pool["history"][-1][1:3] == [1, 0]  # one runner, none booting
    (failure,) = pool["failures"]
    assert (failure["what"], failure["reason"], failure["runner"]) == ("call error", "ValueError", runner["id"])

    # Busy while a call runs on it: two slots, one in use.
    busy = threading.Thread(target=httpx.get, args=(url + "/pid",), kwargs={"params": {"nap": "2"}, "timeout": 30})
    busy.start()
    try:
        pool = first(url, lambda p: p["slots_used"] == 1, "a busy runner", **auth)
        assert pool["runners"][0]["state"] == "busy" and pool["slots"] == 2
    finally:
        busy.join()

    os.kill(pid, signal.SIGKILL)
    pool = first(url, lambda p: not p["runners"], "the killed runner gone", **auth)
    lost = pool["failures"][0]
    assert (lost["what"], lost["reason"], lost["runner"]) == ("runner lost", "crash", runner["id"])
    assert "SIGKILL" in lost["detail"]


def test_a_runner_on_its_way_out_is_shown_stopping() -> None:
    with serve("tests.pool_view_apps:stopping_app", probe="/pools/") as (url, _proc, watched):
        watched.add(httpx.get(url + "/pid", timeout=30).json()["pid"])
        pool = first(url, lambda p: [r["state"] for r in p["runners"]] == ["stopping"], "a stopping runner")
        assert pool["slots"] == 0  # it takes no more work
        first(url, lambda p: not p["runners"], "the runner gone")


def test_the_docs_page_example_runs(tmp_path: Any) -> None:
    (code,) = re.findall(r"```python\n(# file: ops.py\n.*?)```", (REPO / "docs" / "pool-view.md").read_text(), re.S)
    (tmp_path / "ops.py").write_text(code)
    with serve("ops:app", cwd=str(tmp_path), env={"OPS_TOKEN": "s3cret"}) as (url, _proc, _watched):
        assert httpx.get(url + "/pools/", params={"token": "wrong"}, timeout=10).status_code == 403
        assert httpx.get(url + "/square/7", timeout=30).json() == 49
        pool = first(url, lambda p: p["calls_total"] == 1, "the call", Authorization="Bearer s3cret")
        assert pool["name"] == "work" and [r["state"] for r in pool["runners"]] == ["idle"]
