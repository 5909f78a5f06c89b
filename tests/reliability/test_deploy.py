"""A deploy: SIGTERM to a serving parent under load, with uvicorn and with gunicorn.

In-flight requests (linked calls) finish within the server's graceful timeout, and
those that cannot are cut with their work cancelled on the runner; ``link=False`` work
completes within ``shutdown_timeout``; the server stops taking connections at once;
runners and fork server are gone after. Printed figures go to docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import pathlib
import signal
import subprocess
import time

import httpx
import pytest

from flame_asgi import FlamePool, PoolClosed, ProcessBackend
from tests.apps.procs import alive, descendants
from tests.conftest import until
from tests.reliability import work
from tests.servers import command, free_port

APP = "tests.reliability.deploy_app:app"
REQUESTS = 20


def start_server(server: str, graceful: float) -> tuple[str, subprocess.Popen[bytes]]:
    port = free_port()
    cmd = command(server, APP, port)
    if server == "uvicorn":
        cmd += ["--timeout-graceful-shutdown", f"{graceful:g}"]
    else:
        cmd[cmd.index("--graceful-timeout") + 1] = f"{graceful:g}"
    return f"http://127.0.0.1:{port}", subprocess.Popen(cmd)


async def wait_serving(url: str, proc: subprocess.Popen[bytes]) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=2) as client:
        deadline = time.monotonic() + 30
        while True:
            try:
                if (await client.get("/_flame_probe")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not come up"
            await asyncio.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("server", ["uvicorn", "gunicorn"])
async def test_sigterm_under_load_finishes_in_flight_calls_and_unlinked_work(server: str,
                                                                           tmp_path: pathlib.Path) -> None:
    url, proc = start_server(server, graceful=10)
    try:
        await wait_serving(url, proc)
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            paths = [tmp_path / f"call{i}" for i in range(REQUESTS)]
            calls = [asyncio.ensure_future(client.post("/call", params={
                "seconds": 1.0, "path": str(p), "started": f"{p}.started"})) for p in paths]
            unlinked = tmp_path / "unlinked"
            assert (await client.post("/cast", params={"seconds": 2.0, "path": str(unlinked),
                                                       "started": f"{unlinked}.started"})).status_code == 200
            await until(lambda: all(pathlib.Path(f"{p}.started").exists() for p in [*paths, unlinked]), 30,
                        "every call and the cast to start on a runner")
            runners = (await client.get("/runners")).json()
            family = descendants(proc.pid)
            signalled = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            responses = await asyncio.gather(*calls)
            answered = time.monotonic() - signalled
            with pytest.raises(httpx.TransportError):  # no new work once the shutdown began
                await client.post("/call", params={"seconds": 0, "path": str(tmp_path / "late"), "started": "x"})
        code = await asyncio.to_thread(proc.wait, 30)
        took = time.monotonic() - signalled
        print(f"\n{server}: SIGTERM with {REQUESTS} calls in flight -> all answered in {answered:.2f} s, "
              f"parent exited in {took:.2f} s (unlinked work had ~2 s to go)")
        assert [r.status_code for r in responses] == [200] * REQUESTS
        assert all(r.json() == {"result": "touched"} for r in responses)
        assert unlinked.exists()  # the unlinked cast finished before the runners stopped
        assert code in (0, -signal.SIGTERM)
        assert runners and not any(alive(p) for p in runners)
        await until(lambda: not any(alive(p) for p in family), 10, "every worker, fork server and runner to exit")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
async def test_a_call_longer_than_the_graceful_timeout_is_cut_and_cancelled_on_the_runner(
        tmp_path: pathlib.Path) -> None:
    url, proc = start_server("uvicorn", graceful=1)
    try:
        await wait_serving(url, proc)
        long = tmp_path / "long"
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            call = asyncio.ensure_future(client.post("/call", params={"seconds": 4.0, "path": str(long),
                                                                      "started": f"{long}.started"}))
            await until(pathlib.Path(f"{long}.started").exists, 30, "the long call to start")
            runners = (await client.get("/runners")).json()
            signalled = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            response = await call
        code = await asyncio.to_thread(proc.wait, 30)
        took = time.monotonic() - signalled
        print(f"\nuvicorn --timeout-graceful-shutdown 1: a 4 s call was cut; parent exited in {took:.2f} s")
        assert response.status_code == 500  # uvicorn cancels the request: the client gets an answer
        assert code in (0, -signal.SIGTERM) and took < 4
        assert not any(alive(p) for p in runners)
        await asyncio.sleep(4.5 - took)
        assert not long.exists()  # the linked work was cancelled on the runner, not left running
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_calls_after_close_begins_get_pool_closed_at_once(tmp_path: pathlib.Path) -> None:
    pool = FlamePool("closing", backend=ProcessBackend(), max=1, shutdown_timeout=10)
    await pool.start()
    unlinked = tmp_path / "unlinked"
    pool.cast(work.touch_after, 1.0, str(unlinked), f"{unlinked}.started", link=False)
    await until(pathlib.Path(f"{unlinked}.started").exists, 20, "the unlinked cast to start")
    closing = asyncio.ensure_future(pool.aclose())
    await asyncio.sleep(0.1)
    assert not closing.done()  # it waits for the unlinked work
    began = time.monotonic()
    with pytest.raises(PoolClosed, match="closed"):
        await pool.call(work.square, 3)
    with pytest.raises(PoolClosed, match="closed"):
        pool.cast(work.square, 3)
    assert time.monotonic() - began < 0.5  # refused at once, not after a timeout
    await closing
    assert unlinked.exists()
