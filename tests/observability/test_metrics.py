"""Prometheus metrics: pool gauges at scrape time, counters and histograms from events."""

from __future__ import annotations

import asyncio
import os

import httpx
import pytest

from flame_asgi import BootError, FastAPI, FlamePool
from flame_asgi.metrics import instrument, mount_metrics
from tests.conftest import BackendFactory, until
from tests.observability import work
from tests.observability.test_events import RefusingBackend

pytestmark = pytest.mark.observability
prometheus_client = pytest.importorskip("prometheus_client")
PID = str(os.getpid())  # every metric names the process whose pools it describes


async def test_counters_histograms_and_gauges(backend: BackendFactory) -> None:
    registry = prometheus_client.CollectorRegistry()
    metrics = instrument(registry)
    value = registry.get_sample_value
    try:
        async with FlamePool("m", backend=backend(), max=1, max_concurrency=1) as pool:
            kind = pool.backend.name
            for i in range(3):
                assert await pool.call(work.square, i) == i * i
            with pytest.raises(ValueError):
                await pool.call(work.fail)
            assert [x async for x in pool.stream(work.count, 2)] == [0, 1]
            busy = asyncio.ensure_future(pool.call(work.sleep, 0.6))
            await until(lambda: value("flame_pool_active", {"pool": "m", "pid": PID}) == 1.0,
                        what="one active call")
            waiting = asyncio.ensure_future(pool.call(work.square, 9))
            await until(lambda: value("flame_pool_waiting", {"pool": "m", "pid": PID}) == 1.0,
                        what="one waiting caller")
            assert value("flame_pool_runners", {"pool": "m", "pid": PID}) == 1.0
            assert value("flame_pool_booting", {"pool": "m", "pid": PID}) == 0.0
            assert value("flame_pool_max_runners", {"pool": "m", "pid": PID}) == 1.0
            await busy
            assert await waiting == 81
        assert value("flame_pool_runners", {"pool": "m", "pid": PID}) is None  # a closed pool is not reported
        assert value("flame_calls_total", {"pool": "m", "kind": "call", "outcome": "ok", "pid": PID}) == 5.0
        assert value("flame_calls_total", {"pool": "m", "kind": "call", "outcome": "error", "pid": PID}) == 1.0
        assert value("flame_calls_total", {"pool": "m", "kind": "stream", "outcome": "ok", "pid": PID}) == 1.0
        assert value("flame_runner_boots_total", {"pool": "m", "backend": kind, "pid": PID}) == 1.0
        assert value("flame_runner_boot_seconds_count", {"pool": "m", "backend": kind, "pid": PID}) == 1.0
        assert value("flame_runner_stops_total", {"pool": "m", "reason": "shutdown", "pid": PID}) == 1.0
        assert value("flame_call_queue_seconds_count", {"pool": "m", "kind": "call", "pid": PID}) == 6.0
        assert value("flame_call_run_seconds_count", {"pool": "m", "kind": "call", "pid": PID}) == 6.0
        # The queued call waited for the 0.6 s one: its wait is in the histogram.
        assert value("flame_call_queue_seconds_sum", {"pool": "m", "kind": "call", "pid": PID}) >= 0.3
        assert value("flame_call_run_seconds_sum", {"pool": "m", "kind": "call", "pid": PID}) >= 0.6
    finally:
        metrics.close()
    assert value("flame_calls_total", {"pool": "m", "kind": "call", "outcome": "ok", "pid": PID}) is None


async def test_boot_failures_are_counted() -> None:
    registry = prometheus_client.CollectorRegistry()
    metrics = instrument(registry)
    try:
        async with FlamePool("refused", backend=RefusingBackend()) as pool:
            with pytest.raises(BootError):
                await pool.call(work.square, 1, timeout=0.3)
        labels = {"pool": "refused", "backend": "refusing", "pid": PID}
        assert registry.get_sample_value("flame_runner_boot_failures_total", labels) == 1.0
        assert registry.get_sample_value("flame_runner_boots_total", labels) is None
        assert registry.get_sample_value("flame_calls_total", {"pool": "refused", "kind": "call",
                                                               "outcome": "boot_error", "pid": PID}) == 1.0
    finally:
        metrics.close()


def test_instrument_is_idempotent_per_registry() -> None:
    registry = prometheus_client.CollectorRegistry()
    first = instrument(registry)
    other = instrument(prometheus_client.CollectorRegistry())
    try:
        assert instrument(registry) is first
        assert other is not first
    finally:
        first.close()
        other.close()
    assert instrument(registry) is not first  # closed: a new instrumentation
    instrument(registry).close()


async def test_metrics_page_on_the_app(backend: BackendFactory) -> None:
    registry = prometheus_client.CollectorRegistry()
    app = FastAPI()
    pool = app.add_flame_pool("web", backend=backend(), max=2)
    mount_metrics(app, registry=registry)
    try:
        async with app.router.lifespan_context(app):
            await pool.call(work.square, 2)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://web") as client:
                page = await client.get("/metrics")
                assert page.status_code == 200
                assert page.headers["content-type"].startswith("text/plain")
                text = page.text
                assert f'flame_calls_total{{kind="call",outcome="ok",pid="{PID}",pool="web"}} 1.0' in text
                assert f'flame_pool_runners{{pid="{PID}",pool="web"}} 1.0' in text
                assert f'flame_pool_max_runners{{pid="{PID}",pool="web"}} 2.0' in text
                assert "# TYPE flame_call_run_seconds histogram" in text
                assert "/metrics" not in (await client.get("/openapi.json")).text
    finally:
        instrument(registry).close()
