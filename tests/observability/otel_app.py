"""An app traced end to end: the web process and its runners (the docs' worked example).

In the web process, FastAPI continues the browser's trace (its ``traceparent`` header)
in a server span (natively, or through the fallback middleware below on older
FastAPI); ``/square/{x}`` calls a runner. On a runner (``FLAME_PARENT``
set), the lifespan installs an OpenTelemetry SDK provider that appends each finished
span as a JSON line to ``OBS_SPAN_FILE``, and flushes it when the runner stops.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, Request, Response

from flame_asgi import FastAPI, FlamePool, ProcessBackend, flame_pool, parent
from tests.observability import work


class FileExporter:
    """A span exporter writing one JSON line per span (SimpleSpanProcessor: at once)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def export(self, spans: Sequence[Any]) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        with open(self.path, "a") as f:
            for span in spans:
                ctx, up = span.get_span_context(), span.parent
                f.write(json.dumps({
                    "name": span.name, "trace_id": format(ctx.trace_id, "032x"), "span_id": format(ctx.span_id, "016x"),
                    "parent_span_id": format(up.span_id, "016x") if up else None, "kind": span.kind.name,
                    "status": span.status.status_code.name, "attributes": dict(span.attributes or {}),
                    "pid": os.getpid()}) + "\n")
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    provider = None
    path = os.environ.get("OBS_SPAN_FILE")
    if parent() is not None and path:  # a runner: export its spans where the test reads them
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor

        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(FileExporter(path)))  # type: ignore[arg-type]
        trace.set_tracer_provider(provider)
    yield
    if provider is not None:
        provider.shutdown()  # flush before the runner exits


app = FastAPI(lifespan=lifespan)
app.add_flame_pool("traced", backend=ProcessBackend(), max=1, idle_shutdown_after=None)


try:  # a FastAPI with native telemetry traces requests itself once a tracer provider is set
    import fastapi.telemetry  # noqa: F401
except ImportError:  # older FastAPI: what opentelemetry-instrumentation-fastapi would do

    @app.middleware("http")
    async def trace_requests(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        from opentelemetry import propagate, trace

        tracer = trace.get_tracer("tests.otel_app")
        with tracer.start_as_current_span(f"{request.method} {request.url.path}",
                                          context=propagate.extract(dict(request.headers)),
                                          kind=trace.SpanKind.SERVER):
            return await call_next(request)


@app.get("/square/{x}")
async def square(x: int, pool: Annotated[FlamePool, Depends(flame_pool("traced"))]) -> dict[str, str]:
    return await pool.call(work.traced_work, x)
