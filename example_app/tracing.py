"""Optional OpenTelemetry tracing for the example app, in the web process and on runners.

Off unless configured (nothing is imported then):

- ``FLAME_EXAMPLE_TRACES=/path/spans.jsonl``: every process of the app (web and runners)
  appends its finished spans to that file, one JSON object a line: enough to read the
  trace of one thumbnail job without running a collector;
- ``OTEL_EXPORTER_OTLP_ENDPOINT=http://collector:4318``: spans also go to that OTLP
  collector (Jaeger, Tempo...), with ``pip install opentelemetry-exporter-otlp-proto-http``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def tracing(service: str) -> Iterator[None]:
    path = os.environ.get("FLAME_EXAMPLE_TRACES")
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not path and not endpoint:
        yield
        return
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    out: Any = None
    if path:
        out = open(path, "a", buffering=1)  # line-buffered: one write per span, appended

        def one_line(span: ReadableSpan) -> str:
            return str(span.to_json(indent=None)) + "\n"

        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter(out=out, formatter=one_line)))
    if endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[import-not-found]
            OTLPSpanExporter,
        )

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    try:
        yield
    finally:
        provider.shutdown()  # flushes; a runner leaves through this teardown when it stops
        if out is not None:
            out.close()


def span(name: str, **attributes: Any) -> contextlib.AbstractContextManager[Any]:
    """A span around a step of the work (a no-op when tracing is off or not installed)."""
    try:
        from opentelemetry import trace
    except ImportError:
        return contextlib.nullcontext()
    return trace.get_tracer("example_app").start_as_current_span(name, attributes=attributes)
