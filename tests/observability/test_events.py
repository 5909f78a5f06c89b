"""Pool and call events: ``flame_asgi.subscribe`` and the ``flame_asgi.events`` logger."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys

import pytest

from flame_asgi import Backend, BootError, CallTimeout, FlamePool, ProcessBackend, RunnerLost
from flame_asgi._observe import telemetry
from flame_asgi._wire.exits import loss_label
from flame_asgi.backends import RunnerHandle, RunnerSpec
from flame_asgi.backends._base import ExitReason
from flame_asgi.backends._docker_config import describe_exit as docker_exit
from flame_asgi.backends.process import describe_exit
from tests.conftest import BackendFactory, until
from tests.observability import work
from tests.observability.conftest import Event, named

pytestmark = pytest.mark.observability


async def test_every_kind_of_work_reports_start_and_end(backend: BackendFactory, events: list[Event]) -> None:
    async with FlamePool("ev", backend=backend(), max=1) as pool:
        kind = pool.backend.name
        assert await pool.call(work.square, 3) == 9
        rid = pool.stats().runners[0].id
        pool.cast(work.square, 4)
        assert [x async for x in pool.stream(work.count, 3)] == [0, 1, 2]
        handle = await pool.place_child(work.square, 5)
        assert await handle == 25
        await until(lambda: len(named(events, "call.end")) == 4, what="four call.end events")
    ends = {f["kind"]: f for f in named(events, "call.end")}
    assert set(ends) == {"call", "cast", "stream", "child"}
    for f in ends.values():
        assert f["pool"] == "ev" and f["runner"] == rid and f["outcome"] == "ok"
        assert f["queue_time"] >= 0 and f["run_time"] > 0
    assert ends["call"]["function"] == "square" and ends["stream"]["function"] == "count"
    assert sorted(f["kind"] for f in named(events, "call.start")) == ["call", "cast", "child", "stream"]
    # The first call waited for the boot: its queue time covers it.
    boot = named(events, "runner.boot.end")[0]
    assert boot == {**boot, "pool": "ev", "runner": rid, "backend": kind, "ok": True, "count": 1}
    assert 0 < boot["duration"] <= ends["call"]["queue_time"]
    assert named(events, "runner.boot.start") == [{"pool": "ev", "runner": rid, "backend": kind, "count": 1,
                                                  "why": "demand", "prepared": False}]
    assert named(events, "runner.stop") == [{"pool": "ev", "runner": rid, "backend": kind, "count": 0,
                                              "reason": "shutdown", "detail": "shutdown"}]
    names = [n for n, _ in events]
    assert names[0] == "pool.start" and "pool.stop" in names


async def test_failures_are_call_exception_with_an_outcome(backend: BackendFactory, events: list[Event]) -> None:
    async with FlamePool("fails", backend=backend(), max=1, max_concurrency=1) as pool:
        with pytest.raises(ValueError, match="remote boom"):
            await pool.call(work.fail)
        with pytest.raises(CallTimeout):
            await pool.call(work.sleep, 5, timeout=0.3)
        # A stream that cannot get a slot in time: CallTimeout too (not an internal error).
        holder = asyncio.ensure_future(pool.call(work.sleep, 1.0))
        await until(lambda: pool.stats().runners and pool.stats().runners[0].active == 1)
        with pytest.raises(CallTimeout):
            await pool.stream(work.count, 2, timeout=0.2).__anext__()
        await holder
        stream = pool.stream(work.count, 100)
        assert await stream.__anext__() == 0
        await stream.aclose()  # the consumer stops early: not a failure
    failed = {(f["kind"], f["outcome"], f["error"]) for f in named(events, "call.exception")}
    assert failed == {("call", "error", "ValueError"), ("call", "timeout", "CallTimeout"),
                      ("stream", "timeout", "CallTimeout")}
    timed_out_stream = named(events, "call.exception", kind="stream")[0]
    assert timed_out_stream["runner"] is None and timed_out_stream["run_time"] is None
    assert named(events, "call.end", kind="stream", outcome="stopped")


async def test_idle_and_single_use_stops_say_why(backend: BackendFactory, events: list[Event]) -> None:
    async with FlamePool("idle", backend=backend(), idle_shutdown_after=0.2) as pool:
        await pool.call(work.square, 2)
        await until(lambda: named(events, "runner.stop"), what="the idle stop")
    async with FlamePool("once", backend=backend(), single_use=True) as pool:
        await pool.call(work.square, 2)
        await until(lambda: named(events, "runner.stop", pool="once"), what="the single-use stop")
    assert [f["reason"] for f in named(events, "runner.stop")] == ["idle", "single_use"]


class RefusingBackend(Backend):
    name = "refusing"

    async def boot(self, spec: RunnerSpec) -> RunnerHandle:
        raise BootError("401 Unauthorized: bad API token", reason="bad credentials")


async def test_a_failed_boot_reports_its_reason(events: list[Event]) -> None:
    async with FlamePool("refused", backend=RefusingBackend()) as pool:
        with pytest.raises(BootError):
            await pool.call(work.square, 1, timeout=0.3)
    end = named(events, "runner.boot.end")[0]
    assert end["ok"] is False and end["reason"] == "bad credentials" and "bad API token" in end["error"]
    assert end["backend"] == "refusing" and end["duration"] >= 0
    assert named(events, "call.exception")[0]["outcome"] == "boot_error"


async def test_a_killed_process_runner_is_a_crash(events: list[Event]) -> None:
    async with FlamePool("crash", backend=ProcessBackend(heartbeat_interval=0.2, heartbeat_timeout=3.0)) as pool:
        with pytest.raises(RunnerLost):
            await pool.call(work.die)
    stop = named(events, "runner.stop")[0]
    assert stop["reason"] == "crash" and "SIGKILL" in stop["detail"]
    assert named(events, "call.exception")[0]["outcome"] == "lost"


def test_lost_runner_labels_come_from_structured_exit_reasons() -> None:
    label = loss_label
    # What each backend reports (process, Docker, Kubernetes, Fly), whatever its wording.
    assert label(describe_exit(-9), unreachable=False) == "crash"
    assert label(describe_exit(3), unreachable=False) == "crash"
    assert label(docker_exit("flame-x", 137, oom=True, memory=64 * 2**20), unreachable=False) == "oom"
    assert label(ExitReason("oom", "runner pod p was killed: out of memory"), unreachable=False) == "oom"
    assert label(ExitReason("gone", "runner pod p was deleted"), unreachable=False) == "crash"
    assert label(ExitReason("unreachable", "Fly machine m is still started"), unreachable=False) == "unreachable"
    assert label(ExitReason("oom", "any words at all"), unreachable=False) == "oom"  # the kind decides, not the text
    assert label(None, unreachable=True) == "unreachable"  # no heartbeat, and the backend cannot say more
    assert label(None, unreachable=False) == "lost"  # an invalid message, a closed channel


async def test_a_failing_handler_does_not_break_calls(caplog: pytest.LogCaptureFixture) -> None:
    def broken(name: str, fields: object) -> None:
        raise RuntimeError("handler bug")

    seen: list[str] = []
    unsubscribe_broken = telemetry.subscribe(broken)
    unsubscribe = telemetry.subscribe(lambda name, fields: seen.append(name))
    try:
        async with FlamePool("robust") as pool:
            assert await pool.call(work.square, 6) == 36
    finally:
        unsubscribe_broken()
    assert "call.end" in seen
    assert any("handler bug" in r.getMessage() or "raised on" in r.getMessage() for r in caplog.records)
    unsubscribe()
    seen.clear()
    async with FlamePool("after") as pool:
        await pool.call(work.square, 1)
    assert seen == []


async def test_events_logger_at_debug_gets_structured_records(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="flame_asgi.events")
    async with FlamePool("logged") as pool:
        await pool.call(work.square, 2)
        rid = pool.stats().runners[0].id
    ends = [r for r in caplog.records if r.name == "flame_asgi.events" and r.flame_event == "call.end"]  # type: ignore[attr-defined]
    assert len(ends) == 1
    record = ends[0]
    assert record.levelno == logging.DEBUG
    assert record.flame_pool == "logged" and record.flame_runner == rid  # type: ignore[attr-defined]
    assert record.flame_outcome == "ok" and record.flame_kind == "call"  # type: ignore[attr-defined]
    assert record.getMessage().startswith("call.end pool=logged kind=call")


async def test_nobody_listening_costs_one_check() -> None:
    assert not telemetry.active()
    async with FlamePool("quiet") as pool:
        assert telemetry.observe_call(pool.name, "call", work.square) is telemetry.OFF
        assert telemetry.OFF.trace is None  # nothing extra travels in the call message
        assert await pool.call(work.square, 2) == 4


def test_untraced_unmeasured_calls_touch_neither_opentelemetry_nor_prometheus() -> None:
    # (FastAPI itself may import the OpenTelemetry API: flame_asgi only checks for a provider.)
    code = ("import asyncio, sys\n"
            "from flame_asgi import FlamePool\nfrom flame_asgi._observe import tracing as _tracing\n"
            "from tests.observability import work\n"
            "async def main():\n"
            "    async with FlamePool('p') as pool:\n"
            "        assert await pool.call(work.square, 3) == 9\n"
            "asyncio.run(main())\n"
            "assert _tracing._otel is None and not _tracing._no_otel\n"
            "assert not any(m.startswith(('prometheus_client', 'opentelemetry.sdk')) for m in sys.modules)\n")
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


def test_subscribe_is_public() -> None:
    import flame_asgi

    assert flame_asgi.subscribe is telemetry.subscribe and "subscribe" in flame_asgi.__all__
