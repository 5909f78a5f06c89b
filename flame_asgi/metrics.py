"""Prometheus metrics for every pool of this process (``pip install 'flame_asgi[prometheus]'``).

    from flame_asgi.metrics import mount_metrics
    mount_metrics(app)                  # GET /metrics, from the default registry

or ``instrument(registry)`` to fill a registry you serve yourself. Gauges are read from
the live pools at scrape time; counters and histograms come from pool events
(``flame_asgi.subscribe``), so they count from the moment ``instrument`` is called.

Every metric carries ``pid``, the process whose pools it describes: under ``uvicorn
--workers N``, gunicorn or hypercorn each worker has its own pools (``max`` is per
worker), and its series stay apart from the other workers'.

| metric | type | labels |
| --- | --- | --- |
| ``flame_pool_runners`` | gauge: booted runners | pool, pid |
| ``flame_pool_booting`` | gauge: runners being booted | pool, pid |
| ``flame_pool_waiting`` | gauge: callers queued for a slot | pool, pid |
| ``flame_pool_active`` | gauge: calls, streams and children running | pool, pid |
| ``flame_pool_max_runners`` | gauge: the pool's ``max`` | pool, pid |
| ``flame_runner_boots_total`` | counter: runners booted | pool, backend, pid |
| ``flame_runner_boot_failures_total`` | counter: boots that failed | pool, backend, pid |
| ``flame_runner_stops_total`` | counter: runners gone, by reason | pool, reason, pid |
| ``flame_calls_total`` | counter: finished work, by outcome | pool, kind, outcome, pid |
| ``flame_runner_boot_seconds`` | histogram: boot time | pool, backend, pid |
| ``flame_call_queue_seconds`` | histogram: wait for a slot | pool, kind, pid |
| ``flame_call_run_seconds`` | histogram: run time on the runner | pool, kind, pid |
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

from flame_asgi._observe import telemetry

BOOT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
CALL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                60.0, 300.0)
_lock = threading.Lock()
_instrumented: dict[int, Instrumentation] = {}  # id(registry) -> its instrumentation


def _prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError:
        raise ImportError("flame_asgi.metrics needs prometheus_client: pip install 'flame_asgi[prometheus]'") from None
    return prometheus_client


class Instrumentation:
    """The metrics of one registry; ``close()`` stops counting and unregisters them."""

    def __init__(self, registry: Any) -> None:
        prometheus = _prometheus()
        self.registry = registry
        kw: dict[str, Any] = {"registry": registry}
        self.boots = prometheus.Counter("flame_runner_boots", "Runners booted", ["pool", "backend", "pid"], **kw)
        self.boot_failures = prometheus.Counter("flame_runner_boot_failures", "Runner boots that failed",
                                                ["pool", "backend", "pid"], **kw)
        self.stops = prometheus.Counter("flame_runner_stops", "Runners that left the pool, by reason",
                                        ["pool", "reason", "pid"], **kw)
        self.calls = prometheus.Counter("flame_calls", "Calls, casts, streams and children, by outcome",
                                        ["pool", "kind", "outcome", "pid"], **kw)
        self.boot_time = prometheus.Histogram("flame_runner_boot_seconds", "Time to boot a runner",
                                              ["pool", "backend", "pid"], buckets=BOOT_BUCKETS, **kw)
        self.queue_time = prometheus.Histogram("flame_call_queue_seconds", "Time waiting for a runner slot",
                                               ["pool", "kind", "pid"], buckets=CALL_BUCKETS, **kw)
        self.run_time = prometheus.Histogram("flame_call_run_seconds", "Time from slot to the caller's end",
                                             ["pool", "kind", "pid"], buckets=CALL_BUCKETS, **kw)
        self._collector = _PoolCollector()
        registry.register(self._collector)
        self._unsubscribe = telemetry.subscribe(self._on_event)

    def _on_event(self, name: str, f: dict[str, Any]) -> None:
        pid = str(os.getpid())  # read each time: a worker forked after instrument() has its own
        if name == "call.end" or name == "call.exception":
            self.calls.labels(f["pool"], f["kind"], f["outcome"], pid).inc()
            self.queue_time.labels(f["pool"], f["kind"], pid).observe(f["queue_time"])
            if f["run_time"] is not None:
                self.run_time.labels(f["pool"], f["kind"], pid).observe(f["run_time"])
        elif name == "runner.boot.end":
            if f["ok"]:
                self.boots.labels(f["pool"], f["backend"], pid).inc()
                if f["duration"] is not None:
                    self.boot_time.labels(f["pool"], f["backend"], pid).observe(f["duration"])
            elif f["reason"] != "cancelled":  # a boot cut short by the pool closing is no failure
                self.boot_failures.labels(f["pool"], f["backend"], pid).inc()
        elif name == "runner.stop":
            self.stops.labels(f["pool"], f["reason"], pid).inc()

    def close(self) -> None:
        self._unsubscribe()
        with _lock:
            _instrumented.pop(id(self.registry), None)
        for collector in (self.boots, self.boot_failures, self.stops, self.calls, self.boot_time, self.queue_time,
                          self.run_time, self._collector):
            self.registry.unregister(collector)


class _PoolCollector:
    """Gauges read from the live pools at scrape time (exact, whenever instrumented)."""

    GAUGES = (("runners", "Booted runners"), ("booting", "Runners being booted"),
              ("waiting", "Callers queued for a runner slot"), ("active", "Calls, streams and children running"),
              ("warm", "Spare runners kept booted while the pool is busy"),
              ("standby", "Runners the backend holds created, not started, for the next boots"),
              ("max_runners", "The pool's max"))

    def __init__(self) -> None:
        from prometheus_client.core import GaugeMetricFamily

        self._family = GaugeMetricFamily

    def describe(self) -> Iterator[Any]:
        for key, doc in self.GAUGES:
            yield self._family(f"flame_pool_{key}", doc, labels=["pool", "pid"])

    def collect(self) -> Iterator[Any]:
        totals: dict[str, dict[str, float]] = {}
        pid = str(os.getpid())
        for pool in telemetry.pools():
            s = _stats(pool)
            if s is None:
                continue
            row = totals.setdefault(pool.name, dict.fromkeys((k for k, _ in self.GAUGES), 0.0))
            row["runners"] += len(s.runners)
            row["booting"] += s.booting
            row["waiting"] += s.waiting
            row["active"] += sum(r.active for r in s.runners)
            row["warm"] += s.warm
            row["standby"] += s.standby
            row["max_runners"] += pool.max
        for key, doc in self.GAUGES:
            family = self._family(f"flame_pool_{key}", doc, labels=["pool", "pid"])
            for name, row in sorted(totals.items()):
                family.add_metric([name, pid], row[key])
            yield family


def _stats(pool: Any) -> Any:
    # A scrape from another thread (prometheus_client.start_http_server) may catch the
    # pool's dicts mid-change: try again, or leave the pool out of this one scrape.
    for _ in range(3):
        try:
            return pool.stats()
        except RuntimeError:
            continue
    return None


def instrument(registry: Any = None) -> Instrumentation:
    """Register flame_asgi's metrics in ``registry`` (default: prometheus_client's ``REGISTRY``).

    Idempotent per registry: a second call returns the first instrumentation.
    """
    prometheus = _prometheus()
    registry = prometheus.REGISTRY if registry is None else registry
    with _lock:
        existing = _instrumented.get(id(registry))
        if existing is None:
            existing = _instrumented[id(registry)] = Instrumentation(registry)
    return existing


def metrics_endpoint(registry: Any = None) -> Callable[[Any], Any]:
    """A Starlette endpoint serving ``registry`` in Prometheus' text format (instrumenting it)."""
    prometheus = _prometheus()
    registry = prometheus.REGISTRY if registry is None else registry
    instrument(registry)
    from starlette.responses import Response

    async def metrics(request: Any) -> Response:
        return Response(prometheus.generate_latest(registry), media_type=prometheus.CONTENT_TYPE_LATEST)

    return metrics


def mount_metrics(app: Any, path: str = "/metrics", *, registry: Any = None) -> None:
    """Serve the metrics at ``GET path`` of a FastAPI/Starlette ``app`` (not in its OpenAPI schema)."""
    app.add_route(path, metrics_endpoint(registry), methods=["GET"], include_in_schema=False)
