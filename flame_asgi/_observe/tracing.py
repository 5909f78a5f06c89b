"""OpenTelemetry spans around remote work: one in the caller, its child on the runner.

Nothing here imports OpenTelemetry on its own: the caller traces only when the
application has imported ``opentelemetry.trace`` and set a real tracer provider. The
caller's span context travels in the signed call message (meta field ``tc``: the W3C
``traceparent``/``tracestate`` headers written by ``opentelemetry.propagate.inject``);
the runner extracts it and runs the work inside a child span, made current so that the
work's own spans (and calls it places on other pools) nest under it.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from flame_asgi._base.names import function_name
from flame_asgi._base.version import VERSION

TRACER_NAME = "flame_asgi"
_tracer: tuple[Any, Any] | None = None  # (provider, tracer): one tracer per provider
_otel: tuple[Any, Any, Any] | None = None  # (context, propagate, trace) once imported
_no_otel = False  # importing it failed: do not try on every call
_PROVIDER_FROM_ENV = "OTEL_PYTHON_TRACER_PROVIDER" in os.environ


def enabled() -> bool:
    """Is OpenTelemetry imported with a tracer provider that records (not the default proxy)?"""
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return False
    # Checked on every call: read the global the API keeps (get_tracer_provider() would
    # look the environment up each time) unless a provider may come from the environment.
    provider = getattr(trace, "_TRACER_PROVIDER", trace)
    if provider is None and not _PROVIDER_FROM_ENV:
        return False
    if provider is None or provider is trace:
        provider = trace.get_tracer_provider()
    return not isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider))


def _modules() -> tuple[Any, Any, Any] | None:
    global _otel, _no_otel
    if _otel is None and not _no_otel:
        try:
            from opentelemetry import context, propagate, trace
        except ImportError:
            _no_otel = True
        else:
            _otel = (context, propagate, trace)
    return _otel


def _get_tracer(trace: Any) -> Any:
    global _tracer
    provider = trace.get_tracer_provider()
    if _tracer is None or _tracer[0] is not provider:
        _tracer = (provider, trace.get_tracer(TRACER_NAME, VERSION))
    return _tracer[1]


# -- the caller -------------------------------------------------------------------------
def caller_span(pool: str, kind: str, function: str) -> tuple[Any, dict[str, str] | None]:
    """Start the caller's span (child of the current one); return it and its W3C carrier."""
    if not enabled():
        return None, None
    modules = _modules()
    if modules is None:
        return None, None
    _, propagate, trace = modules
    span = _get_tracer(trace).start_span(
        f"flame.{kind} {function}", kind=trace.SpanKind.CLIENT,
        attributes={"flame.pool": pool, "flame.kind": kind, "flame.function": function})
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    return span, carrier or None


def acquired(span: Any, runner: str, queue_time: float) -> None:
    span.set_attribute("flame.runner_id", runner)
    span.set_attribute("flame.queue_time", queue_time)


def end(span: Any, exc: BaseException | None, outcome: str) -> None:
    span.set_attribute("flame.outcome", outcome)
    if exc is not None and outcome not in ("ok", "stopped", "cancelled"):
        from opentelemetry.trace import Status, StatusCode

        span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
    span.end()


# -- the runner -------------------------------------------------------------------------
class RemoteSpan:
    """The runner's span around one piece of work; this base class (``NO_SPAN``) does nothing."""

    def named(self, fn: Any) -> None:
        """Name the span after the function, once the payload is unpickled."""

    def failed(self, exc: BaseException) -> None:
        """The work raised ``exc`` (it goes back to the caller)."""

    def end(self) -> None:
        """End the span and restore the previous context (in the task that started it)."""


NO_SPAN = RemoteSpan()


class _RemoteSpan(RemoteSpan):
    def __init__(self, modules: tuple[Any, Any, Any], pool: str, runner: str, kind: str,
                 carrier: dict[str, str]) -> None:
        context, propagate, trace = modules
        self._context = context
        self._kind = kind
        parent = propagate.extract(carrier)
        self._span = _get_tracer(trace).start_span(
            f"flame.run {kind}", context=parent, kind=trace.SpanKind.SERVER,
            attributes={"flame.pool": pool, "flame.runner_id": runner, "flame.kind": kind})
        self._token = context.attach(trace.set_span_in_context(self._span, parent))

    def named(self, fn: Any) -> None:
        name = function_name(fn)
        self._span.update_name(f"flame.run {name}")
        self._span.set_attribute("flame.function", name)

    def failed(self, exc: BaseException) -> None:
        from opentelemetry.trace import Status, StatusCode

        self._span.record_exception(exc)
        self._span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))

    def end(self) -> None:
        self._span.end()
        self._context.detach(self._token)


def remote_span(info: Any, kind: str, carrier: Any) -> RemoteSpan:
    """On the runner: a span that continues the caller's trace, or ``NO_SPAN`` when untraced."""
    if not carrier or not isinstance(carrier, dict):
        return NO_SPAN
    modules = _modules()
    if modules is None:  # the parent traces, this runner has no OpenTelemetry: run untraced
        return NO_SPAN
    try:
        return _RemoteSpan(modules, info.pool, info.runner_id, kind, carrier)
    except Exception:  # a malformed carrier must never fail the work
        return NO_SPAN
