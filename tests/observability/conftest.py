"""Fixtures for the observability tests: collected events and an OpenTelemetry SDK provider."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from flame_asgi._observe import telemetry

Event = tuple[str, dict[str, Any]]


def pytest_configure(config: pytest.Config) -> None:
    # Until pyproject.toml lists it with the other markers.
    config.addinivalue_line("markers", "observability: events, traces, metrics and runner logs (tests/observability)")


@pytest.fixture
def events() -> Iterator[list[Event]]:
    """Every event emitted during the test, in order."""
    seen: list[Event] = []
    unsubscribe = telemetry.subscribe(lambda name, fields: seen.append((name, dict(fields))))
    yield seen
    unsubscribe()


def named(events: list[Event], name: str, **match: Any) -> list[dict[str, Any]]:
    """The fields of the events called ``name`` whose fields include ``match``."""
    return [f for n, f in events if n == name and all(f.get(k) == v for k, v in match.items())]


@pytest.fixture
def spans() -> Iterator[Any]:
    """A global OpenTelemetry SDK tracer provider exporting to memory; unset afterwards."""
    otel_trace = pytest.importorskip("opentelemetry.trace")
    sdk = pytest.importorskip("opentelemetry.sdk.trace")
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.util._once import Once

    exporter = InMemorySpanExporter()
    provider = sdk.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    otel_trace.set_tracer_provider(provider)
    try:
        yield exporter
    finally:
        provider.shutdown()
        # The API allows one global provider per process; undo it (as OpenTelemetry's own
        # test utilities do) so that later tests run untraced.
        otel_trace._TRACER_PROVIDER = None
        otel_trace._TRACER_PROVIDER_SET_ONCE = Once()


@pytest.fixture(autouse=True)
def no_leftover_subscriptions() -> Iterator[None]:
    """Each test starts with nobody listening, and must unsubscribe what it subscribed.

    Handlers of the process are set aside meanwhile: a module imported by an earlier test
    may have mounted a pool view (``example_app.main`` does at import), which listens for
    the rest of the process.
    """
    process_wide, telemetry._handlers = telemetry._handlers, ()
    try:
        yield
        assert telemetry._handlers == (), "a test left an event handler subscribed"
    finally:
        telemetry._handlers = process_wide
