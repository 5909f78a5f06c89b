"""The pool's side of backend standby, on real ProcessBackend runners: specs are prepared
ahead when the pool opens and after each boot, boots take the oldest first, a prepared
runner counts toward nothing until it boots, and a backend that refuses to prepare costs a
warning, never a call. (DockerBackend's and FlyBackend's own standby are tested with their
backends, in tests/backends.)"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from flame_asgi import BootError, FlamePool, ProcessBackend, subscribe
from flame_asgi.backends import RunnerHandle, RunnerSpec
from tests import remote
from tests.conftest import until


class Preparing(ProcessBackend):
    """A ProcessBackend that says what it was asked to prepare and to boot."""

    def __init__(self, standby: int, refuse: bool = False) -> None:
        super().__init__()
        self.standby = standby
        self.refuse = refuse
        self.prepared: list[str] = []
        self.booted: list[str] = []

    async def prepare(self, spec: RunnerSpec) -> None:
        if self.refuse:
            raise BootError("no room for another container", reason="refused")
        self.prepared.append(spec.runner_id)

    async def boot(self, spec: RunnerSpec) -> RunnerHandle:
        self.booted.append(spec.runner_id)
        return await super().boot(spec)


async def test_boots_take_the_oldest_prepared_runner_and_the_pool_prepares_another() -> None:
    events: list[tuple[str, dict[str, Any]]] = []
    unsubscribe = subscribe(lambda name, fields: events.append((name, fields)))
    backend = Preparing(standby=2)
    try:
        async with FlamePool("standby", backend=backend, max=2, max_concurrency=1) as pool:
            await until(lambda: pool.stats().standby == 2, 20.0, "two runners prepared when the pool opens")
            assert pool.stats().runners == [] and len(backend.prepared) == 2
            first, second = backend.prepared
            assert await pool.call(remote.runner_id) == first  # the oldest boots first
            await until(lambda: pool.stats().standby == 2, 20.0, "another prepared behind it")
            assert backend.prepared[2:] and backend.prepared[2] not in (first, second)
            # Prepared runners count toward nothing: two calls at once take max=2 runners.
            ids = await asyncio.gather(pool.call(remote.runner_id_after, 3.0), pool.call(remote.runner_id_after, 3.0))
            assert set(ids) == {first, second}
            assert len(pool.stats().runners) == 2 and pool.stats().standby == 2
            starts = [f for name, f in events if name == "runner.boot.start"]
            assert [f["prepared"] for f in starts] == [True, True]
    finally:
        unsubscribe()


async def test_a_backend_that_refuses_to_prepare_costs_a_warning_not_a_call(caplog: pytest.LogCaptureFixture) -> None:
    backend = Preparing(standby=2, refuse=True)

    def refused() -> list[str]:
        return [r.getMessage() for r in caplog.records if "could not prepare a standby runner" in r.getMessage()]
    with caplog.at_level(logging.WARNING, logger="flame_asgi.pool"):
        async with FlamePool("standby-refused", backend=backend, max=1) as pool:
            await until(lambda: len(refused()) == 2, 20.0, "both prepares of the pool's opening refused")
            rid = await pool.call(remote.runner_id)
            assert backend.booted == [rid] and pool.stats().standby == 0  # booted whole, as without standby
            await until(lambda: len(refused()) == 4, 20.0, "asked again after the boot")
            await asyncio.sleep(0.3)
            assert len(refused()) == 4  # and not again until the next boot: never in a loop
    assert all("no room for another container" in m for m in refused())


class SlowPreparing(ProcessBackend):
    """A ProcessBackend whose prepare finishes only when the test says so."""

    def __init__(self) -> None:
        super().__init__()
        self.standby = 1
        self.asked = asyncio.Event()
        self.go = asyncio.Event()

    async def prepare(self, spec: RunnerSpec) -> None:
        self.asked.set()
        await self.go.wait()


async def test_a_prepare_that_ends_after_a_clear_keeps_nothing() -> None:
    from flame_asgi._base.parent import ParentInfo
    from flame_asgi._pool.standby import Standby

    backend = SlowPreparing()
    standby = Standby("cleared", backend)
    tasks: list[asyncio.Task[None]] = []

    async def spec() -> RunnerSpec:
        info = ParentInfo(pool="cleared", runner_id="cleared-1", parent_address="test", backend="process",
                          code_version="v", app="")
        return RunnerSpec(pool="cleared", runner_id="cleared-1", info=info, app=None, boot_timeout=None, secret="s")

    standby.top_up(spec, lambda coro: tasks.append(asyncio.ensure_future(coro)))  # type: ignore[arg-type]
    await asyncio.wait_for(backend.asked.wait(), 10.0)
    standby.clear()  # the pool closed while the backend was still preparing
    backend.go.set()
    await asyncio.gather(*tasks)
    assert len(standby) == 0 and standby.take() is None  # its backend removed that runner: nobody boots it
